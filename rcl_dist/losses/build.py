"""Building the pre-training objective from a config: the one place where the method, alpha, tau,
the distance (Eq. 4, 9, 10) and the consistency encoder (Eq. 5) leave the config; both trainers
and the benchmarks call it."""

from __future__ import annotations

import torch
import torch.nn as nn

from rcl_dist.config import Config
from rcl_dist.losses.consistency import ConsistencyLoss, RawConsistencyLoss, build_encoder
from rcl_dist.losses.objectives import build_objective


def distance_options(cfg: Config) -> dict:
    lc = cfg.loss
    opts: dict = {"channels": lc.channels}
    if lc.distance == "emd":
        opts["quantiles"] = lc.quantiles
    elif lc.distance == "mmd" and lc.quantiles is not None:
        opts["samples"] = min(lc.quantiles, 32)  # MMD cost grows with samples^2 (see MMDDistance)
    return opts


def build_consistency_from_config(cfg: Config, encoder_weights: str | None = "from-config") -> nn.Module | None:
    """Eq. 11 for RAW models; Eq. 5 with the configured frozen encoder otherwise (None: no term).

    ``encoder_weights=None`` builds a randomly initialised encoder: tests only, never a silent default.
    """
    if cfg.model.raw is not None:
        return RawConsistencyLoss()
    if cfg.loss.encoder is None:
        return None
    kw = {} if cfg.loss.encoder_stage is None else {"stage": cfg.loss.encoder_stage}
    weights = cfg.loss.encoder_weights if encoder_weights == "from-config" else encoder_weights
    encoder = build_encoder(cfg.loss.encoder, weights=weights, **kw)
    return ConsistencyLoss(encoder, normalize=cfg.loss.consistency_normalize)


def build_objective_from_config(cfg: Config, consistency: nn.Module | None, generator: torch.Generator) -> nn.Module:
    lc = cfg.loss
    return build_objective(
        lc.method,
        distance=lc.distance,
        temperature=lc.temperature,
        reduction=lc.reduction,
        temperature_scale=lc.temperature_scale,
        alpha=lc.alpha,
        distance_options=distance_options(cfg),
        consistency=consistency,
        n2s_grid=lc.n2s_grid,
        nb2nb_gamma=lc.nb2nb_gamma,
        b2u_grid=lc.b2u_grid,
        generator=generator,
    )
