"""The residual contrastive loss against a literal transcription of Algorithm 1 (Eq. 3)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import wasserstein_distance

from rcl_dist.losses.contrastive import ResidualContrastiveLoss, pair_distance_stats


def algorithm1_literal(res_q, res_k, tau, extra=None):
    """Algorithm 1, line by line, with EMD from scipy (Eq. 4) and Eq. 3 written out with math.exp.

    Multi-channel residuals: per-channel EMD averaged (the library's documented default).
    """
    n_plus_1 = res_q.shape[0]

    def d(a, b):
        return sum(
            wasserstein_distance(a[c].ravel().tolist(), b[c].ravel().tolist()) for c in range(a.shape[0])
        ) / a.shape[0]

    total = 0.0
    for j in range(n_plus_1):  # line 4
        q, k0 = res_q[j], res_k[j]  # line 5: the j-th pair is the positive pair
        negatives = [res_k[i] for i in range(n_plus_1) if i != j]  # line 6: 2nd patch of the other N pairs
        num = math.exp(-d(q, k0) / tau)
        den = num + sum(math.exp(-d(q, k) / tau) for k in negatives)
        if extra is not None:
            den += sum(math.exp(-d(q, k) / tau) for k in extra)
        total += -math.log(num / den)  # line 7, Eq. 3
    return total  # line 8: sum over the batch


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_matches_literal_algorithm1(rng, channels, tau):
    scales = torch.linspace(0.5, 2.0, 5, dtype=torch.float64).view(-1, 1, 1, 1)
    res_q = scales * torch.randn(5, channels, 6, 7, generator=rng, dtype=torch.float64)
    res_k = scales * torch.randn(5, channels, 6, 7, generator=rng, dtype=torch.float64)
    loss = ResidualContrastiveLoss("emd", temperature=tau, quantiles=None)
    assert loss(res_q, res_k).item() == pytest.approx(algorithm1_literal(res_q, res_k, tau), rel=1e-6)
    mean = ResidualContrastiveLoss("emd", temperature=tau, reduction="mean", quantiles=None)
    assert mean(res_q, res_k).item() == pytest.approx(algorithm1_literal(res_q, res_k, tau) / 5, rel=1e-6)


def test_extra_negatives_match_literal(rng):
    res_q = torch.randn(4, 1, 5, 5, generator=rng, dtype=torch.float64)
    res_k = torch.randn(4, 1, 5, 5, generator=rng, dtype=torch.float64)
    extra = 1.5 * torch.randn(3, 1, 5, 5, generator=rng, dtype=torch.float64)
    loss = ResidualContrastiveLoss("emd", temperature=0.2, quantiles=None)
    got = loss(res_q, res_k, extra_negatives=loss.sketch(extra))
    assert got.item() == pytest.approx(algorithm1_literal(res_q, res_k, 0.2, extra=extra), rel=1e-6)


def test_positive_index_with_gathered_keys(rng):
    """A worker's queries against all workers' keys, positive at an offset: same terms as one process."""
    res_q = torch.randn(6, 1, 5, 5, generator=rng, dtype=torch.float64)
    res_k = torch.randn(6, 1, 5, 5, generator=rng, dtype=torch.float64)
    loss = ResidualContrastiveLoss("emd", temperature=0.3, quantiles=None)
    s_q, s_k = loss.sketch(res_q), loss.sketch(res_k)
    whole = loss.from_sketches(s_q, s_k)
    halves = sum(
        loss.from_sketches(s_q[r * 3 : (r + 1) * 3], s_k, positive_index=torch.arange(3) + 3 * r) for r in range(2)
    )
    assert halves.item() == pytest.approx(whole.item(), rel=1e-12)


def test_closed_form_two_images():
    # Two images; residual distributions are shifts, so EMD = |shift difference|.
    base = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    res_q = torch.cat([base, base + 1.0])
    res_k = torch.cat([base + 0.1, base + 1.0])
    tau = 0.5
    # anchor 0: d_pos = |0 - 0.1| = 0.1, d_neg = |0 - 1| = 1; anchor 1: d_pos = 0, d_neg = |1 - 0.1| = 0.9
    expected = -math.log(math.exp(-0.2) / (math.exp(-0.2) + math.exp(-2.0))) - math.log(
        1.0 / (1.0 + math.exp(-1.8))
    )
    loss = ResidualContrastiveLoss("emd", temperature=tau)
    assert loss(res_q, res_k).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("distance", ["emd", "bd", "mmd"])
def test_gradients_reach_both_crops(distance, rng, device):
    res_q = torch.randn(4, 3, 8, 8, generator=rng).to(device).requires_grad_(True)
    res_k = torch.randn(4, 3, 8, 8, generator=rng).to(device).requires_grad_(True)
    loss = ResidualContrastiveLoss(distance, temperature=0.1)
    out = loss(res_q, res_k)
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()
    assert res_q.grad.abs().sum() > 0 and res_k.grad.abs().sum() > 0


def test_bad_arguments():
    for tau in (0, -1.0, 0.0):
        with pytest.raises(ValueError, match="temperature"):
            ResidualContrastiveLoss(temperature=tau)
    with pytest.raises(ValueError, match="reduction"):
        ResidualContrastiveLoss(reduction="none")
    with pytest.raises(ValueError, match="unknown distance"):
        ResidualContrastiveLoss(distance="cosine")
    loss = ResidualContrastiveLoss()
    with pytest.raises(ValueError, match="one pair per image"):
        loss(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="at least one negative"):
        loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))


def test_pair_distance_stats():
    dist = torch.tensor([[0.1, 1.0, 2.0], [3.0, 0.3, 5.0]])  # 2 queries, 2 keys + 1 extra negative
    s = pair_distance_stats(dist)
    assert s["dist_pos"] == pytest.approx(0.2)
    assert s["dist_neg"] == pytest.approx((1.0 + 3.0 + 2.0 + 5.0) / 4)
    assert s["dist_gap"] == pytest.approx(2.75 - 0.2)
