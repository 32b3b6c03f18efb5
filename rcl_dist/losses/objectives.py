"""The RCL training objective (Eq. 6) and one builder for every pre-training method.

    L_total = alpha * L_contrast + L_consistency                                        (Eq. 6)

L_contrast is Eq. 3 over the residuals of two overlapping crops per image (Algorithm 1); for RGB
models L_consistency is Eq. 5 with a frozen ImageNet encoder, for RAW -> RGB models it is Eq. 11.
All methods share the call ``objective(model, batch) -> dict`` (see :mod:`rcl_dist.losses.baselines`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from rcl_dist.losses.baselines import (
    Blind2UnblindObjective,
    ConsistencyOnlyObjective,
    Neighbor2NeighborObjective,
    Noise2NoiseObjective,
    Noise2SelfObjective,
    SupervisedObjective,
)
from rcl_dist.losses.contrastive import ResidualContrastiveLoss
from rcl_dist.losses.diagnostics import gradient_norms, logit_stats

__all__ = ["RCLObjective", "build_objective", "METHODS", "KeyGather"]

# A hook the distributed trainer supplies: local key sketches -> (keys of all workers, index of each
# local query's positive among them). Its gather must carry gradients back to every worker.
KeyGather = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class RCLObjective(nn.Module):
    """Eq. 6: ``alpha * contrastive + consistency`` on a batch ``{"q": crops_1, "k": crops_2}``.

    One forward pass of f over both crops ([2B, C, H, W]) gives the residuals (Eq. 2 / App. B.2 / D.3)
    and the restored images for the consistency term. ``consistency=None`` trains Eq. 3 alone.
    """

    required_keys = ("q", "k")

    def __init__(
        self, contrastive: ResidualContrastiveLoss, consistency: nn.Module | None = None, alpha: float = 1e-3
    ) -> None:
        super().__init__()
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        self.contrastive = contrastive
        self.consistency = consistency
        self.alpha = float(alpha)

    def forward(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        extra_negatives: torch.Tensor | None = None,
        key_gather: KeyGather | None = None,
        world_size: int = 1,
    ) -> dict[str, torch.Tensor]:
        """``key_gather`` (distributed training): local key sketches -> keys of all workers and the
        positives' indices. ``world_size``: DDP averages gradients over workers, so with
        ``reduction="sum"`` the contrastive term of ``"loss"`` is multiplied by the world size: the
        averaged gradient is then the gradient of Eq. 6 over the global batch (the consistency term,
        a mean, needs no factor). ``"contrast"`` reports this worker's unscaled term."""
        q, k = batch["q"], batch["k"]
        if q.shape != k.shape:
            raise ValueError(f"the two crops of a pair must have one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
        b = q.shape[0]
        x = torch.cat([q, k])  # [2B, C, H, W]
        out = model(x)
        res = model.residual(x, out)  # [2B, C, H, W]
        sketches = self.contrastive.sketch(res)
        s_q, s_k = sketches[:b], sketches[b:]
        keys, pos = (s_k, None) if key_gather is None else key_gather(s_k)
        dist = self.contrastive.distance_matrix(s_q, keys, extra_negatives)  # [B, K]
        l_contrast = self.contrastive.info_nce(dist, pos)
        result = {"contrast": l_contrast.detach(), "sketch_k": s_k.detach()}
        scale = world_size if self.contrastive.reduction == "sum" else 1
        loss = self.alpha * scale * l_contrast
        if self.consistency is not None:
            l_cons = self.consistency(x, model.restore(x, out))
            loss = loss + l_cons
            result["consistency"] = l_cons.detach()
        result["loss"] = loss
        tau = self.contrastive.effective_temperature(dist.detach(), pos)
        stats = logit_stats(dist.detach(), tau, pos, self.contrastive.reduction)  # pair distances, logit gap, uniform guess
        result.update({k_: torch.tensor(v) for k_, v in stats.items()})
        return result


    def gradient_diagnostics(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """``grad_contrast`` = alpha ||grad L_contrast||, ``grad_consistency`` = ||grad L_consistency||
        on the body's parameters, and ``grad_ratio`` = their quotient, on ``batch``.

        One extra forward of ``model`` (unwrapped from DDP: no gradient synchronisation, nothing
        accumulated into ``.grad``), with this batch's own keys as the only negatives, so on a worker
        of a distributed run it is that worker's term. Eq. 6 sums the two gradients: a ratio of 1e-4
        means the contrastive term moves no weights.
        """
        inner = getattr(model, "module", model)
        q, k = batch["q"], batch["k"]
        b = q.shape[0]
        x = torch.cat([q, k])
        out = inner(x)
        sketches = self.contrastive.sketch(inner.residual(x, out))
        terms = {"grad_contrast": self.alpha * self.contrastive.from_sketches(sketches[:b], sketches[b:])}
        if self.consistency is not None:
            terms["grad_consistency"] = self.consistency(x, inner.restore(x, out))
        norms = gradient_norms(terms, inner.body.parameters())
        if "grad_consistency" in norms:
            norms["grad_ratio"] = norms["grad_contrast"] / max(norms["grad_consistency"], 1e-30)
        return norms


METHODS = ("rcl", "consistency", "n2n", "n2s", "nb2nb", "b2u", "supervised")


def build_objective(
    method: str,
    *,
    distance: str = "emd",
    temperature: float = 0.1,
    reduction: str = "sum",
    temperature_scale: str = "fixed",
    alpha: float = 1e-3,
    distance_options: dict | None = None,
    consistency: nn.Module | None = None,
    n2s_grid: int = 4,
    nb2nb_gamma: float = 2.0,
    b2u_grid: int = 4,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """The objective of ``method`` in ``METHODS``; ``consistency`` is the Eq. 5 / Eq. 11 module."""
    if method == "rcl":
        contrastive = ResidualContrastiveLoss(distance, temperature, reduction, temperature_scale, **(distance_options or {}))
        return RCLObjective(contrastive, consistency, alpha)
    if method == "consistency":
        if consistency is None:
            raise ValueError("method 'consistency' needs a consistency loss module")
        return ConsistencyOnlyObjective(consistency)
    if method == "n2n":
        return Noise2NoiseObjective()
    if method == "n2s":
        return Noise2SelfObjective(n2s_grid, generator)
    if method == "nb2nb":
        return Neighbor2NeighborObjective(nb2nb_gamma, generator)
    if method == "b2u":
        return Blind2UnblindObjective(b2u_grid)
    if method == "supervised":
        return SupervisedObjective()
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
