"""Proxy validation during pre-training: the objective a sweep trial reports to Ray Tune.

The pretext loss is not the objective: a low contrastive loss does not mean good transfer. What a
sweep ranks is the paper's proxy evaluation (Sec. 4) on a *validation* split of the training data: a
copy of the network gets a fresh denoising last layer, fitted on ``labels`` seeded labelled crops
(:func:`rcl_dist.train.labels.build_label_set`) with :mod:`rcl_dist.train.probe`, then restores the
first ``val_images`` whole validation images from fixed noisy inputs
(:func:`rcl_dist.evaluate.make_test_pair`) and reports mean PSNR / SSIM. The same labels and inputs
for every trial; the copy never touches the training state. :class:`ProxyValidator` runs in one
process (rank 0) with no collective calls. The steps in detail: ``docs/probe.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from rcl_dist.config import Config, ConfigError

__all__ = ["ProxyObjective", "ProxyValidator", "validation_images"]


@dataclass
class ProxyObjective:
    """Settings of the proxy validation (the ``objective`` section of a search space)."""

    manifest: str = ""  # the pre-training manifest (labels and validation images come from its rows)
    labels: int = 64  # labelled crops for the fresh last layer
    fit: str = "lstsq+l1"  # how the fresh last layer is fitted (rcl_dist.train.probe.PROBE_FITS)
    steps: int = 150  # fit "adam" only: Adam steps of the fresh last layer
    batch_size: int = 16
    crop: int = 64  # side of the labelled crops (fixed for every trial, whatever crop it pre-trains on)
    lr: float = 1e-3  # Adam, Sec. 4
    seed: int = 0  # label set and fresh layer: the same for every trial
    label_split: str = "train"
    val_split: str = "val"
    val_images: int = 8  # whole validation images (the first ones by path)
    eval_seed: int = 0  # noise of the validation inputs
    tile: int = 256  # tiled whole-image inference

    def __post_init__(self) -> None:
        for name in ("labels", "steps", "batch_size", "val_images", "tile"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"objective.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.crop, bool) or not isinstance(self.crop, int) or self.crop < 8:
            raise ConfigError(f"objective.crop must be an integer >= 8, got {self.crop!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"objective.lr must be a number > 0, got {self.lr!r}")
        from rcl_dist.train.probe import PROBE_FITS

        if self.fit not in PROBE_FITS:
            raise ConfigError(f"objective.fit must be one of {list(PROBE_FITS)}, got {self.fit!r}")
        for name in ("label_split", "val_split"):
            if getattr(self, name) not in ("train", "val", "test"):
                raise ConfigError(f"objective.{name} must be one of ['train', 'val', 'test'], got {getattr(self, name)!r}")
        if self.val_split == self.label_split:
            raise ConfigError(f"objective.val_split and objective.label_split are both {self.val_split!r}: validate on held-out images")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validation_images(manifest: str | Path, split: str, limit: int) -> list[tuple[str, str]]:
    """(path, image_id) of the first ``limit`` rows of ``split`` (sorted by path); an empty split raises."""
    from rcl_dist.data.manifest import read_manifest

    table = read_manifest(manifest, split)
    rows = sorted(zip(table.column("path").to_pylist(), table.column("image_id").to_pylist()))
    if not rows:
        raise ConfigError(
            f"{manifest}: no {split!r} rows to validate on; index the training folder with a validation "
            "fraction (`rcl-dist data index DIR` draws ~10 % of images into 'val') or add a DIR:val folder"
        )
    return rows[:limit]


class ProxyValidator:
    """Call with the network being pre-trained: ``{"val_psnr", "val_ssim", "val_l1", "val_probe_converged",
    "val_seconds"}`` (``val_l1``: the label L1 of the fitted head)."""

    def __init__(self, objective: ProxyObjective | dict[str, Any], cfg: Config) -> None:
        self.objective = objective if isinstance(objective, ProxyObjective) else ProxyObjective(**objective)
        if not self.objective.manifest:
            raise ConfigError("objective.manifest is required (the pre-training manifest)")
        if cfg.model.raw is not None:
            raise ConfigError("proxy validation denoises RGB/grey images: model.raw must be null in a sweep")
        self.cfg = cfg
        self._labels = None
        self._val: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _spec(self):
        from rcl_dist.train.finetune_spec import FinetuneSpec

        o = self.objective
        return FinetuneSpec(
            source="none", config=self.cfg.to_dict(), task="denoise", mode="proxy", labels=o.labels, steps=o.steps,
            batch_size=o.batch_size, lr=o.lr, seed=o.seed, crop=o.crop, manifest=o.manifest, split=o.label_split,
            tracking=False, log_every=o.steps, fit=o.fit,
        )  # fmt: skip

    def _load(self, gray: bool) -> None:
        from rcl_dist.data.images import load_image
        from rcl_dist.evaluate import make_test_pair
        from rcl_dist.train.labels import build_label_set

        o, d = self.objective, self.cfg.data
        self._labels = build_label_set(self._spec(), None, gray)
        self._val = []
        for path, image_id in validation_images(o.manifest, o.val_split, o.val_images):
            clean = load_image(path, gray=gray)
            x, y = make_test_pair(
                clean, "denoise", image_id=image_id, seed=o.eval_seed, sigma_min=d.sigma_min, sigma_max=d.sigma_max,
                sampler=d.sampler,
            )  # fmt: skip
            self._val.append((x, y))

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from rcl_dist.infer import tiled_restore
        from rcl_dist.metrics import image_metrics
        from rcl_dist.train.finetune import fit_proxy, prepare_loaded_model

        t0 = time.perf_counter()
        device = next(model.parameters()).device
        gray = self.cfg.model.in_channels == 1
        if self._labels is None:
            self._load(gray)
        spec = self._spec()
        net = copy.deepcopy(model).float()
        prepare_loaded_model(net, self.cfg, spec)  # proxy: fine-tuning's fresh last layer
        last, trace = fit_proxy(net, self._labels, spec, device, reduce=False, verbose=False)
        net.eval()
        psnr, ssim = [], []
        with torch.no_grad():
            for x, y in self._val:
                pred = tiled_restore(net, x.unsqueeze(0).to(device), tile=self.objective.tile, overlap=16)
                m = image_metrics(pred.cpu(), y.unsqueeze(0))
                psnr.append(m["psnr"])
                ssim.append(m["ssim"])
        return {
            "val_psnr": float(np.mean(psnr)),
            "val_ssim": float(np.mean(ssim)),
            "val_l1": float(last["label_l1"]),
            "val_probe_converged": float(trace.converged),
            "val_seconds": time.perf_counter() - t0,
        }
