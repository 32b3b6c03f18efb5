"""Fine-tuning with few labels: the proxy evaluation of Sec. 4 and the label-efficiency study of Sec. 5.

A fine-tuning run takes a pre-training checkpoint (or ``source="none"``: a randomly initialised
network of the same architecture, the "no pre-training" baseline), puts a task layer on it and trains
with L1 and Adam (lr 1e-3, betas (0.9, 0.999), eps 1e-7, Sec. 4) on exactly ``spec.labels`` labelled
crops. This module holds all of it and runs it in one process (``finetune_local``);
:func:`rcl_dist.train.finetune_ray.run_finetune` runs the same on ``spec.workers`` Ray Train workers
(DDP), tracked in MLflow.

Modes
-----
* ``proxy`` (Sec. 4, "proxy evaluation"): every weight except the last layer's is frozen, and the
  pre-trained last layer is replaced with a randomly initialised task layer; only that layer is
  trained (Adam sees only its parameters). The body also stays in eval mode (batch-norm statistics
  of DnCNN do not move), so the intermediate representations are exactly the pre-trained ones.
* ``full`` (Sec. 5, "RCL vs. SL" / "label-efficient learning"): the whole pre-trained network is
  fine-tuned. The last layer is kept when the task's output has the pre-training output's form
  (``head="auto"``): denoising and real pairs on RGB/grey models (f(x) is the clean image in
  pre-training too) and ``jdd`` on RAW models (pre-training already maps RAW to full-resolution RGB,
  App. B.2). For ``sr``/``jdensr`` the output has another shape, so a fresh ``sr2`` layer is put on.
  ``head="new"`` always puts a fresh layer on; ``head="keep"`` insists on keeping it.

Task layers (``task_head``)

    ==========  ============  =============================  ============================
    task        model input   head (kind, out channels)      output
    ==========  ============  =============================  ============================
    denoise     RGB / grey    rgb, C_in                      [B, C_in, c, c]
    real        RGB / grey    rgb, C_in                      [B, C_in, c, c]
    sr, jdensr  RGB / grey    sr2, C_in                      [B, C_in, c, c] from c/2 input
    jdd         raw=packed    raw2rgb, 3                     [B, 3, c, c] from [B, 4, c/2, c/2]
    jdd         raw=mosaic    rgb, 3                         [B, 3, c, c] from [B, 1, c, c]
    ==========  ============  =============================  ============================

A RAW model cannot take the RGB tasks' inputs and an RGB model cannot take RAW input: such a pairing
is a ``ValueError`` before any worker starts.

The labelled set
----------------
``build_label_set``: exactly ``labels`` (input, target) crops, a pure function of (manifest, split,
task, crop, seed, realisation, the model's input layout): label ``i`` is the sample
``ManifestPairs[(e, perm_e[j])]`` with ``e, j = divmod(i, n_images)`` and ``perm_e`` a permutation
of the images seeded by (seed, e). So the first ``n_images`` labels are distinct images in a seeded
order, more labels cycle over the images again at new crop positions (and new noise), and the labels
of a smaller N are the first N of a larger one (nested label sets, as in Table 3). The set does not
depend on the method, the mode or the number of workers: every method compared at one N sees the
same crops. Rank ``r`` of ``w`` holds labels ``r, r + w, ...`` (``labels`` must be divisible by
``workers``: equal shards, no padding); it builds only those, so memory per worker is N/w crops.

Why in memory and not DALI: the labelled set is tiny and fixed (the point of the study is few labels);
it is built once per worker, then every step is an index into tensors. DALI's pipelines draw fresh
crops (and noise) every epoch, which would turn N labels into an unbounded number of distinct pairs.

Batches: each rank draws ``min(batch_size / workers, labels / workers)`` distinct crops per step
from seeded permutations of its shard (a new permutation when one is used up; the rest of a
permutation too short for a batch is dropped). The global batch is therefore at most ``labels``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rcl_dist.config import Config, ConfigError, check_choice, check_int_at_least
from rcl_dist.train.probe import PROBE_FITS, ProbeOptions, ProbeTrace, fit_head
from rcl_dist.train.schedule import SCHEDULES, lr_factor

__all__ = [
    "FinetuneSpec",
    "FinetuneResult",
    "LabelSet",
    "FINETUNE_TASKS",
    "FINETUNE_MODES",
    "task_head",
    "head_kind",
    "prepare_finetune_model",
    "label_pair_spec",
    "build_label_set",
    "label_l1",
    "train_on_labels",
    "finetune_local",
    "make_optimizer",
    "checkpoint_extra",
]

FINETUNE_TASKS = ("denoise", "sr", "jdensr", "jdd", "real")
FINETUNE_MODES = ("proxy", "full")
HEAD_CHOICES = ("auto", "new", "keep")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-7  # Sec. 4


# ------------------------------------------------------------------------------------------ the spec


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


# ------------------------------------------------------------------------------------------ the model


def head_kind(head: nn.Module) -> str:
    """The :func:`rcl_dist.models.heads.make_head` kind of an installed last layer."""
    from rcl_dist.models.heads import RawToRGBHead, RGBHead, SRHead

    if isinstance(head, RawToRGBHead):
        return "raw2rgb"
    if isinstance(head, SRHead):
        return "sr2" if head.scale == 2 else f"sr{head.scale}"
    if isinstance(head, RGBHead):
        return "rgb"
    raise ValueError(f"unknown last layer {type(head).__name__}")


def task_head(model: nn.Module, cfg: Config, task: str) -> tuple[str, int]:
    """(head kind, output channels) of ``task`` for this model; ValueError for an impossible pairing."""
    check_choice("task", task, FINETUNE_TASKS)
    raw = getattr(model, "raw", None)
    if task == "jdd":
        if raw == "packed":
            return "raw2rgb", 3
        if raw == "mosaic":
            return "rgb", 3
        raise ValueError(
            f"task 'jdd' (joint denoising and demosaicing) needs a RAW model (model.raw 'packed' or 'mosaic'); "
            f"this {cfg.model.name} takes {cfg.model.in_channels}-channel RGB/grey input: pre-train with model.raw set"
        )
    if raw is not None:
        raise ValueError(
            f"task {task!r} needs an RGB/grey-input model; this one takes RAW input (model.raw={raw!r}): use task 'jdd'"
        )
    c = cfg.model.in_channels
    if c not in (1, 3):
        raise ValueError(f"task {task!r} needs a 1- or 3-channel model, this one has in_channels={c}")
    return ("sr2" if task in ("sr", "jdensr") else "rgb"), c


@contextlib.contextmanager
def _seeded(seed: int):
    """Run weight initialisation from ``seed`` without touching the caller's global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % (1 << 62))
        yield


