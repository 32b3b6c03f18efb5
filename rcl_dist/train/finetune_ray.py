"""Fine-tuning on Ray Train workers (DDP), tracked in MLflow: ``run_finetune(spec)``.

The model, the labelled set, the proxy fit and the training loop are those of
:mod:`rcl_dist.train.finetune` (which runs them in one process as ``finetune_local``); this module only
starts the workers, shards the labels over them and collects the result.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from rcl_dist.config import ConfigError
from rcl_dist.train.finetune import (
    checkpoint_extra,
    fit_proxy,
    make_optimizer,
    prepare_finetune_model,
    probe_then_unfreeze,
    train_on_labels,
)
from rcl_dist.train.finetune_spec import FinetuneResult, FinetuneSpec
from rcl_dist.train.labels import build_label_set, label_pair_spec
from rcl_dist.train.probe import ProbeTrace
from rcl_dist.train.progress import driver_progress, post_progress

__all__ = ["train_func_per_worker", "run_finetune"]



def train_func_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker: prepare the model, build this rank's labels, train, rank 0 checkpoints."""
    import ray.train
    import ray.train.torch

    from rcl_dist.models.io import save_checkpoint
    from rcl_dist.train.worker import DDPRestorer, worker_setup

    spec = FinetuneSpec.from_dict(loop_config["spec"])
    rank, world, device = worker_setup()

    # the same weights on every rank: preparation is seeded by spec.seed alone (DDP also broadcasts rank 0's)
    inner, cfg, head, params = prepare_finetune_model(spec, map_location="cpu")
    inner.to(device)
    labels = build_label_set(spec, inner.raw, cfg.model.in_channels == 1, rank, world)

    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        from rcl_dist.tracking import RunTracker

        tracker = RunTracker.start(loop_config["tracking_uri"], spec.experiment, None, None, run_id=loop_config["mlflow_run_id"])

    board = loop_config.get("progress")  # the driver's bar (full mode), else rank 0 prints lines

    def report(step: int, metrics: dict[str, float], final: bool, trace: ProbeTrace | None = None) -> None:
        if rank == 0:
            post_progress(board, step, spec.steps, metrics)
        if tracker is not None:
            tracker.log_metrics(metrics, step=step)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if final and rank == 0:
                save_checkpoint(tmp, inner, cfg, **checkpoint_extra(spec, head, metrics, trace))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(dict(metrics), checkpoint=checkpoint)

    if spec.mode == "proxy":
        # the probe all-reduces its sums itself: every rank installs the same head, no DDP wrapper needed
        metrics, trace = fit_proxy(inner, labels, spec, device, rank=rank)
        if tracker is not None:
            every = 10 if trace.fit == "adam" else 1  # adam: the minibatch L1 every 10 steps; IRLS: each iteration
            for i, l1 in enumerate(trace.history, start=1):
                tracker.log_metrics({"probe_l1": l1}, step=min(i * every, max(trace.iterations, 1)))
        report(int(metrics["step"]), metrics, True, trace)
        return

    if spec.probe_first:  # LP-FT: the probe's head on the frozen body first (all ranks: the same head)
        probe_then_unfreeze(inner, labels, spec, device, rank=rank)
    opt = make_optimizer(params, spec)
    model: nn.Module = inner
    if world > 1:
        # Every trainable parameter is used in every forward pass, so find_unused_parameters is not needed.
        model = DDPRestorer(ray.train.torch.prepare_model(inner, move_to_device=False), inner)
    train_on_labels(model, inner, opt, labels, spec, device, rank=rank, on_report=report, verbose=board is None)


