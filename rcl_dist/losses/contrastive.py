"""Residual contrastive loss: Eq. 3 computed batch-wise as in Algorithm 1 of Dong et al. (IJCAI 2022).

For N+1 images, two overlapping crops each, residuals res_q[j] and res_k[j] (Eq. 2). For anchor j the
positive pair is (q_j, k_j) and the negatives are k_i for i != j, plus any extra negative sketches
(from other workers or a queue); with d a distance between residual value distributions
(:mod:`rcl_dist.losses.distances`),

    L_j = -log( exp(-d(q_j, k_j)/tau) / sum_i exp(-d(q_j, k_i)/tau) )                   (Eq. 3)

``reduction="sum"`` is the paper's line 8; ``"mean"`` keeps alpha of Eq. 6 independent of the batch
size. ``temperature_scale="median"`` (not in the paper) divides the distances by the median negative
distance, because at the paper's tau = 0.1 on the [0, 1] value scale every logit is ~0 and Eq. 3 is
flat: see ``docs/losses.md``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rcl_dist.losses.distances import get_distance

__all__ = ["ResidualContrastiveLoss", "pair_distance_stats"]

_REDUCTIONS = ("sum", "mean")
TEMPERATURE_SCALES = ("fixed", "median")
_MIN_SCALE = 1e-8  # floor of the median scale: residuals that are exactly equal give 0


class ResidualContrastiveLoss(nn.Module):
    """Eq. 3 with Algorithm 1. ``forward(res_q, res_k, extra_negatives=None) -> scalar``.

    Args:
        distance: "emd" (Eq. 4, the paper's choice), "bd" (Eq. 9) or "mmd" (Eq. 10).
        temperature: tau > 0. Distances live on the residual's value scale (images in [0, 1]), so
            tau is on that scale too.
        reduction: "sum" (Algorithm 1, line 8) or "mean".
        temperature_scale: "fixed" (the paper: logits -d/tau) or "median" (-d/(tau m), m the median
            negative distance of the batch, detached; see ``docs/losses.md``).
        **distance_options: passed to :func:`~rcl_dist.losses.distances.get_distance`
            (e.g. ``quantiles=256``, ``channels="separate"``).
    """

    def __init__(
        self, distance: str = "emd", temperature: float = 0.1, reduction: str = "sum",
        temperature_scale: str = "fixed", **distance_options,
    ):  # fmt: skip
        super().__init__()
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if temperature_scale not in TEMPERATURE_SCALES:
            raise ValueError(f"temperature_scale must be one of {TEMPERATURE_SCALES}, got {temperature_scale!r}")
        self.distance = get_distance(distance, **distance_options)
        self.temperature = float(temperature)
        self.reduction = reduction
        self.temperature_scale = temperature_scale

    def effective_temperature(self, dist: torch.Tensor, positive_index: torch.Tensor | None = None) -> torch.Tensor:
        """The divisor of the logits for this [B_q, K] distance matrix (a detached scalar tensor)."""
        if self.temperature_scale == "fixed":
            return torch.tensor(self.temperature, dtype=dist.dtype, device=dist.device)
        scale = dist.detach()[_negative_mask(dist, positive_index)].median().clamp(min=_MIN_SCALE)
        return self.temperature * scale

    def sketch(self, residual: torch.Tensor) -> torch.Tensor:
        return self.distance.sketch(residual)

    def distance_matrix(
        self, sketch_q: torch.Tensor, sketch_k: torch.Tensor, extra_negatives: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B_q, B_k + M] distances from every query sketch to every key sketch, extra negatives last."""
        keys = sketch_k if extra_negatives is None else torch.cat([sketch_k, extra_negatives.to(sketch_k.dtype)])
        return self.distance.pairwise(sketch_q, keys)

    def from_sketches(
        self,
        sketch_q: torch.Tensor,
        sketch_k: torch.Tensor,
        extra_negatives: torch.Tensor | None = None,
        positive_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 3 on sketches. ``positive_index[j]`` is the column of q_j's positive among the keys
        (default j: keys aligned with queries). The distributed trainer passes the keys of all workers
        and offsets the index by its rank's position in that gathered set."""
        dist = self.distance_matrix(sketch_q, sketch_k, extra_negatives)  # [B_q, B_k + M]
        return self.info_nce(dist, positive_index)

    def info_nce(self, dist: torch.Tensor, positive_index: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 3 from a [B_q, K] distance matrix; logits are -d/tau, the target is each query's positive."""
        if dist.shape[1] < 2:
            raise ValueError("the contrastive loss needs at least one negative (N+1 >= 2 images, or extra negatives)")
        positive_index = _positive_index(dist, positive_index)
        logits = -dist / self.effective_temperature(dist, positive_index)  # [B_q, K]; positive at positive_index
        return F.cross_entropy(logits, positive_index, reduction=self.reduction)

    def forward(
        self, res_q: torch.Tensor, res_k: torch.Tensor, extra_negatives: torch.Tensor | None = None
    ) -> torch.Tensor:
        """res_q, res_k: [N+1, C, H, W] residuals of the first and second crops of N+1 images;
        extra_negatives: [M, ...] sketches (already sketched with this loss's distance), detached or not."""
        if res_q.shape[0] != res_k.shape[0]:
            raise ValueError(f"res_q has {res_q.shape[0]} crops and res_k {res_k.shape[0]}: need one pair per image")
        return self.from_sketches(self.sketch(res_q), self.sketch(res_k), extra_negatives)


def _positive_index(dist: torch.Tensor, positive_index: torch.Tensor | None) -> torch.Tensor:
    if positive_index is None:  # keys aligned with queries: q_j's positive is k_j
        if dist.shape[1] < dist.shape[0]:
            raise ValueError(f"{dist.shape[0]} queries but only {dist.shape[1]} keys: pass positive_index")
        return torch.arange(dist.shape[0], device=dist.device)
    return positive_index.to(dist.device)


def _negative_mask(dist: torch.Tensor, positive_index: torch.Tensor | None) -> torch.Tensor:
    """[B_q, K] boolean: True at every (query, negative key) entry, False at each query's positive."""
    mask = torch.ones_like(dist, dtype=torch.bool)
    mask[torch.arange(dist.shape[0], device=dist.device), _positive_index(dist, positive_index)] = False
    return mask


@torch.no_grad()
def pair_distance_stats(dist: torch.Tensor, positive_index: torch.Tensor | None = None) -> dict[str, float]:
    """Mean distance of positive pairs and of negative pairs in a [B_q, K] distance matrix.

    Their gap (negative minus positive) is the quantity of the paper's Fig. 2: training should widen it.
    """
    neg_mask = _negative_mask(dist, positive_index)
    pos, neg = dist[~neg_mask].mean(), dist[neg_mask].mean()
    return {"dist_pos": pos.item(), "dist_neg": neg.item(), "dist_gap": (neg - pos).item()}