def _load_source(spec: FinetuneSpec, map_location: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """The pre-trained model and its Config (or a randomly initialised one for source='none')."""
    from rcl_dist.models.io import load_checkpoint
    from rcl_dist.models.factory import build_model_from_config

    if spec.is_random_init:
        cfg = Config.from_dict(spec.config)
        from rcl_dist.data.spec import derived_seed

        with _seeded(derived_seed(spec.seed, "finetune-init")):
            return build_model_from_config(cfg), cfg
    model, cfg, _ = load_checkpoint(spec.source, map_location=map_location)
    if spec.config is not None:
        given = Config.from_dict(spec.config).model
        if given != cfg.model:
            diff = sorted(k for k, v in dataclasses.asdict(given).items() if getattr(cfg.model, k) != v)
            raise ConfigError(
                f"config's model section differs from the checkpoint's in {diff} ({spec.source}); "
                "a checkpoint brings its own architecture: leave config out or match it"
            )
    return model, cfg


def prepare_finetune_model(
    spec: FinetuneSpec, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Config, dict[str, Any], list[nn.Parameter]]:
    """(model ready for fine-tuning, its Config, head record {"kind", "out_channels", "fresh"}, trainable params).

    proxy: a fresh task layer, everything else frozen (:meth:`Restorer.freeze_all_but_head`).
    full: everything trainable; the last layer kept or replaced as the module docstring says.
    The fresh layer's initialisation is a function of ``spec.seed`` alone (the same for every source).
    """
    model, cfg = _load_source(spec, map_location)
    head, params = prepare_loaded_model(model, cfg, spec)
    return model, cfg, head, params


def prepare_loaded_model(model: nn.Module, cfg: Config, spec: FinetuneSpec) -> tuple[dict[str, Any], list[nn.Parameter]]:
    """:func:`prepare_finetune_model` on a model already in hand (changed in place): (head record,
    trainable params). The sweep's proxy validation uses it on a copy of the network it pre-trains."""
    from rcl_dist.data.spec import derived_seed

    kind, out = task_head(model, cfg, spec.task)
    current = (head_kind(model.head), int(model.head.out_channels))
    if spec.mode == "proxy" or spec.head == "new":
        fresh = True
    elif spec.head == "keep":
        if current != (kind, out):
            raise ValueError(
                f"head 'keep': the model's last layer is {current[0]} with {current[1]} outputs, task {spec.task!r} "
                f"needs {kind} with {out}; use head 'auto' or 'new'"
            )
        fresh = False
    else:  # auto
        fresh = current != (kind, out)
    if fresh:
        with _seeded(derived_seed(spec.seed, "finetune-head")):
            model.replace_head(model.new_head(kind, out))
        if model.restores_from_input(model.head):  # input skip: a zero head is the identity
            with torch.no_grad():
                for p in model.head.parameters():
                    p.zero_()
    if spec.mode == "proxy":
        params = model.freeze_all_but_head()
    else:
        model.unfreeze()
        params = [p for p in model.parameters()]
    return {"kind": kind, "out_channels": out, "fresh": fresh}, params


# ------------------------------------------------------------------------------------------ the labels


@dataclass
class LabelSet:
    """Labelled crops held in memory: ``input`` [n, C, h, w], ``target`` [n, C', H, W], ``index`` [n]
    (each crop's label number in 0..N-1)."""

    input: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())

    def to(self, device: torch.device | str) -> LabelSet:
        return LabelSet(self.input.to(device), self.target.to(device), self.index)