def _check_before_start(spec: FinetuneSpec) -> dict[str, Any]:
    """Everything that can fail before a worker starts: source, task/model pairing, manifest, crop."""
    import warnings

    from rcl_dist.data.reference import ManifestPairs

    if not spec.is_random_init:
        from rcl_dist.models.io import checkpoint_file

        checkpoint_file(spec.source)  # FileNotFoundError naming the path
    if not Path(spec.manifest).is_file():
        raise FileNotFoundError(f"manifest: {spec.manifest} does not exist (create it with `rcl-dist data index`)")
    model, cfg, head, _ = prepare_finetune_model(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the workers warn; here only whether any image fits counts
        ManifestPairs(spec.manifest, label_pair_spec(spec, model.raw, cfg.model.in_channels == 1), spec.simulated_dir)
    return {"model": cfg.model.name, "head": head}


def run_finetune(
    spec: FinetuneSpec,
    *,
    log: Callable[[str], None] = print,
    env: dict[str, str] | None = None,
) -> FinetuneResult:
    """Fine-tune on ``spec.workers`` Ray Train workers; the driver owns the MLflow run.

    The MLflow run (params: the spec; tags: ``pretrain_checkpoint``, ``task``, ``mode``, ``labels``)
    is created before any worker starts; rank 0 logs ``loss`` (train L1, mean over ranks),
    ``label_l1`` / ``label_l1_initial`` (the whole label set after / before training) and throughput.
    At the end the run gets the tag ``checkpoint`` (the fine-tuned checkpoint file: ``spec.out``'s copy
    when given, else Ray's) and the checkpoint file as an artifact under ``checkpoint/``.
    """
    from rcl_dist.train.trainer import make_torch_trainer

    from rcl_dist.models.io import CHECKPOINT_FILE, head_label
    from rcl_dist.paths import ray_results
    from rcl_dist.train.launch import check_gpus, ensure_ray

    info = _check_before_start(spec)
    storage = ray_results(spec.storage_path)
    name = spec.run_name or time.strftime("finetune-%Y%m%d-%H%M%S")
    if (storage / name).exists():
        raise ConfigError(f"run_name {name!r} already exists under {storage}: choose another name")

    tracker, run_id, uri = None, None, None
    if spec.tracking:
        from rcl_dist.paths import resolve_tracking_uri
        from rcl_dist.tracking import RunTracker

        uri = resolve_tracking_uri(spec.tracking_uri)
        tags = {
            "pretrain_checkpoint": spec.source,
            "task": spec.task,
            "mode": spec.mode,
            "labels": str(spec.labels),
            "model": info["model"],
            "head": head_label(info["head"]) + (" (fresh)" if info["head"]["fresh"] else " (pre-trained)"),
            "batch_size_effective": str(spec.effective_batch_size),
        }
        tracker = RunTracker.start(uri, spec.experiment, name, spec.to_dict(), tags=tags)
        run_id = tracker.run_id

    status = "FAILED"
    try:
        ensure_ray(num_cpus=max(os.cpu_count() or 1, int(spec.workers * spec.cpus_per_worker) + 1))
        check_gpus(spec.workers if spec.use_gpu else 0, "use_gpu")
        log(
            f"fine-tune {name}: task {spec.task}, mode {spec.mode}, {spec.labels} labels, {spec.workers} worker(s), "
            f"source {spec.source}" + (f", MLflow run {run_id} at {uri}" if run_id else "")
        )
        t0 = time.perf_counter()
        # a bar for the Adam steps of full mode; a proxy fit is one solve, reported in one line
        with driver_progress(f"fine-tune {name}", spec.steps, log=log, mode=None if spec.mode == "full" else "lines") as board:
            trainer = make_torch_trainer(
                train_func_per_worker,
                {"spec": spec.to_dict(), "mlflow_run_id": run_id, "tracking_uri": uri, "progress": board},
                workers=spec.workers, use_gpu=spec.use_gpu, cpus_per_worker=spec.cpus_per_worker, name=name,
                storage_path=str(storage), num_to_keep=1, max_failures=0, env=env,  # short runs: a failure reruns from scratch
            )  # fmt: skip
            result = trainer.fit()
        seconds = time.perf_counter() - t0
        ray_ckpt = result.checkpoint.path if result.checkpoint is not None else None
        ckpt_file = None
        if ray_ckpt is not None:
            ckpt_file = str(Path(ray_ckpt) / CHECKPOINT_FILE)
            if spec.out:
                out = Path(spec.out)
                dest = out if out.suffix == ".pt" else out / CHECKPOINT_FILE
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ckpt_file, dest)
                ckpt_file = str(dest)
        if tracker is not None and ckpt_file is not None:
            tracker.set_tags({"checkpoint": ckpt_file, "ray_checkpoint": ray_ckpt})
            tracker.log_artifact_file(ckpt_file, subdir="checkpoint")
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.end(status)
    log(f"fine-tune {name}: done in {seconds:.1f} s, checkpoint {ckpt_file}")
    return FinetuneResult(name, result.metrics, ckpt_file, ray_ckpt, run_id, uri, seconds)
