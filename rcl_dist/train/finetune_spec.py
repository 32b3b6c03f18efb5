"""What one fine-tuning run is (Sec. 4-5): :class:`FinetuneSpec`, checked on construction, and its result.

Shared by the one-process trainer (:mod:`rcl_dist.train.finetune`), the Ray Train workers
(:mod:`rcl_dist.train.finetune_ray`), the labelled set (:mod:`rcl_dist.train.labels`) and the
sweep's proxy validation. Every path it holds is made absolute, because Ray workers run in another
working directory.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from rcl_dist.config import Config, ConfigError, check_choice, check_int_at_least
from rcl_dist.models.heads import SR_SKIPS
from rcl_dist.train.probe import PROBE_FITS
from rcl_dist.train.schedule import SCHEDULES

__all__ = ["FinetuneSpec", "FinetuneResult", "FINETUNE_TASKS", "FINETUNE_MODES", "HEAD_CHOICES"]

FINETUNE_TASKS = ("denoise", "sr", "jdensr", "jdd", "real")
AUGMENTS = ("auto", "none", "dihedral", "dihedral+channels")
FINETUNE_MODES = ("proxy", "full")
HEAD_CHOICES = ("auto", "new", "keep")


@dataclass
class FinetuneSpec:
    """Everything one fine-tuning run needs; validated on construction (errors name the field)."""

    source: str  # pre-training checkpoint (file or folder holding state.pt), or "none": random init from `config`
    task: str = "denoise"  # denoise | sr | jdensr | jdd | real
    mode: str = "proxy"  # proxy (freeze all but a fresh last layer, Sec. 4) | full (fine-tune all, Sec. 5)
    labels: int = 100  # N: exactly this many labelled training crops
    steps: int = 1000  # Adam steps
    batch_size: int = 16  # global batch (divided among the workers; at most `labels` are used)
    lr: float = 1e-3  # Adam, Sec. 4
    seed: int = 0  # label set, fresh head's initialisation, batch order
    crop: int = 64  # side of the target crops (HR side for sr/jdensr; even for jdd)
    manifest: str = ""  # the labelled images (rcl-dist data index)
    split: str = "train"  # manifest rows the labels are drawn from
    simulated_dir: str | None = None  # realisation="fixed": stored realisations (rcl-dist data simulate)
    realisation: str = "fresh"  # noise of the label inputs: "fresh" (drawn once per label) or "fixed"
    config: dict[str, Any] | None = None  # source="none": the architecture (a Config dict; its model section counts)
    head: str = "auto"  # full mode: "auto" (keep the last layer when the output form matches), "new", "keep"
    # full mode: fit the last layer with the probe (body frozen, as in proxy mode) before the Adam steps
    # on the whole network: linear probing then fine-tuning (LP-FT; Kumar et al., ICLR 2022), so the
    # first steps do not distort pre-trained features through a poorly fitted head
    probe_first: bool = False
    # full mode: each labelled pair seen under a random symmetry of the task: "dihedral" (one of the 8
    # rotations / flips, on input and target alike), "dihedral+channels" (and a permutation of the RGB
    # channels), "none"; "auto": dihedral+channels for RGB inputs, dihedral for grey, none for packed RAW
    # (jdd: a flip moves the Bayer phase). See rcl_dist.train.labels.augment_pairs.
    augment: str = "auto"
    workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    label_threads: int = 0  # DataLoader workers that read the label crops (0: in the training process)
    # proxy mode: how the fresh last layer is fitted (rcl_dist.train.probe): "lstsq+l1" (closed-form
    # ridge least squares, then IRLS towards L1 until the label L1 settles), "lstsq", or "adam"
    # (`steps` Adam steps from the random init: the old procedure, for comparison only)
    fit: str = "lstsq+l1"
    ridge: float = 1e-6  # probe: lambda = ridge * mean(diag(X^T X))
    probe_tol: float = 1e-4  # probe: relative L1 improvement over 3 IRLS iterations that counts as converged
    probe_max_iters: int = 30  # probe: IRLS iteration cap
    schedule: str = "constant"  # full mode (and fit "adam"): learning rate "constant" (Sec. 4) or "cosine" to 0
    warmup: int = 0  # linear learning-rate warm-up steps (full mode)
    # full mode: the gradient's global L2 norm is clipped to this before each Adam step (None: off). At 1.0
    # it acts only on spikes (the L1 gradient of a U-Net 16/3 is ~0.1-0.8 in stable training); unclipped,
    # a spike of 42 made SL from scratch on 1000 labels forget everything it had learnt and end at its
    # input (benchmarks/results/finetune_clip_cpu.md)
    grad_clip: float | None = 1.0
    # tasks sr / jdensr, a fresh last layer: "bicubic" (restored = bicubic_up(x) + head(body(x)), so the
    # head learns the detail over interpolation and a zero head is the bicubic baseline) or "none" (the
    # head predicts the HR image; every proxy of a 16-wide U-Net sat below bicubic that way)
    sr_skip: str = "bicubic"
    log_every: int = 10  # steps between metric reports
    tracking: bool = True  # False: no MLflow
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or the local store under $RCL_DIST_HOME
    experiment: str = "rcl-finetune"
    run_name: str | None = None  # Ray Train run name (and MLflow run name); None: finetune-<time>
    storage_path: str | None = None  # Ray results (None: $RCL_DIST_HOME/ray_results)
    out: str | None = None  # also copy the fine-tuned checkpoint here (a folder, or a .pt file)

    def __post_init__(self) -> None:
        if isinstance(self.config, Config):
            self.config = self.config.to_dict()
        for name in ("source", "manifest"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        for name in ("simulated_dir", "out", "storage_path"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        # Ray workers run in another working directory: every path they read is made absolute here
        for name in ("source", "manifest", "simulated_dir", "out", "storage_path"):
            value = getattr(self, name)
            if isinstance(value, str) and value and not (name == "source" and value == "none"):
                setattr(self, name, os.path.abspath(os.path.expanduser(value)))
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"source must be a checkpoint path or 'none', got {self.source!r}")
        check_choice("task", self.task, FINETUNE_TASKS)
        check_choice("mode", self.mode, FINETUNE_MODES)
        check_choice("head", self.head, HEAD_CHOICES)
        check_choice("split", self.split, ("train", "val", "test"))
        check_choice("realisation", self.realisation, ("fresh", "fixed"))
        check_choice("fit", self.fit, PROBE_FITS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("augment", self.augment, AUGMENTS)
        check_choice("sr_skip", self.sr_skip, SR_SKIPS)
        if self.task == "jdd" and self.augment not in ("auto", "none"):
            raise ConfigError(f"augment {self.augment!r} does not apply to task 'jdd' (packed RAW: a flip or a channel "
                              "permutation moves the Bayer phase): use 'auto' or 'none'")  # fmt: skip
        check_int_at_least("probe_max_iters", self.probe_max_iters, 1)
        check_int_at_least("warmup", self.warmup, 0)
        for name in ("ridge", "probe_tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
            setattr(self, name, float(v))
        check_int_at_least("labels", self.labels, 1)
        check_int_at_least("steps", self.steps, 1)
        check_int_at_least("batch_size", self.batch_size, 1)
        check_int_at_least("seed", self.seed, 0)
        check_int_at_least("crop", self.crop, 8)
        check_int_at_least("workers", self.workers, 1)
        check_int_at_least("label_threads", self.label_threads, 0)
        check_int_at_least("log_every", self.log_every, 1)
        if self.warmup >= self.steps:
            raise ConfigError(f"warmup {self.warmup} must be smaller than steps {self.steps}")
        if self.grad_clip is not None:
            if isinstance(self.grad_clip, bool) or not isinstance(self.grad_clip, (int, float)) or not 0 < self.grad_clip < float("inf"):
                raise ConfigError(f"grad_clip must be a finite number > 0 or null (off), got {self.grad_clip!r}")
            self.grad_clip = float(self.grad_clip)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"lr must be a number > 0, got {self.lr!r}")
        self.lr = float(self.lr)
        if isinstance(self.cpus_per_worker, bool) or not isinstance(self.cpus_per_worker, (int, float)) or not self.cpus_per_worker > 0:
            raise ConfigError(f"cpus_per_worker must be a number > 0, got {self.cpus_per_worker!r}")
        if self.task in ("sr", "jdensr", "jdd") and self.crop % 2:
            raise ConfigError(f"crop must be even for task {self.task!r} (x2 resolution / RGGB phase), got {self.crop}")
        if self.task == "jdensr" and self.realisation == "fixed":
            raise ConfigError("realisation 'fixed' does not apply to task 'jdensr' (noise is added to the LR image): use 'fresh'")
        if not isinstance(self.manifest, str) or not self.manifest:
            raise ConfigError("manifest is required: the labelled images (create one with `rcl-dist data index`)")
        if self.labels % self.workers:
            raise ConfigError(
                f"labels {self.labels} must be divisible by workers {self.workers} (each worker holds an equal share of the labels)"
            )
        if self.batch_size % self.workers:
            raise ConfigError(f"batch_size {self.batch_size} (global) must be divisible by workers {self.workers}")
        if not isinstance(self.probe_first, bool):
            raise ConfigError(f"probe_first must be true or false, got {self.probe_first!r}")
        if self.probe_first and self.mode != "full":
            raise ConfigError("probe_first applies to mode 'full' (proxy mode fits only the last layer anyway)")
        if self.probe_first and self.fit == "adam":
            raise ConfigError("probe_first (--probe-first) fits the last layer in closed form: use fit 'lstsq+l1' or "
                              "'lstsq', not 'adam'")
        if self.mode == "proxy" and self.head == "keep":
            raise ConfigError("head 'keep' contradicts mode 'proxy': proxy evaluation replaces the last layer with a fresh one")
        if self.is_random_init:
            if self.config is None:
                raise ConfigError("source 'none' needs config: the architecture to initialise randomly (the pre-training config)")
        if self.config is not None:
            if not isinstance(self.config, dict):
                raise ConfigError(f"config must be a Config or its dict, got {type(self.config).__name__}")
            self.config = Config.from_dict(self.config).to_dict()  # validated, every field present
        if not self.experiment:
            raise ConfigError("experiment must not be empty")

    @property
    def is_random_init(self) -> bool:
        return self.source.lower() == "none"

    @property
    def per_worker_batch(self) -> int:
        """Crops per worker and step: batch_size / workers, at most that worker's share of the labels."""
        return min(self.batch_size // self.workers, self.labels // self.workers)

    @property
    def effective_batch_size(self) -> int:
        return self.per_worker_batch * self.workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown fine-tuning field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)


@dataclass
class FinetuneResult:
    run_name: str
    metrics: dict[str, Any] | None  # the last report: loss, label_l1, label_l1_initial, step, ...
    checkpoint_path: str | None  # the fine-tuned checkpoint file (spec.out's copy when given)
    ray_checkpoint_path: str | None  # Ray's checkpoint folder
    mlflow_run_id: str | None
    tracking_uri: str | None
    seconds: float
