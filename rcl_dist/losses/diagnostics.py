"""Diagnostics of the RCL objective: does the contrastive term (Eq. 3) do any work?

Three kinds of figure, each cheap enough to record every few hundred steps: **logits**
(:func:`logit_stats`: the gap between a query's positive logit and its negatives', against the
uniform-guess loss ``log K``); **gradients** (:func:`gradient_norms`: ``alpha * grad L_contrast``
against ``grad L_consistency`` of Eq. 5 on the body, whose sum is Eq. 6's gradient); and, where the
noise is simulated, **the residual against the true noise** (:func:`residual_noise_distance`: the
Eq. 3 distance and the RMS difference between n_hat = x - f(x) of Eq. 2 and the added noise, which
the paper's Fig. 2 caption says RCL contracts). :func:`adapt_alpha` (``loss.alpha_ratio``) sets
alpha of Eq. 6 so that the contrastive gradient is a stated fraction of the consistency gradient.
Details: ``docs/losses.md``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from rcl_dist.losses.contrastive import pair_distance_stats

__all__ = ["logit_stats", "gradient_norms", "residual_noise_distance", "residual_noise_distances", "adapt_alpha"]


@torch.no_grad()
def logit_stats(
    dist: torch.Tensor, temperature: float | torch.Tensor, positive_index: torch.Tensor | None = None,
    reduction: str = "sum",
) -> dict[str, float]:
    """:func:`~rcl_dist.losses.contrastive.pair_distance_stats` of a [B_q, K] distance matrix plus the
    logit gap and the uniform-guess loss of Eq. 3.

    ``temperature``: the one the loss divides by (the effective one when it is scaled, see
    :class:`rcl_dist.losses.contrastive.ResidualContrastiveLoss`). ``positive_index[j]``: the column
    of q_j's positive (default j). Every query has K - 1 negatives, so the mean negative distance is
    also the mean over queries of each query's mean negative distance.
    """
    b, k = dist.shape
    stats = pair_distance_stats(dist.double(), positive_index)  # float64: the gap of nearly equal means
    tau = float(temperature)
    uniform = math.log(k) * (b if reduction == "sum" else 1)
    return {**stats, "logit_gap": stats["dist_gap"] / tau, "contrast_uniform": uniform, "tau_effective": tau}


def gradient_norms(terms: dict[str, torch.Tensor], params: Iterable[torch.nn.Parameter]) -> dict[str, float]:
    """``{name: ||d term / d params||_2}`` for each scalar term, through one shared graph.

    Uses :func:`torch.autograd.grad` (``retain_graph=True``), so the parameters' ``.grad`` stay as
    they are and the graph can still be used by the caller. Parameters a term does not reach count 0.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("gradient_norms needs parameters that require gradients")
    out = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        sq = sum((g.detach().double() ** 2).sum() for g in grads if g is not None)
        out[name] = float(torch.as_tensor(sq).sqrt())
    return out


@torch.no_grad()
def residual_noise_distances(residual: torch.Tensor, noise: torch.Tensor, distance) -> tuple[torch.Tensor, torch.Tensor]:
    """Per crop j: d(n_hat_j, n_j) (the Eq. 3 distance ``distance``, a :mod:`rcl_dist.losses.distances`
    object) and the root-mean-square of n_hat_j - n_j; two float64 [B] tensors.

    ``residual``, ``noise``: [B, C, H, W]. The distance is the diagonal of ``distance.pairwise`` on
    the two sets of sketches (crop j against its own noise only). The paper's Fig. 2 caption says RCL
    contracts d(n_hat, n): these are the numbers that claim is about.
    """
    if residual.shape != noise.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and noise {tuple(noise.shape)} differ in shape")
    s_r, s_n = distance.sketch(residual.float()), distance.sketch(noise.float())
    d = torch.stack([distance.pairwise(s_r[j : j + 1], s_n[j : j + 1])[0, 0] for j in range(residual.shape[0])])
    rms = (residual.double() - noise.double()).pow(2).flatten(1).mean(1).sqrt()
    return d.double(), rms


def residual_noise_distance(residual: torch.Tensor, noise: torch.Tensor, distance) -> dict[str, float]:
    """The means over crops of :func:`residual_noise_distances`: ``noise_distance`` and ``noise_rmse``."""
    d, rms = residual_noise_distances(residual, noise, distance)
    return {"noise_distance": float(d.mean()), "noise_rmse": float(rms.mean())}


def adapt_alpha(alpha: float, ratio: float, target: float, max_factor: float = 2.0,
                bounds: tuple[float, float] = (1e-8, 1e6)) -> float:  # fmt: skip
    """The next alpha of Eq. 6 for a measured ``ratio`` = alpha ||grad L_contrast|| / ||grad L_consistency||.

    The ratio is linear in alpha, so ``alpha * target / ratio`` would hit the target on the batch it
    was measured on; the step is limited to a factor ``max_factor`` either way (``inf``: jump, used
    once before training) because the ratio of one batch is noisy and moves as f trains. A ratio that
    is 0 or not finite (no contrastive gradient) multiplies alpha by ``max_factor`` when finite.
    The result is clipped to ``bounds``.
    """
    if not (target > 0 and alpha > 0 and max_factor >= 1):
        raise ValueError(f"adapt_alpha needs alpha > 0, target > 0, max_factor >= 1; got {alpha}, {target}, {max_factor}")
    if not (math.isfinite(ratio) and ratio > 0):
        factor = max_factor if math.isfinite(max_factor) else 1.0
    else:
        factor = min(max(target / ratio, 1.0 / max_factor), max_factor)
    return float(min(max(alpha * factor, bounds[0]), bounds[1]))
