"""The Ray Train worker loop of RCL pre-training: ``train_func_per_worker(loop_config)``.

Every worker (DDP rank) builds its own input pipeline shard, the model and the objective, and runs
Adam on Eq. 6 with the negatives of every worker gathered with gradients (``dist.negatives``).
Rank 0 writes checkpoints and logs to MLflow; all ranks call ``ray.train.report`` at the same steps.

Phases: 1 set-up, 2 data, 3 model and objective, 4 resume, 5 the loop, 6 the end of the run.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rcl_dist import dist as rdist
from rcl_dist.config import Config
from rcl_dist.data.spec import PairSpec
from rcl_dist.models.factory import build_model_from_config
from rcl_dist.models.io import CHECKPOINT_FILE, read_state, write_state
from rcl_dist.train.schedule import lr_factor
from rcl_dist.losses.build import build_consistency_from_config, build_objective_from_config
from rcl_dist.train.diagnostics import calibrate_alpha, gradient_diagnostics, manifest_noise_probe
from rcl_dist.train.guards import NonFiniteGuard, check_finite_weights
from rcl_dist.train.worker import DDPRestorer, place_model, worker_setup
from rcl_dist.train.progress import post_progress

__all__ = ["train_func_per_worker", "pair_spec", "FAULT_ENV", "METHOD_TASK"]


# Test-only fault hook: "RANK:STEP:MARKER" kills worker RANK at STEP once (the marker file records it).
FAULT_ENV = "RCL_DIST_FAULT"
# The pipeline task that feeds each pre-training method (n2s, nb2nb, b2u read only a denoise batch's noisy "input").
METHOD_TASK = {"rcl": "pretrain", "consistency": "pretrain", "n2n": "n2n", "n2s": "denoise", "nb2nb": "denoise",
               "b2u": "denoise", "supervised": "denoise"}  # fmt: skip


def _maybe_fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    f_rank, f_step, marker = spec.split(":", 2)
    if rank == int(f_rank) and step == int(f_step) and not Path(marker).exists():
        Path(marker).write_text(f"killed rank {rank} at step {step}\n")
        # Ray Train registers a reported checkpoint asynchronously (its controller polls the workers):
        # wait so that the crash comes after the last checkpoint is registered, as a real crash a
        # while after a checkpoint would, and the test checks the restart rather than that race
        time.sleep(3.0)
        os.kill(os.getpid(), signal.SIGKILL)  # a hard crash: no exception handler runs


def pair_spec(cfg: Config, rank: int = 0, world: int = 1) -> PairSpec:
    """What rank ``rank`` of ``world`` asks its input pipeline for (the driver checks the crop with it)."""
    raw = cfg.model.raw
    return PairSpec(
        noise=cfg.data.noise,
        task=METHOD_TASK[cfg.loss.method],
        crop=cfg.data.crop,
        overlap=cfg.data.overlap,
        raw=raw if METHOD_TASK[cfg.loss.method] == "pretrain" else None,
        realisation=cfg.data.realisation,
        batch_size=cfg.train.batch_size // world,
        seed=cfg.train.seed,
        shard_id=rank,
        num_shards=world,
        split=cfg.data.split,
        gray=cfg.model.in_channels == 1,
    )


def _pipeline(cfg: Config, loop_config: dict, rank: int, world: int, device: torch.device):
    """This rank's shard of the input pipeline (DALI, or the reference DataLoader)."""
    spec = pair_spec(cfg, rank, world)
    manifest, simulated = loop_config["manifest"], loop_config.get("simulated_dir")
    if cfg.data.engine == "dali":
        from rcl_dist.data.dali import DALILoader

        device_id = device.index if device.type == "cuda" else None
        return DALILoader(manifest, spec, device_id=device_id, num_threads=max(1, cfg.data.threads), simulated_dir=simulated)
    from rcl_dist.data.reference import make_loader

    return make_loader(manifest, spec, num_workers=cfg.data.threads, simulated_dir=simulated)


