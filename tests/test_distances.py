"""Distances against literal references (scipy), closed forms, error bounds, shapes and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from rcl_dist.losses.distances import get_distance, quantile_cell_means


def _res(rng, b, c, h, w, scale=1.0, shift=0.0, dtype=torch.float64):
    return shift + scale * torch.randn(b, c, h, w, generator=rng, dtype=dtype)


def test_emd_exact_matches_scipy(rng):
    a = _res(rng, 4, 1, 12, 9)
    b = _res(rng, 3, 1, 12, 9, scale=0.3, shift=0.2)
    d = get_distance("emd", quantiles=None)
    got = d.pairwise(d.sketch(a), d.sketch(b))
    assert got.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            ref = wasserstein_distance(a[i].ravel().numpy(), b[j].ravel().numpy())
            assert got[i, j].item() == pytest.approx(ref, rel=1e-5)


def test_emd_exact_matches_scipy_float32_heavy_tails(rng):
    # Laplace-like tails and float32 inputs as in training.
    a = (torch.randn(3, 1, 32, 32, generator=rng) ** 3).float()
    b = (0.5 * torch.randn(2, 1, 32, 32, generator=rng)).float()
    d = get_distance("emd", quantiles=None)
    got = d.pairwise(d.sketch(a), d.sketch(b))
    for i in range(3):
        for j in range(2):
            ref = wasserstein_distance(a[i].ravel().double().numpy(), b[j].ravel().double().numpy())
            assert got[i, j].item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("quantiles", [None, 64, 100])
def test_emd_shift_by_c_is_c(rng, quantiles):
    a = _res(rng, 2, 3, 16, 16)
    d = get_distance("emd", quantiles=quantiles)
    got = d.pairwise(d.sketch(a), d.sketch(a + 0.37))
    assert torch.allclose(got.diagonal(), torch.full((2,), 0.37, dtype=got.dtype), atol=1e-9)
    assert torch.allclose(d.pairwise(d.sketch(a), d.sketch(a)).diagonal(), torch.zeros(2, dtype=got.dtype))


@pytest.mark.parametrize("quantiles", [16, 64, 100, 256])
@pytest.mark.parametrize("size", [(16, 16), (17, 23), (64, 64)])
def test_emd_quantile_sketch_error_bound(rng, quantiles, size):
    """Claimed bound: 0 <= W1 - W1_Q <= (range(a) + range(b)) / Q, per channel."""
    a = _res(rng, 5, 1, *size) ** 3  # heavy tails make the bound work hardest
    b = _res(rng, 5, 1, *size, scale=0.5, shift=0.1)
    exact_d, q_d = get_distance("emd", quantiles=None), get_distance("emd", quantiles=quantiles)
    exact = exact_d.pairwise(exact_d.sketch(a), exact_d.sketch(b))
    approx = q_d.pairwise(q_d.sketch(a), q_d.sketch(b))
    rng_a = (a.amax(dim=(1, 2, 3)) - a.amin(dim=(1, 2, 3)))[:, None]
    rng_b = (b.amax(dim=(1, 2, 3)) - b.amin(dim=(1, 2, 3)))[None, :]
    gap = exact - approx
    assert (gap >= -1e-9).all()
    assert (gap <= (rng_a + rng_b) / quantiles + 1e-9).all()


def test_emd_quantile_sketch_accuracy_gaussian_residuals(rng):
    """Typical case (Gaussian residuals of different scales, 64x64, Q=256): relative error < 1%."""
    a = _res(rng, 8, 3, 64, 64, scale=0.05)
    b = torch.cat([_res(rng, 4, 3, 64, 64, scale=0.06), _res(rng, 4, 3, 64, 64, scale=0.05, shift=0.01)])
    exact_d, q_d = get_distance("emd", quantiles=None), get_distance("emd")
    exact = exact_d.pairwise(exact_d.sketch(a), exact_d.sketch(b))
    approx = q_d.pairwise(q_d.sketch(a), q_d.sketch(b))
    assert ((exact - approx).abs() / exact).max() < 0.01


def test_quantile_cell_means_non_divisible_matches_integral():
    v = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)  # P = 5
    got = quantile_cell_means(v, 2)
    # cells [0, .5) and [.5, 1): 2.5 values each; means (0+1+0.5*2)/2.5 and (0.5*2+3+4)/2.5
    assert torch.allclose(got, torch.tensor([[0.8, 3.2]], dtype=torch.float64))
    assert torch.allclose(quantile_cell_means(v, 5), v)


def test_channels_separate_is_mean_of_per_channel(rng):
    a, b = _res(rng, 3, 3, 8, 8), _res(rng, 2, 3, 8, 8, scale=2.0)
    for name, opts in [("emd", {"quantiles": None}), ("emd", {}), ("bd", {}), ("mmd", {"bandwidth": 0.5})]:
        d = get_distance(name, channels="separate", **opts)
        full = d.pairwise(d.sketch(a), d.sketch(b))
        per_c = torch.stack([d.pairwise(d.sketch(a[:, c : c + 1]), d.sketch(b[:, c : c + 1])) for c in range(3)])
        assert torch.allclose(full, per_c.mean(0), atol=1e-9), name


def test_channels_pooled_treats_all_values_as_one_sample(rng):
    a, b = _res(rng, 2, 3, 8, 8), _res(rng, 2, 3, 8, 8, scale=2.0)
    d = get_distance("emd", quantiles=None, channels="pooled")
    got = d.pairwise(d.sketch(a), d.sketch(b))
    for i in range(2):
        for j in range(2):
            assert got[i, j].item() == pytest.approx(wasserstein_distance(a[i].ravel(), b[j].ravel()), rel=1e-6)
    # pooling cannot tell channel assignments apart; separate can
    swapped = a[:, [2, 1, 0]]
    assert torch.allclose(d.pairwise(d.sketch(a), d.sketch(swapped)).diagonal(), torch.zeros(2, dtype=a.dtype))
    sep = get_distance("emd", quantiles=None)
    assert (sep.pairwise(sep.sketch(a), sep.sketch(swapped)).diagonal() > 0).all()


def _bd_literal(x: np.ndarray, y: np.ndarray) -> float:
    mp, mq, vp, vq = x.mean(), y.mean(), x.var(ddof=1), y.var(ddof=1)
    return 0.25 * (mp - mq) ** 2 / (vp + vq) + 0.5 * math.log((vp + vq) / (2 * math.sqrt(vp * vq)))


def test_bd_matches_closed_form(rng):
    a, b = _res(rng, 3, 1, 10, 10), _res(rng, 4, 1, 10, 10, scale=0.4, shift=-0.3)
    d = get_distance("bd", eps=0.0)
    got = d.pairwise(d.sketch(a), d.sketch(b))
    for i in range(3):
        for j in range(4):
            assert got[i, j].item() == pytest.approx(_bd_literal(a[i].ravel().numpy(), b[j].ravel().numpy()), rel=1e-9)


def test_bd_identical_gaussians_zero_and_known_value():
    d = get_distance("bd", eps=0.0)
    s1 = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)  # sketch: mean 0, var 1
    s2 = torch.tensor([[[2.0, 1.0]]], dtype=torch.float64)
    assert d.pairwise(s1, s1).item() == pytest.approx(0.0, abs=1e-12)
    assert d.pairwise(s1, s2).item() == pytest.approx(0.25 * 4 / 2)  # (mu diff)^2 / (4 * 2)


def _mmd_literal(x: np.ndarray, y: np.ndarray, h: float) -> float:
    k = lambda u, v: np.exp(-((u[:, None] - v[None, :]) ** 2) / (2 * h * h)).mean()  # noqa: E731
    return math.sqrt(max(k(x, x) + k(y, y) - 2 * k(x, y), 1e-12))


def test_mmd_matches_literal_v_statistic(rng):
    a, b = _res(rng, 2, 1, 8, 8), _res(rng, 3, 1, 8, 8, scale=0.5, shift=0.2)
    d = get_distance("mmd", samples=64, bandwidth=0.7)  # 64 cells of 64 values: the sample is the data
    got = d.pairwise(d.sketch(a), d.sketch(b))
    for i in range(2):
        for j in range(3):
            ref = _mmd_literal(a[i].ravel().numpy(), b[j].ravel().numpy(), 0.7)
            assert got[i, j].item() == pytest.approx(ref, rel=1e-6)


def test_mmd_median_bandwidth_uses_keys_only(rng):
    a, b = _res(rng, 2, 1, 8, 8), _res(rng, 3, 1, 8, 8)
    d = get_distance("mmd")
    full = d.pairwise(d.sketch(a), d.sketch(b))
    # rows are independent of the other queries: the bandwidth comes from the keys
    assert torch.allclose(d.pairwise(d.sketch(a[:1]), d.sketch(b)), full[:1])
    assert (d.pairwise(d.sketch(a), d.sketch(a)).diagonal() < 1e-5).all()


@pytest.mark.parametrize("name", ["emd", "bd", "mmd"])
@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (3, 3, 8, 10), (3, 4, 6, 6)])
def test_shapes_and_gradients_flow_through_sketch(name, shape, rng, device):
    a = torch.randn(*shape, generator=rng).to(device).requires_grad_(True)
    b = (0.5 * torch.randn(*shape, generator=rng)).to(device).requires_grad_(True)
    d = get_distance(name)
    sa, sb = d.sketch(a), d.sketch(b)
    assert sa.shape[0] == shape[0] and sa.dim() == 3
    dist = d.pairwise(sa, sb)
    assert dist.shape == (shape[0], shape[0])
    assert (dist >= 0).all()
    dist.sum().backward()
    for t in (a, b):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    # EMD cell means give every pixel a gradient, not only the selected order statistics
    if name == "emd":
        assert (a.grad != 0).float().mean() > 0.99


def test_distance_gradient_matches_finite_differences(rng):
    a = torch.randn(2, 1, 5, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 1, 5, 6, generator=rng, dtype=torch.float64)
    for name, opts in [("emd", {"quantiles": 7}), ("bd", {}), ("mmd", {"bandwidth": 0.8, "samples": 5})]:
        d = get_distance(name, **opts)
        assert torch.autograd.gradcheck(lambda x: d.pairwise(d.sketch(x), d.sketch(b)), (a,)), name


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown distance"):
        get_distance("kl")
    with pytest.raises(ValueError, match="quantiles"):
        get_distance("emd", quantiles=0)
    with pytest.raises(ValueError, match="channels"):
        get_distance("bd", channels="mixed")
    with pytest.raises(ValueError, match="bandwidth"):
        get_distance("mmd", bandwidth=-1.0)
    with pytest.raises(ValueError, match="'emd'"):
        get_distance("emd", bandwidth=1.0)
    d = get_distance("emd", quantiles=None)
    with pytest.raises(ValueError, match="quantiles"):
        d.pairwise(d.sketch(torch.zeros(1, 1, 4, 4)), d.sketch(torch.zeros(1, 1, 5, 5)))