def label_pair_spec(spec: FinetuneSpec, raw: str | None, gray: bool):
    """The :class:`PairSpec` whose samples are the labels (one shard: labels do not depend on workers)."""
    from rcl_dist.data.spec import PairSpec

    return PairSpec(
        task=spec.task,
        crop=spec.crop,
        raw=raw if spec.task == "jdd" else None,
        realisation=spec.realisation,
        batch_size=1,
        seed=spec.seed,
        shard_id=0,
        num_shards=1,
        split=spec.split,
        gray=gray,
    )


def _label_keys(n_images: int, labels: int, seed: int) -> list[tuple[int, int]]:
    """(epoch, image index) of every label: label i -> epoch i // n, image perm_epoch[i % n]."""
    from rcl_dist.data.spec import derived_seed

    keys, perms = [], {}
    for i in range(labels):
        e, j = divmod(i, n_images)
        if e not in perms:
            g = torch.Generator().manual_seed(derived_seed(seed, "finetune-labels", str(e)) % (1 << 62))
            perms[e] = torch.randperm(n_images, generator=g).tolist()
        keys.append((e, perms[e][j]))
    return keys


def build_label_set(
    spec: FinetuneSpec,
    raw: str | None,
    gray: bool,
    rank: int = 0,
    world: int = 1,
    threads: int | None = None,
) -> LabelSet:
    """Labels ``rank, rank + world, ...`` of the ``spec.labels`` labels (see the module docstring).

    ``raw``/``gray``: the model's input layout (``model.raw``, ``in_channels == 1``).
    """
    from torch.utils.data import DataLoader

    from rcl_dist.data.reference import ManifestPairs

    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got {rank}, {world}")
    if not Path(spec.manifest).is_file():
        raise FileNotFoundError(f"manifest: {spec.manifest} does not exist (create it with `rcl-dist data index`)")
    ds = ManifestPairs(spec.manifest, label_pair_spec(spec, raw, gray), spec.simulated_dir)
    keys = _label_keys(len(ds), spec.labels, spec.seed)
    mine = list(range(rank, spec.labels, world))
    threads = spec.label_threads if threads is None else threads
    loader = DataLoader(ds, batch_size=None, sampler=[keys[i] for i in mine], num_workers=threads)
    samples = list(loader)
    a, b = ds.spec.keys
    return LabelSet(
        torch.stack([s[a] for s in samples]),
        torch.stack([s[b] for s in samples]),
        torch.tensor(mine, dtype=torch.int64),
    )


class _LabelBatches:
    """Batches of ``batch`` distinct local label indices from seeded permutations (drop-last)."""

    def __init__(self, n: int, batch: int, seed: int, rank: int) -> None:
        from rcl_dist.data.spec import derived_seed

        if not 1 <= batch <= n:
            raise ValueError(f"batch {batch} must be in 1..{n} (the labels of this worker)")
        self.n, self.batch = n, batch
        self.g = torch.Generator().manual_seed(derived_seed(seed, "finetune-batches", str(rank)) % (1 << 62))
        self.order: list[int] = []
        self.epoch = -1

    def next(self) -> torch.Tensor:
        if len(self.order) < self.batch:
            self.order = torch.randperm(self.n, generator=self.g).tolist()
            self.epoch += 1
        out, self.order = self.order[: self.batch], self.order[self.batch :]
        return torch.tensor(out, dtype=torch.int64)


