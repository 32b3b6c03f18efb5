"""Distances between residual *value distributions*: EMD (Eq. 4), Bhattacharyya (Eq. 9), MMD (Eq. 10).

The distances of the paper compare the distributions of residual values, not aligned pixels, so each
residual is first reduced to a small **sketch** of its value distribution, and all pairwise work runs
on sketches::

    d = get_distance("emd")            # or "bd", "mmd"
    dist = d.pairwise(d.sketch(res_q), d.sketch(res_k))   # [B_q, B_k], non-negative

A sketch is a few hundred numbers per crop: pairwise cost O(B_q * B_k * K), and negatives gathered
from other workers cost K numbers per crop. Sketches are float32 and differentiable. Channels are
sketched separately by default (Eq. 8 noise is heteroscedastic per channel); why, and ``pooled``:
``docs/losses.md``.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

__all__ = [
    "Distance",
    "EMDDistance",
    "BhattacharyyaDistance",
    "MMDDistance",
    "get_distance",
    "DISTANCES",
    "quantile_cell_means",
]

_CHANNEL_MODES = ("separate", "pooled")


class Distance(Protocol):
    name: str

    def sketch(self, residual: torch.Tensor) -> torch.Tensor: ...

    def pairwise(self, sketch_a: torch.Tensor, sketch_b: torch.Tensor) -> torch.Tensor: ...


def _values(residual: torch.Tensor, channels: str) -> torch.Tensor:
    """[B, C, H, W] (or [B, C, P]) residual -> [B, C', P] values, C' = C or 1 (pooled).

    Half precision (autocast) is promoted to float32: order statistics and their differences are
    small numbers that bf16 would round away. float64 stays float64 (exactness tests).
    """
    if residual.dim() < 3:
        raise ValueError(f"residual must be [B, C, H, W], got shape {tuple(residual.shape)}")
    if residual.dtype not in (torch.float32, torch.float64):
        residual = residual.float()
    v = residual.flatten(2)  # [B, C, P]
    if channels == "pooled":
        v = v.flatten(1).unsqueeze(1)  # [B, 1, C*P]
    return v


def _check_channels(channels: str) -> str:
    if channels not in _CHANNEL_MODES:
        raise ValueError(f"channels must be one of {_CHANNEL_MODES}, got {channels!r}")
    return channels


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dim() != 3 or b.dim() != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"{what}.pairwise: sketches must be [N, C, K] with equal C and K, got {tuple(a.shape)} and "
            f"{tuple(b.shape)} (sketches of different crop sizes need the same `quantiles`)"
        )


def quantile_cell_means(sorted_values: torch.Tensor, cells: int) -> torch.Tensor:
    """Mean of the empirical quantile function F^-1 over ``cells`` equal cells of [0, 1].

    ``sorted_values`` is [..., P] ascending. Cell k is [k/Q, (k+1)/Q); its mean is
    Q * integral of F^-1 over the cell, where F^-1(u) = v_(i) on (i/P, (i+1)/P]. When Q divides P this
    is the mean of each block of P/Q consecutive order statistics; otherwise the integral is taken
    exactly through the running sum (in float64, so that the differences of large sums keep their
    precision). Every value contributes, so every pixel receives gradient.
    """
    p = sorted_values.shape[-1]
    if cells < 1:
        raise ValueError(f"cells must be >= 1, got {cells}")
    if p % cells == 0:
        return sorted_values.unflatten(-1, (cells, p // cells)).mean(-1)
    v = sorted_values.double()
    csum = torch.nn.functional.pad(v.cumsum(-1), (1, 0))  # [..., P+1], csum[i] = sum of the i smallest
    pos = torch.arange(cells + 1, dtype=torch.float64, device=v.device) * (p / cells)  # in [0, P]
    lo = pos.floor().clamp(max=p - 1)
    frac = pos - lo
    lo = lo.long()
    integral = csum[..., lo] + frac * v[..., lo]  # P * S(k/Q), S(t) = integral_0^t F^-1
    return ((integral[..., 1:] - integral[..., :-1]) * (cells / p)).to(sorted_values.dtype)


class EMDDistance:
    """Earth mover's distance (Eq. 4) between the 1-D distributions of residual values.

    In one dimension EMD = W1 = integral_0^1 |F_a^-1(u) - F_b^-1(u)| du. For two samples of equal size
    that is the mean absolute difference of the sorted values, which ``quantiles=None`` computes
    exactly (the sketch is all sorted values; ``pairwise`` is then L1/P, equal to
    ``scipy.stats.wasserstein_distance``).

    ``quantiles=Q`` (default 256) keeps Q cell means of the quantile function
    (:func:`quantile_cell_means`). Then, with W1_Q the sketch distance and per channel,

        0 <= W1 - W1_Q <= (range(a) + range(b)) / Q

    (Jensen on each cell gives the lower bound; on each cell the integrand varies by at most the
    oscillation of the two monotone quantile functions, whose sum over cells is at most their range).
    For Gaussian-like residuals the error is far below that bound: see benchmarks/results/.
    A shift by c gives W1 = c exactly, with or without quantiles.
    """

    name = "emd"

    def __init__(self, quantiles: int | None = 256, channels: str = "separate") -> None:
        if quantiles is not None and (not isinstance(quantiles, int) or quantiles < 1):
            raise ValueError(f"emd: quantiles must be a positive int or None, got {quantiles!r}")
        self.quantiles = quantiles
        self.channels = _check_channels(channels)

    def sketch(self, residual: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C', Q] cell means of the quantile function (or [B, C', P] sorted values)."""
        v, _ = torch.sort(_values(residual, self.channels), dim=-1)  # [B, C', P]
        return v if self.quantiles is None else quantile_cell_means(v, self.quantiles)

    def pairwise(self, sketch_a: torch.Tensor, sketch_b: torch.Tensor) -> torch.Tensor:
        """[N_a, C', K] x [N_b, C', K] -> [N_a, N_b]: per-channel W1, averaged over channels."""
        _check_pair(sketch_a, sketch_b, self.name)
        n_a, c, k = sketch_a.shape
        # mean over channels of (1/K) sum |a - b| == L1 distance of the flattened sketches / (C*K)
        return torch.cdist(sketch_a.reshape(1, n_a, c * k), sketch_b.reshape(1, -1, c * k), p=1)[0] / (c * k)


class BhattacharyyaDistance:
    """Bhattacharyya distance between Gaussian fits of the residual values (App. B.1, Eq. 9).

    With sample mean mu and unbiased sample variance s^2 of each residual (per channel),

        D_B = (mu_p - mu_q)^2 / (4 (s_p^2 + s_q^2)) + 1/2 * ln((s_p^2 + s_q^2) / (2 s_p s_q)),

    the closed form for two Gaussians; ``eps`` is added to each variance so that a constant residual
    stays finite. Identical Gaussians are at distance 0. Sketch: [B, C', 2] = (mean, variance).
    """

    name = "bd"

    def __init__(self, eps: float = 1e-8, channels: str = "separate") -> None:
        if not eps >= 0:
            raise ValueError(f"bd: eps must be >= 0, got {eps!r}")
        self.eps = float(eps)
        self.channels = _check_channels(channels)

    def sketch(self, residual: torch.Tensor) -> torch.Tensor:
        v = _values(residual, self.channels)  # [B, C', P]
        if v.shape[-1] < 2:
            raise ValueError("bd: a residual needs at least 2 values per channel for a sample variance")
        var, mean = torch.var_mean(v, dim=-1, correction=1)
        return torch.stack([mean, var], dim=-1)  # [B, C', 2]

    def pairwise(self, sketch_a: torch.Tensor, sketch_b: torch.Tensor) -> torch.Tensor:
        _check_pair(sketch_a, sketch_b, self.name)
        mu_a, var_a = sketch_a[:, None, :, 0], sketch_a[:, None, :, 1] + self.eps  # [N_a, 1, C']
        mu_b, var_b = sketch_b[None, :, :, 0], sketch_b[None, :, :, 1] + self.eps  # [1, N_b, C']
        var_sum = var_a + var_b  # [N_a, N_b, C']
        d = (mu_a - mu_b) ** 2 / (4.0 * var_sum) + 0.5 * (
            torch.log(var_sum) - math.log(2.0) - 0.5 * (torch.log(var_a) + torch.log(var_b))
        )
        return d.mean(-1).clamp_min(0.0)  # [N_a, N_b]; clamp: rounding of the log terms near 0


class MMDDistance:
    """Maximum mean discrepancy with a Gaussian kernel (App. B.1, Eq. 10).

    For the unit ball of the kernel's RKHS the supremum of Eq. 10 is ||mu_P - mu_Q||_H; its estimate
    here is the biased (V-statistic) one of Gretton et al. (2012), which is never negative:

        MMD^2 = mean_{s,t} k(a_s, a_t) + mean_{s,t} k(b_s, b_t) - 2 mean_{s,t} k(a_s, b_t),
        k(x, y) = exp(-(x - y)^2 / (2 h^2)),   distance = sqrt(max(MMD^2, 1e-12)),

    averaged over channels. The sample of each residual is ``samples`` cell means of its quantile
    function (the EMD sketch): a deterministic, evenly spread sample of the value distribution, with
    no sampling noise between steps or ranks. Bandwidth h: a float, or ``"median"`` (default), the
    median heuristic taken per channel over the values of ``sketch_b`` (the keys: in training they are
    all positives and negatives, identical on every worker, so the distance does not depend on how a
    batch is split across workers); h is detached. Cost O(N_a * N_b * samples^2 * C').
    """

    name = "mmd"

    def __init__(self, samples: int = 32, bandwidth: float | str = "median", channels: str = "separate") -> None:
        if not isinstance(samples, int) or samples < 2:
            raise ValueError(f"mmd: samples must be an int >= 2, got {samples!r}")
        if not (bandwidth == "median" or (isinstance(bandwidth, (int, float)) and bandwidth > 0)):
            raise ValueError(f"mmd: bandwidth must be 'median' or a positive number, got {bandwidth!r}")
        self.samples = samples
        self.bandwidth = bandwidth
        self.channels = _check_channels(channels)

    def sketch(self, residual: torch.Tensor) -> torch.Tensor:
        v, _ = torch.sort(_values(residual, self.channels), dim=-1)
        return quantile_cell_means(v, self.samples)  # [B, C', S]

    def _bandwidth(self, keys: torch.Tensor) -> torch.Tensor:
        """[C'] bandwidths: median heuristic over (at most 1024 of) the key values of each channel."""
        if self.bandwidth != "median":
            return torch.full((keys.shape[1],), float(self.bandwidth), device=keys.device)
        v = keys.detach().transpose(0, 1).flatten(1)  # [C', N*S]
        stride = max(1, v.shape[1] // 1024)
        v = v[:, ::stride]
        diff = (v[:, :, None] - v[:, None, :]).abs()  # [C', M, M]
        iu = torch.triu_indices(v.shape[1], v.shape[1], offset=1, device=v.device)
        return diff[:, iu[0], iu[1]].median(dim=1).values.clamp_min(1e-6)

    @staticmethod
    def _kernel_mean(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x [..., C, S], y [..., C, S] (broadcastable), h [C] -> [..., C] mean over s, t of k(x_s, y_t)."""
        d2 = (x[..., :, None] - y[..., None, :]) ** 2  # [..., C, S, S]
        return torch.exp(-d2 / (2.0 * h[:, None, None] ** 2)).mean(dim=(-1, -2))

    def pairwise(self, sketch_a: torch.Tensor, sketch_b: torch.Tensor) -> torch.Tensor:
        _check_pair(sketch_a, sketch_b, self.name)
        h = self._bandwidth(sketch_b)
        k_aa = self._kernel_mean(sketch_a, sketch_a, h)  # [N_a, C]
        k_bb = self._kernel_mean(sketch_b, sketch_b, h)  # [N_b, C]
        k_ab = self._kernel_mean(sketch_a[:, None], sketch_b[None, :], h)  # [N_a, N_b, C]
        mmd2 = k_aa[:, None, :] + k_bb[None, :, :] - 2.0 * k_ab
        return mmd2.clamp_min(1e-12).sqrt().mean(-1)  # [N_a, N_b]


DISTANCES = {"emd": EMDDistance, "bd": BhattacharyyaDistance, "mmd": MMDDistance}


def get_distance(name: str, **options) -> EMDDistance | BhattacharyyaDistance | MMDDistance:
    """The distance ``name`` in {"emd", "bd", "mmd"} with its options; an unknown name or option raises."""
    try:
        cls = DISTANCES[name]
    except KeyError:
        raise ValueError(f"unknown distance {name!r}; choose one of {sorted(DISTANCES)}") from None
    try:
        return cls(**options)
    except TypeError as e:  # an option the distance does not take
        raise ValueError(f"distance {name!r}: {e}") from None
