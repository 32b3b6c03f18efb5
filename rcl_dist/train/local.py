"""Single-process pre-training: the core of the product without Ray, DALI or MLflow.

Used by ``rcl-dist demo`` and the behaviour tests. The distributed trainer (Ray Train) runs the same
objective built by the same functions; only the data path and the gathering of negatives differ.

Both trainers share the run's safety checks, defined here: :class:`NonFiniteGuard` (a step whose
loss is NaN/inf is skipped, ``train.nonfinite_limit`` in a row stop the run with
:class:`NonFiniteError`), :func:`check_finite_weights` (no run ends with, or saves, NaN weights) and
:func:`check_memory` (a model and batch whose estimated training memory exceeds what this machine
has free are refused before anything is built, naming the keys).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from rcl_dist.config import Config, ConfigError
from rcl_dist.data.images import bundled_images, list_images, load_image, shared_data_dir, tile
from rcl_dist.data.sampler import PairSampler
from rcl_dist.losses.consistency import ConsistencyLoss, RawConsistencyLoss, build_encoder
from rcl_dist.losses.diagnostics import adapt_alpha, residual_noise_distance
from rcl_dist.losses.distances import get_distance
from rcl_dist.losses.objectives import build_objective
from rcl_dist.models import Restorer
from rcl_dist.models.factory import build_model_from_config
from rcl_dist.noise import NoiseParams
from rcl_dist.train.schedule import lr_factor

__all__ = [
    "build_objective_from_config",
    "load_images",
    "train_local",
    "History",
    "NonFiniteError",
    "NonFiniteGuard",
    "check_finite_weights",
    "estimate_training_memory",
    "available_memory",
    "check_memory",
]

# Images each optimiser step passes through the model, per batch image: RCL-style methods run both crops.
# Blind2Unblind: its g*g masked copies with gradients.
_FORWARDS = {"rcl": 2, "consistency": 2, "n2n": 1, "n2s": 1, "nb2nb": 1, "supervised": 1}


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
        distance_options=_distance_options(cfg),
        consistency=consistency,
        n2s_grid=lc.n2s_grid,
        nb2nb_gamma=lc.nb2nb_gamma,
        b2u_grid=lc.b2u_grid,
        generator=generator,
    )


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
    distance = get_distance(cfg.loss.distance, **_distance_options(cfg))

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


class NonFiniteError(RuntimeError):
    """Training stopped because the loss or the weights are no longer finite numbers."""


class NonFiniteGuard:
    """Skip steps whose loss is not finite; stop after ``limit`` in a row with a clear error.

    ``check(finite, step)`` returns True when the step must be skipped. The error leaves the run's
    last good checkpoint in place (Ray keeps it), from which ``--resume`` continues. Every trainer
    (:func:`train_local`, the Ray Train worker) uses this one guard.
    """

    def __init__(self, limit: int, skipped: int = 0) -> None:
        self.limit, self.skipped, self.in_a_row = limit, skipped, 0

    def check(self, finite: bool, step: int) -> bool:
        if finite:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} non-finite losses in a row at step {step} (train.nonfinite_limit={self.limit}); "
                "the last good checkpoint is kept: lower train.lr or set train.grad_clip, then resume"
            )
        return True


def check_finite_weights(model: nn.Module, step: int) -> None:
    """:class:`NonFiniteError` naming the first parameter that holds NaN/inf: a run must not end with
    (or save) such weights (a finite loss can still give infinite gradients on its last step)."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise NonFiniteError(
            f"non-finite weights after step {step} ({len(bad)} parameter tensors, the first {bad[0]}); "
            "nothing is saved: lower train.lr or set train.grad_clip"
        )


def estimate_training_memory(cfg: Config, batch: int) -> tuple[int, int]:
    """(bytes of weights + gradients + Adam's two moments, bytes of activations) of one training
    process running ``batch`` images of ``data.crop`` pixels a step.

    The model is built on PyTorch's ``meta`` device (shapes only: nothing allocated, any size) and run
    once on a meta batch; every leaf module's output counts twice (kept for backward, and its
    gradient). A lower bound: the loss's own tensors and the frozen encoder of Eq. 5 come on top.
    """
    with torch.device("meta"):
        model = build_model_from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    crop, raw = cfg.data.crop, cfg.model.raw
    channels = {None: cfg.model.in_channels, "mosaic": 1, "packed": 4}[raw]
    side = crop // 2 if raw == "packed" else crop
    images = batch * (cfg.loss.b2u_grid**2 if cfg.loss.method == "b2u" else _FORWARDS.get(cfg.loss.method, 2))
    elements = 0

    def count(_module: nn.Module, _inputs: tuple, output: object) -> None:
        nonlocal elements
        if isinstance(output, torch.Tensor):
            elements += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if next(m.children(), None) is None]
    try:
        with torch.no_grad():
            model(torch.empty(images, channels, side, side, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return 4 * 4 * params, 4 * 2 * elements


def available_memory() -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable, capped by a cgroup v2 memory
    limit (containers); None when neither can be read."""
    found: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            found.append(int(limit) - int(open("/sys/fs/cgroup/memory.current").read().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(cfg: Config, workers: int = 1) -> None:
    """:class:`ConfigError` when ``workers`` training processes on this machine (each with its share of
    ``train.batch_size``) need more memory than is available (:func:`estimate_training_memory`)."""
    free = available_memory()
    if free is None:
        return
    per_worker = max(1, cfg.train.batch_size // workers)
    weights, activations = estimate_training_memory(cfg, per_worker)
    need = workers * (weights + activations)
    if need > free:
        gib = 1 << 30
        raise ConfigError(
            f"model.width={cfg.model.width}, model.depth={cfg.model.depth}, data.crop={cfg.data.crop}, "
            f"train.batch_size={cfg.train.batch_size}" + (f", dist.workers={workers}" if workers > 1 else "")
            + f": training needs at least {need / gib:.1f} GiB ({workers} x ({weights / gib:.2f} GiB of weights, "
            f"gradients and Adam state + {activations / gib:.2f} GiB of activations)), more than the "
            f"{free / gib:.1f} GiB of memory available here; lower one of these"
        )


def _distance_options(cfg: Config) -> dict:
    lc = cfg.loss
    opts: dict = {"channels": lc.channels}
    if lc.distance == "emd":
        opts["quantiles"] = lc.quantiles
    elif lc.distance == "mmd" and lc.quantiles is not None:
        opts["samples"] = min(lc.quantiles, 32)  # MMD cost grows with samples^2 (see MMDDistance)
    return opts


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