# ------------------------------------------------------------------------------------------ training


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    from rcl_dist import dist as rdist

    if not rdist.is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def label_l1(
    model: nn.Module, labels: LabelSet, batch: int = 16, device: torch.device | str = "cpu", reduce: bool = True
) -> float:
    """Mean L1 between ``model.restore(input)`` and ``target`` over the whole label set (all ranks;
    ``reduce=False``: this process's labels only, no collective call)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(labels), max(1, batch)):
        x = labels.input[s : s + batch].to(device)
        y = labels.target[s : s + batch].to(device)
        err = (model.restore(x) - y).abs().flatten(1).mean(1)
        total, count = total + float(err.sum()), count + int(err.numel())
    model.train(was_training)
    if reduce:
        total, count = _all_reduce_sum([total, float(count)], torch.device(device))
    return total / max(count, 1.0)


def train_on_labels(
    model: nn.Module,
    inner: nn.Module,
    opt: torch.optim.Optimizer,
    labels: LabelSet,
    spec: FinetuneSpec,
    device: torch.device,
    *,
    rank: int = 0,
    on_report: Callable[[int, dict[str, float], bool], None] | None = None,
    reduce: bool = True,
    verbose: bool = True,
) -> dict[str, float]:
    """Full mode: ``spec.steps`` Adam steps of L1(restore(input), target) on this rank's labels
    (proxy mode fits its fresh last layer with :func:`fit_proxy` instead).

    ``model``: what the forward pass goes through (the DDP wrapper, or ``inner`` itself);
    ``inner``: the Restorer (for evaluation). ``on_report(step, metrics, final)`` runs on every rank
    every ``spec.log_every`` steps and at the last step, with metrics averaged over ranks; the last
    report also has ``label_l1`` (the whole label set after training) and ``label_l1_initial``.
    Returns the last metrics. ``reduce=False``: no collective calls (one rank training a copy on its
    own, e.g. the sweep's validation inside a pre-training run); ``verbose=False``: no progress lines.
    """
    from rcl_dist import dist as rdist

    if spec.mode == "proxy":
        raise ValueError("proxy mode fits the fresh last layer with fit_proxy (rcl_dist.train.probe), not with Adam steps")
    eval_batch = max(spec.per_worker_batch, 16)
    initial = label_l1(inner, labels, eval_batch, device, reduce)
    batches = _LabelBatches(len(labels), spec.per_worker_batch, spec.seed, rank)
    inputs, targets = labels.input.to(device), labels.target.to(device)
    model.train()
    t_window, n_window, t_start = 0.0, 0, time.perf_counter()
    metrics: dict[str, float] = {}
    for step in range(1, spec.steps + 1):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = spec.lr * lr_factor(spec.schedule, step, spec.steps, spec.warmup)
        idx = batches.next().to(device)
        x, y = inputs[idx], targets[idx]
        loss = F.l1_loss(model.restore(x), y)
        if not torch.isfinite(loss.detach()):
            raise RuntimeError(f"non-finite L1 loss at step {step}: lower lr (now {spec.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t_window, n_window = t_window + time.perf_counter() - t0, n_window + 1
        final = step == spec.steps
        if step % spec.log_every == 0 or final:
            metrics = {"loss": float(loss.detach())}
            if reduce:
                metrics = rdist.all_reduce_mean(metrics, device=device)
            metrics.update(
                step=float(step),
                epoch=float(batches.epoch),
                samples_per_s=spec.effective_batch_size * n_window / t_window,
                lr=float(opt.param_groups[0]["lr"]),
            )
            t_window, n_window = 0.0, 0
            if final:
                metrics.update(label_l1=label_l1(inner, labels, eval_batch, device, reduce), label_l1_initial=initial)
            if rank == 0 and verbose:
                eta = (time.perf_counter() - t_start) / step * (spec.steps - step)
                print(
                    f"[rcl-dist finetune] step {step}/{spec.steps}  L1 {metrics['loss']:.4g}"
                    + (f"  label L1 {metrics['label_l1_initial']:.4g} -> {metrics['label_l1']:.4g}" if final else "")
                    + f"  {metrics['samples_per_s']:.1f} samples/s  ETA {eta:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
            if on_report is not None:
                on_report(step, metrics, final)
    return metrics


def probe_options(spec: FinetuneSpec) -> ProbeOptions:
    """The probe settings of a proxy run (``fit="adam"`` uses the spec's steps, lr and batch)."""
    return ProbeOptions(
        fit=spec.fit, ridge=spec.ridge, tol=spec.probe_tol, max_iters=spec.probe_max_iters, steps=spec.steps,
        lr=spec.lr, batch_size=spec.per_worker_batch, seed=spec.seed,
    )  # fmt: skip


def fit_proxy(
    inner: nn.Module,
    labels: LabelSet,
    spec: FinetuneSpec,
    device: torch.device,
    *,
    rank: int = 0,
    reduce: bool = True,
    verbose: bool = True,
) -> tuple[dict[str, float], ProbeTrace]:
    """Proxy mode: fit the fresh last layer of ``inner`` on this rank's labels with
    :func:`rcl_dist.train.probe.fit_head` (every rank's labels when ``reduce`` and distributed).

    Returns (metrics: ``loss`` = ``label_l1``, ``label_l1_initial``, ``probe_*``, ``step``; the trace).
    """
    from rcl_dist import dist as rdist

    red = rdist.all_reduce_sum if reduce and rdist.is_distributed() else None
    trace = fit_head(inner, labels.input, labels.target, probe_options(spec), reduce=red, rank=rank, device=device)
    metrics = {"loss": trace.label_l1, **trace.metrics(), "step": float(max(trace.iterations, 1))}
    if rank == 0 and verbose:
        lstsq = "" if trace.lstsq_l1 is None else f", closed form {trace.lstsq_l1:.5g}"
        print(
            f"[rcl-dist finetune] proxy fit {trace.fit} on {trace.labels} labels: label L1 {trace.label_l1_initial:.4g} "
            f"(fresh) -> {trace.label_l1:.5g}{lstsq}; {trace.iterations} iterations, "
            f"{'converged' if trace.converged else 'not converged'}, {trace.seconds:.1f} s "
            f"(features {trace.feature_seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return metrics, trace


def make_optimizer(params: list[nn.Parameter], spec: FinetuneSpec) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=spec.lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def checkpoint_extra(
    spec: FinetuneSpec, head: dict[str, Any], metrics: dict[str, float], trace: ProbeTrace | None = None
) -> dict[str, Any]:
    return {
        "fit": spec.fit if spec.mode == "proxy" else "full",
        "probe": trace.to_dict() if trace is not None else None,
        "head": {"kind": head["kind"], "out_channels": int(head["out_channels"])},
        "task": spec.task,
        "mode": spec.mode,
        "labels": spec.labels,
        "steps": spec.steps,
        "crop": spec.crop,
        "seed": spec.seed,
        "pretrain_checkpoint": spec.source,
        "head_fresh": bool(head["fresh"]),
        "final_loss": float(metrics.get("loss", float("nan"))),
        "label_l1": float(metrics.get("label_l1", float("nan"))),
    }


def finetune_local(
    spec: FinetuneSpec, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, float], list[dict[str, float]]]:
    """One process, no Ray, no MLflow: (fine-tuned model, last metrics, every report).

    The same model preparation, labels and loop as the Ray workers with ``workers=1``; writes the
    checkpoint to ``spec.out`` when given. For debugging and tests.
    """
    from rcl_dist.models.io import save_checkpoint

    if spec.workers != 1:
        raise ConfigError(f"finetune_local runs one process: workers must be 1, got {spec.workers}")
    device = torch.device(device)
    torch.set_flush_denormal(True)
    model, cfg, head, params = prepare_finetune_model(spec, map_location=device)
    model.to(device)
    labels = build_label_set(spec, model.raw, cfg.model.in_channels == 1)
    history: list[dict[str, float]] = []
    trace = None
    if spec.mode == "proxy":
        metrics, trace = fit_proxy(model, labels, spec, device)
        history.append(dict(metrics))
    else:
        opt = make_optimizer(params, spec)
        metrics = train_on_labels(model, model, opt, labels, spec, device, on_report=lambda s, m, f: history.append(dict(m)))
    if spec.out:
        save_checkpoint(spec.out, model, cfg, **checkpoint_extra(spec, head, metrics, trace))
    return model, metrics, history
