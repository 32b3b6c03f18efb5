"""Fine-tuning with few labels: the proxy evaluation of Sec. 4 and the label-efficiency study of Sec. 5.

A fine-tuning run takes a pre-training checkpoint (or ``source="none"``: a randomly initialised
network of the same architecture, the "no pre-training" baseline), puts a task layer on it and trains
with L1 and Adam (lr 1e-3, betas (0.9, 0.999), eps 1e-7, Sec. 4) on exactly ``spec.labels`` labelled
crops (:mod:`rcl_dist.train.labels`). ``proxy`` mode freezes everything but a fresh last layer and
fits it with :mod:`rcl_dist.train.probe`; ``full`` mode fine-tunes the whole network, keeping the last
layer when the task's output has the pre-training output's form. This module prepares the model and
trains it in one process (:func:`finetune_local`); :func:`rcl_dist.train.finetune_ray.run_finetune`
runs the same on Ray Train workers (DDP), tracked in MLflow. Modes and task layers: ``docs/finetune.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rcl_dist.config import Config, ConfigError, check_choice, pin_global_residual
from rcl_dist.train.finetune_spec import FINETUNE_TASKS, FinetuneSpec
from rcl_dist.train.labels import LabelBatches, LabelSet, augment_pairs, augmentation, build_label_set
from rcl_dist.train.probe import ProbeOptions, ProbeTrace, fit_head
from rcl_dist.train.schedule import lr_factor

__all__ = [
    "task_head",
    "head_kind",
    "prepare_finetune_model",
    "prepare_loaded_model",
    "label_l1",
    "train_on_labels",
    "fit_proxy",
    "probe_options",
    "finetune_local",
    "make_optimizer",
    "probe_then_unfreeze",
    "checkpoint_extra",
]

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-7  # Sec. 4


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

    # the Config comes back pinned (rcl_dist.config.pin_global_residual): the fine-tuned checkpoint records
    # the network form it was trained in, whatever the rule of the code that later loads it
    if spec.is_random_init:
        cfg = pin_global_residual(Config.from_dict(spec.config))
        from rcl_dist.data.spec import derived_seed

        with _seeded(derived_seed(spec.seed, "finetune-init")):
            return build_model_from_config(cfg), cfg
    model, cfg, _ = load_checkpoint(spec.source, map_location=map_location)
    cfg = pin_global_residual(cfg)
    if spec.config is not None:  # compared in pinned form: a stated null is the rule's form
        given = pin_global_residual(Config.from_dict(spec.config)).model
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
    full: everything trainable; the last layer kept or replaced as ``docs/finetune.md`` says.
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
    options = {"skip": spec.sr_skip} if kind == "sr2" else {}
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
            model.replace_head(model.new_head(kind, out, **options))
        if model.restores_from_input(model.head):  # input skip: a zero head is the identity
            with torch.no_grad():
                for p in model.head.parameters():
                    p.zero_()
    if spec.mode == "proxy":
        params = model.freeze_all_but_head()
    else:
        model.unfreeze()
        params = [p for p in model.parameters()]
    record = {"kind": kind, "out_channels": out, "fresh": fresh}
    if hasattr(model.head, "skip"):
        record["skip"] = model.head.skip
    return record, params


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
    from rcl_dist.data.spec import derived_seed

    if spec.mode == "proxy":
        raise ValueError("proxy mode fits the fresh last layer with fit_proxy (rcl_dist.train.probe), not with Adam steps")
    eval_batch = max(spec.per_worker_batch, 16)
    initial = label_l1(inner, labels, eval_batch, device, reduce)
    batches = LabelBatches(len(labels), spec.per_worker_batch, spec.seed, rank)
    inputs, targets = labels.input.to(device), labels.target.to(device)
    augment = augmentation(spec, inputs.shape[1] if inputs.shape[1] == targets.shape[1] else 0)
    aug_gen = torch.Generator().manual_seed(derived_seed(spec.seed, "finetune-augment", str(rank)))
    model.train()
    params = [q for g in opt.param_groups for q in g["params"]]
    grad_max, clipped = 0.0, 0  # over the report window: the largest gradient norm, steps clipped
    t_window, n_window, t_start = 0.0, 0, time.perf_counter()
    metrics: dict[str, float] = {}
    for step in range(1, spec.steps + 1):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = spec.lr * lr_factor(spec.schedule, step, spec.steps, spec.warmup)
        idx = batches.next().to(device)
        x, y = augment_pairs(inputs[idx], targets[idx], augment, aug_gen)
        loss = F.l1_loss(model.restore(x), y)
        if not torch.isfinite(loss.detach()):
            raise RuntimeError(f"non-finite L1 loss at step {step}: lower lr (now {spec.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients are averaged over ranks here: every rank clips the same norm
        if spec.grad_clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, spec.grad_clip))
            grad_max, clipped = max(grad_max, norm), clipped + (norm > spec.grad_clip)
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
            if spec.grad_clip is not None:
                metrics.update(grad_norm_max=grad_max, grad_clipped=float(clipped))
                grad_max, clipped = 0.0, 0
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


def probe_then_unfreeze(
    inner: nn.Module, labels: LabelSet, spec: FinetuneSpec, device: torch.device, *, rank: int = 0, reduce: bool = True
) -> ProbeTrace:
    """Full mode with ``spec.probe_first`` (LP-FT): fit the installed last layer with the probe on the
    frozen body's features (eval mode), then make every weight trainable again for the Adam steps."""
    from rcl_dist import dist as rdist

    red = rdist.all_reduce_sum if reduce and rdist.is_distributed() else None
    was_training = inner.training
    inner.eval()
    trace = fit_head(inner, labels.input, labels.target, probe_options(spec), reduce=red, rank=rank, device=device)
    inner.train(was_training)
    inner.unfreeze()
    if rank == 0:
        print(f"[rcl-dist finetune] probe first: label L1 {trace.label_l1_initial:.4g} -> {trace.label_l1:.4g} "
              f"({trace.iterations} iterations), then {spec.steps} Adam steps on every layer", file=sys.stderr, flush=True)  # fmt: skip
    return trace


def make_optimizer(params: list[nn.Parameter], spec: FinetuneSpec) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=spec.lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def checkpoint_extra(
    spec: FinetuneSpec, head: dict[str, Any], metrics: dict[str, float], trace: ProbeTrace | None = None
) -> dict[str, Any]:
    return {
        "fit": spec.fit if spec.mode == "proxy" else "full",
        "probe": trace.to_dict() if trace is not None else None,
        "head": {"kind": head["kind"], "out_channels": int(head["out_channels"]),
                 **({"skip": head["skip"]} if "skip" in head else {})},
        "task": spec.task,
        "mode": spec.mode,
        "labels": spec.labels,
        "steps": spec.steps,
        "crop": spec.crop,
        "seed": spec.seed,
        "pretrain_checkpoint": spec.source,
        "head_fresh": bool(head["fresh"]),
        "probe_first": bool(spec.probe_first),
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
        if spec.probe_first:
            trace = probe_then_unfreeze(model, labels, spec, device)
        opt = make_optimizer(params, spec)
        metrics = train_on_labels(model, model, opt, labels, spec, device, on_report=lambda s, m, f: history.append(dict(m)))
    if spec.out:
        save_checkpoint(spec.out, model, cfg, **checkpoint_extra(spec, head, metrics, trace))
    return model, metrics, history
