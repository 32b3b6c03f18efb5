"""The run's safety checks, shared by the single-process and the Ray Train trainer: a step whose loss
is NaN/inf is skipped (:class:`NonFiniteGuard`; ``train.nonfinite_limit`` in a row stop the run with
:class:`NonFiniteError`), no run ends with or saves NaN weights (:func:`check_finite_weights`), and a
model and batch whose estimated training memory exceeds what this machine has free are refused before
anything is built, naming the keys (:func:`check_memory`)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from rcl_dist.config import Config, ConfigError
from rcl_dist.models.factory import build_model_from_config


# Images each optimiser step passes through the model, per batch image: RCL-style methods run both crops.
# Blind2Unblind: its g*g masked copies with gradients.
_FORWARDS = {"rcl": 2, "consistency": 2, "n2n": 1, "n2s": 1, "nb2nb": 1, "supervised": 1}


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
