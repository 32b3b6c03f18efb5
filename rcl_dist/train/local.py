"""Single-process pre-training: the core of the product without Ray, DALI or MLflow.

Used by ``rcl-dist demo`` and the behaviour tests. The distributed trainer (Ray Train) runs the same
objective built by the same functions; only the data path and the gathering of negatives differ.

Both trainers share the objective's builder (:mod:`rcl_dist.losses.build`), the safety checks
(:mod:`rcl_dist.train.guards`) and the diagnostics (:mod:`rcl_dist.train.diagnostics`).
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from rcl_dist.config import Config
from rcl_dist.data.images import bundled_images, list_images, load_image, shared_data_dir, tile
from rcl_dist.data.sampler import PairSampler
from rcl_dist.models import Restorer
from rcl_dist.models.factory import build_model_from_config
from rcl_dist.losses.build import build_consistency_from_config, build_objective_from_config
from rcl_dist.train.diagnostics import calibrate_alpha, gradient_diagnostics, noise_probe
from rcl_dist.train.guards import NonFiniteGuard, check_finite_weights, check_memory
from rcl_dist.train.schedule import lr_factor

__all__ = ["load_images", "train_local", "History"]


def load_images(cfg: Config) -> list[np.ndarray]:
    """The configured images as [C, H, W] float32 arrays (tiled when ``data.tile`` > 0): the rows of
    ``data.split`` of ``data.manifest`` when one is given (as the distributed trainer reads it), else
    ``data.source``."""
    d, gray = cfg.data, cfg.model.in_channels == 1
    if d.manifest:
        from rcl_dist.data.manifest import manifest_noise, read_manifest

        path = Path(d.manifest).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.manifest: {path} does not exist (create it with `rcl-dist data index`)")
        if manifest_noise(path) != d.noise:
            raise ValueError(f"data.manifest: {path} was indexed with --noise {manifest_noise(path)}, but "
                             f"data.noise={d.noise}: set data.noise={manifest_noise(path)}")  # fmt: skip
        files = read_manifest(path, d.split).column("path").to_pylist()
        if not files:
            raise ValueError(f"data.manifest: {path} has no images of split data.split={d.split!r}")
        images = [load_image(p, gray=gray) for p in files]
    elif d.source == "bundled":
        if d.noise == "none":
            raise ValueError("data.noise=none uses the files as real noisy photographs, and the bundled images are "
                             "clean: set data.source to a folder of noisy photographs, or data.noise=simulated")  # fmt: skip
        images = bundled_images(gray=gray)
    else:
        if d.source.startswith("shared:"):
            root = shared_data_dir()
            if root is None:
                raise FileNotFoundError(f"data.source={d.source!r}: no shared/data folder (set RCL_DIST_DATA)")
            folder = root / d.source.split(":", 1)[1]
        else:
            folder = d.source
        files = list_images(folder)
        if d.noise == "none":  # the clean *_mean references of a real pair folder are not noisy photographs
            files = [p for p in files if not Path(p).stem.endswith("_mean")]
        images = [load_image(p, gray=gray) for p in files]
        if not images:
            raise FileNotFoundError(f"data.source={d.source!r}: no images in {folder}")
    if d.tile:
        images = tile(images, d.tile)
    if d.max_images:
        images = images[: d.max_images]
    return images


@dataclass
class History:
    """Metrics recorded every ``log_every`` steps (each list has one entry per record)."""

    step: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, step: int, values: dict[str, float]) -> None:
        self.step.append(step)
        for k, v in values.items():
            self.metrics.setdefault(k, []).append(v)


def train_local(
    cfg: Config,
    images: list[np.ndarray] | None = None,
    model: Restorer | None = None,
    consistency: nn.Module | None | str = "from-config",
    log: Callable[[str], None] | None = print,
) -> tuple[Restorer, History]:
    """Pre-train ``model`` (built from ``cfg`` when None) for ``cfg.train.steps`` Adam steps."""
    t = cfg.train
    # CPU convolutions slow down 10-40x on subnormal floats, which appear in weights and gradients
    # after a few dozen Adam steps (measured here: 0.1 s -> 3.7 s per step); flushing them to zero
    # changes no result at float32 precision. A no-op where unsupported.
    torch.set_flush_denormal(True)
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    if model is None:
        check_memory(cfg)  # before the images and the model take any of it
    images = load_images(cfg) if images is None else images
    sampler = PairSampler(
        images,
        crop=cfg.data.crop,
        overlap=cfg.data.overlap,
        sampler=cfg.data.sampler,
        sampler_options={"sigma_min": cfg.data.sigma_min, "sigma_max": cfg.data.sigma_max}
        if cfg.data.sampler in ("uniform", "gaussian")
        else None,
        generator=gen,
        noise=cfg.data.noise,
    )
    model = build_model_from_config(cfg) if model is None else model
    if consistency == "from-config":
        consistency = build_consistency_from_config(cfg) if cfg.loss.method in ("rcl", "consistency") else None
    objective = build_objective_from_config(cfg, consistency, gen)
    kind = {"rcl": "rcl", "consistency": "rcl", "n2n": "n2n", "n2s": "clean", "nb2nb": "clean", "b2u": "clean",
            "supervised": "clean"}[cfg.loss.method]
    opt = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps
    )
    history = History()
    probe = noise_probe(cfg, images, sampler.params)
    guard = NonFiniteGuard(t.nonfinite_limit)
    model.train()
    if cfg.loss.alpha_ratio is not None:  # alpha from the gradient ratio at the start (its own batch)
        calibrate_alpha(cfg, objective, gradient_diagnostics(cfg, objective, model, sampler.sample(t.batch_size, kind)), jump=True)
    start = time.perf_counter()
    for step in range(1, t.steps + 1):
        batch = sampler.sample(t.batch_size, kind)
        for g in opt.param_groups:
            g["lr"] = t.lr * lr_factor(t.schedule, step, t.steps, t.warmup)
        if hasattr(objective, "set_progress"):  # schedules that follow training progress (Blind2Unblind)
            objective.set_progress(step, t.steps)
        out = objective(model, batch)
        opt.zero_grad(set_to_none=True)
        if not guard.check(bool(torch.isfinite(out["loss"].detach()).all()), step):
            out["loss"].backward()
            if t.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
        if step % t.log_every == 0 or step == 1 or step == t.steps:
            values = {k: float(v.detach()) for k, v in out.items() if v.dim() == 0}
            values.update(gradient_diagnostics(cfg, objective, model, batch))
            if probe is not None:
                values.update(probe(model))
            if cfg.loss.alpha_ratio is not None:
                values["alpha"] = objective.alpha  # the alpha this step trained with
                calibrate_alpha(cfg, objective, values)
            history.add(step, values)
            if log is not None:
                log(f"step {step:5d}  " + "  ".join(f"{k} {v:.5g}" for k, v in values.items()))
    history.seconds = time.perf_counter() - start
    check_finite_weights(model, t.steps)
    return model, history