class _Batches:
    """Endless iteration over epochs with a data position (epoch, batch in epoch) for checkpoints."""

    def __init__(self, loader, epoch: int = 0, skip: int = 0) -> None:
        self.loader, self.epoch, self.index = loader, epoch, 0
        self._it = self._start()
        for _ in range(skip):
            self.next()

    def _start(self):
        for obj in (self.loader, getattr(self.loader, "sampler", None), getattr(self.loader, "dataset", None)):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(self.epoch)
        return iter(self.loader)

    def next(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.index = self.epoch + 1, 0
            self._it = self._start()
            batch = next(self._it)
        self.index += 1
        return batch


@torch.no_grad()
def _distance_matrix(model: nn.Module, objective: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """[B, B] distances between the eval batch's first and second crops (the paper's Fig. 2 input)."""
    contrastive = getattr(objective, "contrastive", None)
    if contrastive is None or "q" not in batch:
        return None
    s_q, s_k = contrastive.sketch(model.residual(batch["q"])), contrastive.sketch(model.residual(batch["k"]))
    return contrastive.distance_matrix(s_q, s_k).float().cpu()


def _resume_state(resume_from: str | None, device: torch.device, rank: int) -> dict[str, Any] | None:
    """The verified state to continue from, or None for a fresh start: the one with the highest step
    among Ray's latest registered checkpoint (a restart after a worker failure) and ``resume_from``
    (``--resume``: the newest valid checkpoint the driver found in the run folder; Ray registers a
    checkpoint asynchronously, so after an interrupt the newest one on disk may be unknown to it)."""
    import ray.train

    candidates: list[tuple[str, dict[str, Any]]] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            try:  # weights_only: a checkpoint holds tensors and plain containers, never pickled objects
                candidates.append((d, read_state(Path(d) / CHECKPOINT_FILE, map_location=device)))
            except ValueError as e:
                print(f"[rcl-dist] skipping Ray's latest checkpoint: {e}", file=sys.stderr, flush=True)
    if resume_from:
        try:
            candidates.append((resume_from, read_state(Path(resume_from) / CHECKPOINT_FILE, map_location=device)))
        except (OSError, ValueError):
            if not candidates:  # verified by the driver a moment ago: say so rather than start again
                raise
            # a restart within a resumed run: Ray has a newer one and may have removed this one
    if not candidates:
        return None
    where, state = max(candidates, key=lambda c: int(c[1]["step"]))
    if rank == 0:
        print(f"[rcl-dist] resuming from step {int(state['step'])} ({where})", file=sys.stderr, flush=True)
    return state


VALIDATION_KEYS = ("val_psnr", "val_ssim", "val_l1", "val_probe_converged", "val_seconds")


def _validate(validator, inner: nn.Module, device: torch.device) -> dict[str, float]:
    """Rank 0 runs ``validator(inner)``; every rank gets its numbers (the others wait in a broadcast)."""
    values = torch.zeros(len(VALIDATION_KEYS), dtype=torch.float64, device=device)
    if validator is not None:
        was_training = inner.training
        out = validator(inner)
        inner.train(was_training)
        values = torch.tensor([out[k] for k in VALIDATION_KEYS], dtype=torch.float64, device=device)
    if rdist.is_distributed():
        torch.distributed.broadcast(values, src=0)
    return dict(zip(VALIDATION_KEYS, values.tolist()))


@dataclass
class _Progress:
    """Where the run stands: the counters and tensors a checkpoint keeps besides weights and optimiser."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    restarts: int = 0
    skipped: int = 0
    dist_init: torch.Tensor | None = None
    queue: torch.Tensor | None = None  # global+queue: the newest dist.queue_size key sketches, detached
    resumed: bool = False


@dataclass
class _Window:
    """Seconds spent and seconds waited for data over the steps since the last log (samples/s, data wait)."""

    seconds: float = 0.0
    wait: float = 0.0
    steps: int = 0

    def add(self, seconds: float, wait: float) -> None:
        self.seconds, self.wait, self.steps = self.seconds + seconds, self.wait + wait, self.steps + 1


@dataclass
class _Worker:
    """What every phase of one rank's loop reads: config, placement, model, objective, optimiser."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    inner: nn.Module
    objective: nn.Module
    opt: torch.optim.Optimizer
    model: nn.Module | None = None  # the DDP-wrapped (and maybe compiled) inner model, set after resume
    autocast: Any = None
    key_gather: Any = None
    use_queue: bool = False


def _build(cfg: Config, rank: int, device: torch.device) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """Phase 3: the model on its device, the objective (with its consistency term) and Adam."""
    inner = place_model(build_model_from_config(cfg), cfg.dist.channels_last, device)  # NHWC: faster on GPUs and CPUs
    gen = torch.Generator().manual_seed(cfg.train.seed + rank)
    consistency = build_consistency_from_config(cfg) if cfg.loss.method in ("rcl", "consistency") else None
    if consistency is not None:
        consistency = consistency.to(device)
    objective = build_objective_from_config(cfg, consistency, gen).to(device)
    opt = torch.optim.Adam(
        inner.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps
    )
    return inner, objective, opt


def _restore(w: _Worker, state: dict[str, Any] | None) -> _Progress:
    """Phase 4: load a resumed state into the model, optimiser and objective; its counters, or zeros."""
    if state is None:
        return _Progress()
    w.inner.load_state_dict(state["model"])
    w.opt.load_state_dict(state["optimizer"])
    run = _Progress(
        step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
        restarts=state["restarts"] + 1, skipped=state["skipped_nonfinite"],
        dist_init=state["dist_init"] if state["dist_init"].numel() else None,
        queue=state["queue"].to(w.device) if state["queue"].numel() else None,
        resumed=True,
    )  # fmt: skip
    if w.cfg.loss.alpha_ratio is not None and "alpha" in state:  # the calibrated alpha goes on where it was
        w.objective.alpha = float(state["alpha"])
    return run


def _wrap(w: _Worker) -> nn.Module:
    """The model the steps call: DDP over the inner model on more than one worker, compiled if asked."""
    import ray.train.torch

    model: nn.Module = w.inner
    if w.world > 1:
        model = DDPRestorer(ray.train.torch.prepare_model(w.inner, move_to_device=False), w.inner)
    if w.cfg.dist.compile:
        model.forward = torch.compile(model.forward)
    return model


def _tracker(loop_config: dict[str, Any], w: _Worker, run: _Progress):
    """Rank 0's MLflow run: the one the driver created, reopened after a restart; None elsewhere."""
    if w.rank != 0 or not loop_config.get("mlflow_run_id"):
        return None
    from rcl_dist.tracking import RunTracker

    # the driver created the run; after a restart this reopens it (same run, tagged as a resume)
    # and its per-metric step marks keep steps logged before the crash from being logged twice
    return RunTracker.start(
        loop_config["tracking_uri"], w.cfg.tracking.experiment, None, None,
        run_id=loop_config["mlflow_run_id"], resume_step=run.step if run.resumed else None,
    )  # fmt: skip


def _validator(validation: dict[str, Any] | None, w: _Worker):
    """Sweeps: rank 0's proxy validator (train/validate.py), the trial's objective; None elsewhere."""
    if not (validation and w.rank == 0):
        return None
    import ray.util

    from rcl_dist.train.validate import ProxyValidator

    validator = ProxyValidator(validation["objective"], w.cfg)
    pg = ray.util.get_current_placement_group()
    if validation.get("placement_group_file") and pg is not None:
        # a sweep trial stopped by its scheduler leaves this group behind: the sweep removes it
        Path(validation["placement_group_file"]).write_text(pg.id.hex())
    return validator


def _start(w: _Worker, run: _Progress, batches: _Batches) -> dict[str, torch.Tensor]:
    """The fixed eval batch (Fig. 2, samples); on a fresh start its distances and the calibrated alpha."""
    eval_batch = {k: v.to(w.device) for k, v in batches.next().items()}
    if run.step == 0:
        run.dist_init = _distance_matrix(w.inner, w.objective, eval_batch)
        if w.cfg.loss.alpha_ratio is not None:  # alpha from the gradient ratio at the start, the same on every rank
            diag = rdist.all_reduce_mean(gradient_diagnostics(w.cfg, w.objective, w.inner, eval_batch), device=w.device)
            calibrate_alpha(w.cfg, w.objective, diag, jump=True)
    return eval_batch


def _step(w: _Worker, run: _Progress, batch: dict[str, torch.Tensor], guard: NonFiniteGuard) -> dict[str, torch.Tensor]:
    """One optimisation step (learning rate, loss, agreed non-finite skip, update, key queue); its outputs."""
    cfg, step = w.cfg, run.step
    for g in w.opt.param_groups:
        g["lr"] = cfg.train.lr * lr_factor(cfg.train.schedule, step + 1, cfg.train.steps, cfg.train.warmup)
    if hasattr(w.objective, "set_progress"):  # schedules that follow training progress (Blind2Unblind)
        w.objective.set_progress(step + 1, cfg.train.steps)
    with w.autocast:
        if cfg.loss.method == "rcl":
            extra = run.queue if w.use_queue else None
            world = w.world if w.key_gather else 1
            out = w.objective(w.model, batch, extra_negatives=extra, key_gather=w.key_gather, world_size=world)
        else:
            out = w.objective(w.model, batch)
    loss = out["loss"]
    # all ranks agree on skipping: a non-finite loss anywhere skips the step everywhere
    finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=w.device)
    if rdist.is_distributed():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    w.opt.zero_grad(set_to_none=True)
    if not guard.check(finite.item() == 1.0, step + 1):
        loss.backward()
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(w.inner.parameters(), cfg.train.grad_clip)
        w.opt.step()
        if w.use_queue:  # every rank holds the same queue: this step's keys of all ranks, newest first
            keys = rdist.gather_with_grad(out["sketch_k"].float()).detach()
            run.queue = (keys if run.queue is None else torch.cat([keys, run.queue]))[: cfg.dist.queue_size]
    return out


def _metrics(w, run, out, batch, probe, window: _Window, guard: NonFiniteGuard, batches: _Batches) -> dict[str, float]:
    """The averaged metrics of a logged step (losses, gradient diagnostics, noise probe, rates); resets the window."""
    values = {k: float(v.detach().float()) for k, v in out.items() if v.dim() == 0}
    with w.autocast:  # every rank: the dicts all_reduce_mean averages must have the same keys
        values.update(gradient_diagnostics(w.cfg, w.objective, w.inner, batch))
    if probe is not None:
        values.update(probe(w.inner))
    metrics = rdist.all_reduce_mean(values, device=w.device)
    if w.cfg.loss.alpha_ratio is not None:  # from the averaged ratio: every rank sets the same alpha
        metrics["alpha"] = w.objective.alpha
        calibrate_alpha(w.cfg, w.objective, metrics)
    metrics.update(
        samples_per_s=w.cfg.train.batch_size * window.steps / window.seconds,
        data_wait_fraction=window.wait / window.seconds,
        lr=w.opt.param_groups[0]["lr"],
        skipped_nonfinite=float(guard.skipped),
        restarts=float(run.restarts),
        epoch=float(batches.epoch),
        step=float(run.step),
    )
    window.seconds, window.wait, window.steps = 0.0, 0.0, 0
    return metrics


def _print_progress(cfg: Config, metrics: dict[str, float], step: int, eta: float) -> None:
    """Rank 0's progress line on stderr."""
    print(
        f"[rcl-dist] step {step}/{cfg.train.steps}  loss {metrics['loss']:.4g}"
        + (f"  contrast {metrics['contrast']:.4g}" if "contrast" in metrics else "")
        + (f"  consistency {metrics['consistency']:.4g}" if "consistency" in metrics else "")
        + f"  {metrics['samples_per_s']:.1f} samples/s  data wait {100 * metrics['data_wait_fraction']:.0f}%"
        + (f"  val PSNR {metrics['val_psnr']:.2f} dB" if "val_psnr" in metrics else "")
        + f"  ETA {eta:.0f} s",
        file=sys.stderr,
        flush=True,
    )


def _report(
    w: _Worker, run: _Progress, metrics: dict[str, float], batches: _Batches, guard: NonFiniteGuard, config: dict
) -> None:
    """ray.train.report on every rank, with rank 0's verified checkpoint at checkpoint steps and the last."""
    import ray.train

    checkpoint = None
    with tempfile.TemporaryDirectory() as tmp:
        if run.step % w.cfg.dist.checkpoint_every == 0 or run.step == w.cfg.train.steps:
            check_finite_weights(w.inner, run.step)  # every rank (same weights): never checkpoint NaN weights
            if w.rank == 0:
                write_state(  # fsync'd, with its digest: verified when read back
                    Path(tmp) / CHECKPOINT_FILE,
                    {
                        "model": w.inner.state_dict(),
                        "optimizer": w.opt.state_dict(),
                        "step": run.step,
                        "epoch": batches.epoch,
                        "batch_in_epoch": batches.index,
                        "restarts": run.restarts,
                        "skipped_nonfinite": guard.skipped,
                        "dist_init": run.dist_init if run.dist_init is not None else torch.empty(0),
                        "queue": run.queue.cpu() if run.queue is not None else torch.empty(0),
                        "alpha": float(getattr(w.objective, "alpha", 0.0)),
                        "config": config,
                    },
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _finish(tracker, w: _Worker, run: _Progress, eval_batch: dict[str, torch.Tensor]) -> None:
    """Phase 6 (rank 0): the Fig. 2 density, sample images and system info in the MLflow run."""
    from rcl_dist.figures import pos_neg_from_distance_matrix

    w.model.eval()
    inner = w.inner
    dist_final = _distance_matrix(inner, w.objective, eval_batch)
    if run.dist_init is not None and dist_final is not None:
        tracker.log_emd_density_plot(*pos_neg_from_distance_matrix(run.dist_init), *pos_neg_from_distance_matrix(dist_final))
    x = eval_batch.get("q", eval_batch.get("input", eval_batch.get("noisy")))[:8]
    with torch.no_grad():
        y = inner(x)
        tracker.log_image_grid("samples", {"input": x, "output": inner.restore(x, y), "residual": inner.residual(x, y)}, run.step)
    tracker.log_system_info()


def train_func_per_worker(loop_config: dict[str, Any]) -> None:
    # 1. set-up: config, rank, device, seeds
    cfg = Config.from_dict(loop_config["config"])
    rank, world, device = worker_setup()
    torch.manual_seed(cfg.train.seed + rank)

    # 2. data: this rank's shard, batch = global batch / world size
    loader = _pipeline(cfg, loop_config, rank, world, device)

    # 3. model, objective, optimiser
    w = _Worker(cfg, rank, world, device, *_build(cfg, rank, device))

    # 4. resume from the latest checkpoint (after a failure, or `--resume`), then what the loop needs
    run = _restore(w, _resume_state(loop_config.get("resume_from"), device, rank))
    w.model = _wrap(w)
    batches = _Batches(loader, run.epoch, run.batch_in_epoch)
    tracker = _tracker(loop_config, w, run)
    validation = loop_config.get("validation")
    validator = _validator(validation, w)
    eval_batch = _start(w, run, batches)
    w.key_gather = rdist.make_key_gather() if cfg.dist.negatives != "local" else None
    w.use_queue = cfg.dist.negatives == "global+queue"
    w.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.dist.bf16)
    guard, window = NonFiniteGuard(cfg.train.nonfinite_limit, run.skipped), _Window()
    t_start, start_step = time.perf_counter(), run.step
    # d(n_hat, n) against the known simulated noise of a few manifest images (the DALI batches do not
    # carry the noise), on every rank: the same crops, so the same numbers, and the same metric keys
    probe = manifest_noise_probe(cfg, loop_config["manifest"])
    board = loop_config.get("progress")
    w.model.train()

    # 5. the loop
    while run.step < cfg.train.steps:
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batches.next().items()}
        t_data = time.perf_counter() - t0
        _maybe_fault(rank, run.step + 1)
        out = _step(w, run, batch, guard)
        run.step += 1
        window.add(time.perf_counter() - t0, t_data)
        step = run.step
        if step % cfg.train.log_every == 0 or step == cfg.train.steps or step % cfg.dist.checkpoint_every == 0:
            metrics = _metrics(w, run, out, batch, probe, window, guard, batches)
            if validation and (step % validation["every"] == 0 or step == cfg.train.steps):
                metrics.update(_validate(validator, w.inner, device), round=float(-(-step // validation["every"])))
                w.model.train()
            if rank == 0:
                if board is not None:  # the driver draws a bar (rcl_dist.train.progress)
                    post_progress(board, step, cfg.train.steps, metrics)
                else:
                    eta = (time.perf_counter() - t_start) / max(step - start_step, 1) * (cfg.train.steps - step)
                    _print_progress(cfg, metrics, step, eta)
                if tracker is not None:
                    tracker.log_metrics(metrics, step=step)
            _report(w, run, metrics, batches, guard, loop_config["config"])

    # 6. the end: Fig. 2 density, sample images, system info (rank 0)
    if tracker is not None:
        _finish(tracker, w, run, eval_batch)
