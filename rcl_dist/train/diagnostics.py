"""Diagnostics both trainers log: the distance of the predicted residual to the known simulated noise
on a fixed probe of crops (what the paper's Fig. 2 caption says RCL contracts), the gradient-norm
ratio of the two loss terms, and the calibrated alpha that targets a ratio (``loss.alpha: auto``)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from rcl_dist.config import Config
from rcl_dist.data.images import load_image
from rcl_dist.data.sampler import PairSampler
from rcl_dist.losses.build import distance_options
from rcl_dist.losses.diagnostics import adapt_alpha, residual_noise_distance
from rcl_dist.losses.distances import get_distance
from rcl_dist.noise import NoiseParams


def noise_probe(cfg: Config, images: list[np.ndarray], params: NoiseParams | None = None, n: int = 16):
    """With ``loss.diagnostics`` on an RGB model with simulated noise: a function ``model ->
    {"noise_distance", "noise_rmse"}``, the loss's distance d(n_hat, n) and the RMS of n_hat - n
    between each crop's residual x - f(x) and the simulated noise it holds
    (:func:`residual_noise_distance`), on one fixed set of ``n`` crops of ``images`` drawn once (its
    own generator; ``params``: the images' own noise parameters, else drawn from ``data.sampler``), so
    the values at successive log steps are comparable. What the paper's Fig. 2 caption says RCL
    contracts, for every method. None otherwise (real noise is unknown)."""
    if not cfg.loss.diagnostics or cfg.model.raw is not None or cfg.data.noise == "none" or not images:
        return None
    gen = torch.Generator().manual_seed(cfg.train.seed + 7919)
    options = {"sigma_min": cfg.data.sigma_min, "sigma_max": cfg.data.sigma_max} if cfg.data.sampler in ("uniform", "gaussian") else None
    fixed = PairSampler(images, crop=cfg.data.crop, overlap=cfg.data.overlap, params=params, sampler=cfg.data.sampler,
                        sampler_options=options, generator=gen)  # fmt: skip
    batch = fixed.sample(min(n, len(images)), "rcl+noise")
    distance = get_distance(cfg.loss.distance, **distance_options(cfg))

    @torch.no_grad()
    def measure(model: nn.Module) -> dict[str, float]:
        dev, was_training = next(model.parameters()).device, model.training
        model.eval()  # batch-norm statistics (DnCNN) must not learn from the probe
        try:
            return residual_noise_distance(model.residual(batch["q"].to(dev)), batch["q_noise"].to(dev), distance)
        finally:
            model.train(was_training)

    return measure


def manifest_noise_probe(cfg: Config, manifest: str, n: int = 16):
    """:func:`noise_probe` on ``n`` images of a manifest's training split (the first by image id, large
    enough for the pair's parent crop) with their own (shot, read): the distributed trainer's version,
    whose DALI batches do not carry the noise. None where :func:`noise_probe` is None."""
    if not cfg.loss.diagnostics or cfg.model.raw is not None or cfg.data.noise == "none":
        return None
    from rcl_dist.data.manifest import read_manifest
    from rcl_dist.data.spec import crop_geometry

    parent = crop_geometry(cfg.data.crop, cfg.data.overlap)[1]
    rows = sorted(read_manifest(manifest, cfg.data.split).to_pylist(), key=lambda r: r["image_id"])
    rows = [r for r in rows if min(r["width"], r["height"]) >= parent][:n]
    images = [load_image(r["path"], gray=cfg.model.in_channels == 1) for r in rows]
    if not images:
        return None
    params = NoiseParams(torch.tensor([r["shot"] for r in rows], dtype=torch.float32),
                         torch.tensor([r["read"] for r in rows], dtype=torch.float32))  # fmt: skip
    return noise_probe(cfg, images, params, n)


def gradient_diagnostics(cfg: Config, objective: nn.Module, model: nn.Module, batch: dict) -> dict[str, float]:
    """The RCL objective's gradient norms (:meth:`RCLObjective.gradient_diagnostics`) when
    ``loss.diagnostics`` is on and the method is RCL; otherwise nothing. Every trainer calls this at
    its log steps, so the figures sit beside the loss in every record."""
    if not (cfg.loss.diagnostics and cfg.loss.method == "rcl" and hasattr(objective, "gradient_diagnostics")):
        return {}
    return objective.gradient_diagnostics(model, batch)


def calibrate_alpha(cfg: Config, objective: nn.Module, diagnostics: dict[str, float], *, jump: bool = False) -> float | None:
    """``loss.alpha_ratio``: move the objective's alpha (Eq. 6) towards the target gradient ratio
    (:func:`rcl_dist.losses.diagnostics.adapt_alpha`: at most x2 per call, ``jump``: all the way, once
    before training). Returns the new alpha, or None when the setting is off. In a distributed run
    pass the diagnostics averaged over the workers, so that every worker sets the same alpha."""
    target = cfg.loss.alpha_ratio
    if target is None:
        return None
    if "grad_ratio" not in diagnostics:
        raise ValueError("loss.alpha_ratio needs the consistency term (loss.encoder, or a RAW model's Eq. 11): "
                         "without it there is no gradient ratio to set alpha from")  # fmt: skip
    objective.alpha = adapt_alpha(objective.alpha, diagnostics["grad_ratio"], target, math.inf if jump else 2.0)
    return objective.alpha
