"""Noise model: samplers' ranges and laws, Eq. 8 statistics, generator purity, Bayer mosaic and T."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rcl_dist.noise import (
    NoiseParams,
    add_nlf_noise,
    demosaic_bilinear,
    mosaic,
    nlf_variance,
    pack_bayer,
    sample_nlf,
    sample_nlf_brooks,
    sample_nlf_uniform,
    unpack_bayer,
)


def test_uniform_sampler_range_and_law(rng):
    smin, smax = 5 / 255, 20 / 255
    p = sample_nlf_uniform(20000, smin, smax, generator=rng)
    a, b = smin / math.sqrt(2), smax / math.sqrt(2)
    for lam in (p.shot, p.read):
        root = lam.double().sqrt()
        assert root.min() >= a - 1e-7 and root.max() <= b + 1e-7
        # sqrt(lambda) is uniform on [a, b]: mean (a+b)/2, variance (b-a)^2/12
        assert root.mean().item() == pytest.approx((a + b) / 2, rel=0.01)
        assert root.var().item() == pytest.approx((b - a) ** 2 / 12, rel=0.05)
    # independent draws: no log-linear relation between the two (unlike Brooks et al.)
    assert abs(np.corrcoef(p.shot.numpy(), p.read.numpy())[0, 1]) < 0.03
    # total variance at white stays within sigma_max^2
    assert (p.shot + p.read).max() <= smax**2 + 1e-7


def test_uniform_sampler_default_is_papers_range(rng):
    p = sample_nlf_uniform(1000, generator=rng)
    assert (p.shot + p.read).max() <= (20 / 255) ** 2 + 1e-7


def test_brooks_sampler_law(rng):
    p = sample_nlf_brooks(20000, generator=rng)
    log_shot, log_read = p.shot.double().log(), p.read.double().log()
    assert log_shot.min() >= math.log(0.001) - 1e-6 and log_shot.max() <= math.log(0.12) + 1e-6
    resid = log_read - (2.18 * log_shot + 1.2)
    assert resid.mean().item() == pytest.approx(0.0, abs=0.01)
    assert resid.std().item() == pytest.approx(0.26, rel=0.03)


def test_sampler_registry_and_errors(rng):
    assert len(sample_nlf("uniform", 3, generator=rng)) == 3
    with pytest.raises(ValueError, match="unknown noise sampler"):
        sample_nlf("poisson", 3)
    with pytest.raises(ValueError, match="sigma_min"):
        sample_nlf_uniform(3, 0.2, 0.1)
    with pytest.raises(ValueError, match="equal length"):
        NoiseParams(torch.zeros(2), torch.zeros(3))


def test_noise_is_pure_function_of_generator():
    clean = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    params = NoiseParams(torch.tensor([0.01, 0.02]), torch.tensor([0.001, 0.0]))
    x1 = add_nlf_noise(clean, params, generator=torch.Generator().manual_seed(7))
    x2 = add_nlf_noise(clean, params, generator=torch.Generator().manual_seed(7))
    x3 = add_nlf_noise(clean, params, generator=torch.Generator().manual_seed(8))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_heteroscedastic_variance_regression(rng):
    """Eq. 8: regress the empirical variance of (noisy - clean) on intensity: slope shot, intercept read."""
    shot, read = 0.02, 0.0015
    levels = torch.linspace(0.0, 1.0, 11)
    clean = levels.view(1, 1, 11, 1).expand(1, 1, 11, 20000).contiguous()
    noisy = add_nlf_noise(clean, NoiseParams(torch.tensor([shot]), torch.tensor([read])), generator=rng)
    var = (noisy - clean)[0, 0].var(dim=1).double().numpy()
    slope, intercept = np.polyfit(levels.double().numpy(), var, 1)
    assert slope == pytest.approx(shot, rel=0.05)
    assert intercept == pytest.approx(read, rel=0.05)
    assert (noisy - clean).mean().abs() < 1e-3  # zero-mean


def test_per_image_parameters_and_clamp(rng):
    clean = torch.full((2, 1, 100, 100), 0.5)
    params = NoiseParams(torch.tensor([0.0, 0.04]), torch.tensor([0.0001, 0.0]))
    noisy = add_nlf_noise(clean, params, generator=rng)
    std = (noisy - clean).flatten(1).std(dim=1)
    assert std[0].item() == pytest.approx(0.01, rel=0.05)
    assert std[1].item() == pytest.approx(math.sqrt(0.02), rel=0.05)
    # negative intensities (e.g. after resampling) give variance clamped at 0, never NaN
    assert (nlf_variance(torch.tensor([[[[-1.0]]]]), 0.1, 0.01) == 0).all()
    assert torch.isfinite(add_nlf_noise(-clean, params, generator=rng)).all()
    assert add_nlf_noise(clean, params, generator=rng, clip=True).max() <= 1.0
    with pytest.raises(ValueError, match="noise parameter pairs"):
        add_nlf_noise(torch.zeros(3, 1, 4, 4), params)


def test_mosaic_rggb_layout():
    rgb = torch.stack([torch.full((4, 4), v) for v in (1.0, 2.0, 3.0)]).unsqueeze(0)
    raw = mosaic(rgb)[0, 0]
    assert raw.tolist()[:2] == [[1.0, 2.0, 1.0, 2.0], [2.0, 3.0, 2.0, 3.0]]
    packed = pack_bayer(mosaic(rgb))
    assert packed.shape == (1, 4, 2, 2)
    assert packed[0, :, 0, 0].tolist() == [1.0, 2.0, 2.0, 3.0]  # R, G, G, B


def test_pack_unpack_roundtrip_and_errors(rng):
    raw = torch.rand(2, 1, 6, 8, generator=rng)
    assert torch.equal(unpack_bayer(pack_bayer(raw)), raw)
    with pytest.raises(ValueError, match="even"):
        mosaic(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError, match="3 colour channels"):
        mosaic(torch.zeros(1, 1, 4, 4))


def test_bilinear_demosaic_keeps_samples_and_reproduces_linear_images(rng):
    rgb = torch.rand(2, 3, 10, 12, generator=rng)
    raw = mosaic(rgb)
    out = demosaic_bilinear(raw)
    assert out.shape == (2, 3, 10, 12)
    assert torch.allclose(mosaic(out), raw)  # sampled values untouched
    # constant and linear ramps are reproduced exactly away from the border
    yy, xx = torch.meshgrid(torch.arange(10.0), torch.arange(12.0), indexing="ij")
    ramp = torch.stack([0.1 * xx, 0.05 * yy + 0.02 * xx, 0.3 - 0.01 * yy]).unsqueeze(0)
    got = demosaic_bilinear(mosaic(ramp))
    assert torch.allclose(got[..., 1:-1, 1:-1], ramp[..., 1:-1, 1:-1], atol=1e-6)
    const = torch.full((1, 3, 6, 6), 0.7)
    assert torch.allclose(demosaic_bilinear(mosaic(const)), const)  # borders too


def test_gaussian_sampler_is_eq8_with_no_shot_noise(rng):
    p = sample_nlf("gaussian", 20000, sigma_min=0.0, sigma_max=55 / 255, generator=rng)
    assert torch.all(p.shot == 0)
    sigma = p.read.sqrt()
    assert float(sigma.min()) >= 0 and float(sigma.max()) <= 55 / 255 + 1e-6
    assert float(sigma.mean()) == pytest.approx(27.5 / 255, rel=0.02)  # uniform in sigma
    fixed = sample_nlf("gaussian", 3, sigma_min=25 / 255, sigma_max=25 / 255, generator=rng)
    torch.testing.assert_close(fixed.read, torch.full((3,), (25 / 255) ** 2))
    x = torch.rand(2, 3, 64, 64, generator=rng)
    noisy = add_nlf_noise(x, NoiseParams(fixed.shot[:2], fixed.read[:2]), generator=rng)
    assert float((noisy - x).std()) == pytest.approx(25 / 255, rel=0.03)  # the same sigma at every intensity
