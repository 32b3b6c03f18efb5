"""One RCL pre-training step, phase by phase, against this machine's measured fp32 GEMM peak.

    python benchmarks/step_profile.py --label before --out benchmarks/results/step_profile_cpu.json
    python benchmarks/step_profile.py --label after  --out benchmarks/results/step_profile_cpu.json

For 1 and 2 workers and 64x64 / 128x128 crops (product defaults otherwise: U-Net width 32, depth 4,
global batch 16, EMD with Q = 256, global negatives, EfficientNet-Lite0 stage 3 for Eq. 5, DALI CPU
input with ``data.threads`` threads), each worker runs the product's own pieces -- the DALILoader of
``rcl_dist.data.dali`` with the trainer's ``pair_spec``, the trainer's own ``_build`` (model in its
memory format, ``build_consistency_from_config`` / ``build_objective_from_config``, Adam),
``rcl_dist.dist.make_key_gather``, DDP through ``DDPRestorer``, ``gradient_diagnostics``, the manifest
noise probe and MLflow's ``RunTracker`` -- in three ways:

* **staged**: the step of Eq. 6 (``RCLObjective.forward`` + ``loss.backward()`` + ``opt.step()``) cut
  at the U-Net's output ``o``: data wait | U-Net forward | sketch + gather + Eq. 3 (forward) | Eq. 5
  encoder forward (target branch phi(g(x)) and gradient branch phi(g(f(x))) timed apart with hooks) |
  Eq. 3 backward to ``o`` | Eq. 5 backward to ``o`` | U-Net backward from ``o.grad`` (DDP's gradient
  all-reduce included) | finite-loss agreement + Adam. The chain rule makes it the same gradient as
  the product's one backward; each run checks that (``staged_grad_rel_diff``) before timing.
* **product**: the trainer's step as it is written (objective forward, ``loss.backward()``, Adam),
  timed whole, with DALI input and with one cached batch (no input work at all).
* **reporting**: what a log step adds (``gradient_diagnostics``: one more forward and two backward
  passes; the noise probe; the metric all-reduce; MLflow ``log_metrics`` into a SQLite store on rank 0),
  amortised over ``train.log_every`` steps.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on each phase of the staged step (convolutions and
matrix products of the U-Net and the encoder: the sorts of the sketches count 0). The achieved rate is
the step's FLOPs on all workers over the measured step time, divided by a dense fp32 GEMM (``torch.mm``,
n = 2048) timed in the same run with all cores: a ratio that carries over from machine to machine.
Phase ratios divide by the GEMM peak at one worker's thread count.

Before / after a change: run the script with ``PYTHONPATH`` at another tree of ``rcl_dist`` (e.g. a
``git archive`` of a commit); the results file records which tree ran (``rcl_dist``) and the command.

Two workers are two processes with a gloo process group (a file rendezvous, as on a local Ray), not
Ray Train: Ray adds its own actors but not to the step. Each worker gets the torch threads a Ray Train
worker gets (``OMP_NUM_THREADS`` = floor(``dist.cpus_per_worker``) = 1) unless ``--torch-threads``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from _provenance import commit, load_average  # benchmarks/_provenance.py (this script's folder)

PHASES = ("data_wait", "unet_fwd", "loss_fwd", "encoder_fwd", "loss_bwd", "encoder_bwd", "unet_bwd", "optimiser", "reporting")
PHASE_NAMES = {
    "data_wait": "data wait (DALI next())",
    "unet_fwd": "U-Net forward",
    "loss_fwd": "sketch + gather + Eq. 3 forward",
    "encoder_fwd": "Eq. 5 encoder forward",
    "loss_bwd": "Eq. 3 backward (gather all-reduce)",
    "encoder_bwd": "Eq. 5 encoder backward",
    "unet_bwd": "U-Net backward (+ DDP all-reduce)",
    "optimiser": "finite agreement + Adam",
    "reporting": "reporting (diagnostics, probe, all-reduce, MLflow) / log_every",
}


# --------------------------------------------------------------------------------------------------
# The machine's limit: a dense fp32 GEMM
# --------------------------------------------------------------------------------------------------


def gemm_peak(threads: int, n: int = 2048, repeats: int = 6) -> float:
    """FLOP/s of the best of ``repeats`` fp32 ``torch.mm`` of n x n matrices on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up (and oneDNN/MKL kernel selection)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        return 2.0 * n**3 / best
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# One worker's set-up, the way train/pretrain.py builds it
# --------------------------------------------------------------------------------------------------


def product_config(crop: int, workers: int, extra: list[str]):
    from rcl_dist.config import load_config

    return load_config(None, [f"data.crop={crop}", f"dist.workers={workers}", "tracking.enabled=false", *extra])


class _Setup:
    """Model, objective, optimiser and hooks of one worker (``rcl_dist`` code only)."""

    def __init__(self, cfg, rank: int, world: int) -> None:
        from rcl_dist import dist as rdist
        from rcl_dist.train.pretrain import _build  # the trainer's phase 3: model, objective (Eq. 5 encoder), Adam
        from rcl_dist.train.worker import DDPRestorer

        self.cfg, self.rank, self.world = cfg, rank, world
        self.inner, self.objective, self.opt = _build(cfg, rank, torch.device("cpu"))
        self.model = self.inner
        if world > 1:
            ddp = torch.nn.parallel.DistributedDataParallel(self.inner)  # what ray.train.torch.prepare_model does on CPU
            self.model = DDPRestorer(ddp, self.inner)
        self.key_gather = rdist.make_key_gather() if cfg.dist.negatives != "local" else None
        self.scale = world if (self.key_gather and self.objective.contrastive.reduction == "sum") else 1
        self.encoder_calls: list[float] = []
        enc = self.objective.consistency.encoder
        enc.register_forward_pre_hook(lambda *_: self.encoder_calls.append(-time.perf_counter()))
        enc.register_forward_hook(lambda *_: self.encoder_calls.__setitem__(-1, self.encoder_calls[-1] + time.perf_counter()))

    def agree_finite(self, loss: torch.Tensor) -> bool:
        from rcl_dist import dist as rdist

        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())])
        if rdist.is_distributed():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return finite.item() == 1.0


def product_step(s: _Setup, batch: dict) -> torch.Tensor:
    """train/pretrain.py's ``_step`` for RCL (constant learning rate, no queue): forward, agree, backward, Adam."""
    world = s.world if s.key_gather else 1
    out = s.objective(s.model, batch, extra_negatives=None, key_gather=s.key_gather, world_size=world)
    loss = out["loss"]
    ok = s.agree_finite(loss)
    s.opt.zero_grad(set_to_none=True)
    if ok:
        loss.backward()
        s.opt.step()
    return loss.detach()


def staged_step(s: _Setup, batch: dict, lap, update: bool = True) -> torch.Tensor:
    """RCLObjective.forward (Eq. 6) cut at the U-Net output o; ``lap(name)`` closes each phase.

    The same operations in the same order as the product's step; the backward runs in three pieces
    (Eq. 3 to o, Eq. 5 to o, then the U-Net from the summed o.grad), which by the chain rule is the
    gradient of ``alpha * L_contrast + L_consistency``.
    """
    from rcl_dist.losses.diagnostics import logit_stats

    obj, c = s.objective, s.objective.contrastive
    q, k = batch["q"], batch["k"]
    b = q.shape[0]
    x = torch.cat([q, k])  # [2B, C, H, W]
    out = s.model(x)
    lap("unet_fwd")
    o = out.detach().requires_grad_(True)
    sketches = c.sketch(s.inner.residual(x, o))  # Eq. 2 residuals -> [2B, C, Q]
    s_q, s_k = sketches[:b], sketches[b:]
    keys, pos = (s_k, None) if s.key_gather is None else s.key_gather(s_k)
    dist = c.distance_matrix(s_q, keys, None)  # [B, W*B]
    contrast = obj.alpha * s.scale * c.info_nce(dist, pos)
    logit_stats(dist.detach(), c.effective_temperature(dist.detach(), pos), pos, c.reduction)
    lap("loss_fwd")
    s.encoder_calls.clear()
    consistency = obj.consistency(x, s.inner.restore(x, o))
    lap("encoder_fwd")
    ok = s.agree_finite(contrast + consistency)
    s.opt.zero_grad(set_to_none=True)
    lap("optimiser")
    if ok:
        contrast.backward()
        lap("loss_bwd")
        consistency.backward()
        lap("encoder_bwd")
        out.backward(o.grad)
        lap("unet_bwd")
        if update:
            s.opt.step()
        lap("optimiser")
    return (contrast + consistency).detach()


def _grads(s: _Setup) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in s.inner.parameters()]


def check_staged(s: _Setup, batch: dict) -> float:
    """max |g_staged - g_product| / max |g_product| over the U-Net's parameters, on one batch, no update."""
    world = s.world if s.key_gather else 1
    s.opt.zero_grad(set_to_none=True)
    s.objective(s.model, batch, key_gather=s.key_gather, world_size=world)["loss"].backward()
    ref = _grads(s)
    staged_step(s, batch, lambda _: None, update=False)
    got = _grads(s)
    s.opt.zero_grad(set_to_none=True)
    scale = max(float(g.abs().max()) for g in ref)
    return max(float((a - b_).abs().max()) for a, b_ in zip(got, ref)) / scale


# --------------------------------------------------------------------------------------------------
# FLOPs per phase (one worker's batch; every worker does the same)
# --------------------------------------------------------------------------------------------------


def count_flops(cfg, per_worker_batch: int) -> dict[str, float]:
    """FlopCounterMode over each phase of one staged step (and of a log step's diagnostics)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rcl_dist.train.diagnostics import gradient_diagnostics

    torch.manual_seed(0)
    s = _Setup(cfg, 0, 1)
    c = cfg.data.crop
    batch = {key: torch.rand(per_worker_batch, 3, c, c) for key in ("q", "k")}
    counters: dict[str, list[int]] = {}
    state = {"mode": None}

    def lap(name: str) -> None:
        state["mode"].__exit__(None, None, None)
        counters.setdefault(name, []).append(state["mode"].get_total_flops())
        state["mode"] = FlopCounterMode(display=False)
        state["mode"].__enter__()

    state["mode"] = FlopCounterMode(display=False)
    state["mode"].__enter__()
    staged_step(s, batch, lap)
    state["mode"].__exit__(None, None, None)
    flops = {k: float(sum(v)) for k, v in counters.items()}
    with FlopCounterMode(display=False) as fc:
        gradient_diagnostics(cfg, s.objective, s.inner, batch)
    flops["reporting_per_log_step"] = float(fc.get_total_flops())
    # the encoder's two branches: the target phi(g(x)) is half the encoder forward
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            s.objective.consistency.encoder(torch.cat([batch["q"], batch["k"]]))
    flops["encoder_target_fwd"] = float(fc.get_total_flops())
    flops["train_step"] = sum(flops.get(k, 0.0) for k in PHASES if k != "reporting")
    return flops


# --------------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else 0.0


def _worker(rank: int, world: int, opts: dict) -> None:
    torch.set_flush_denormal(True)  # as train/worker.py's worker_setup
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{opts['rendezvous']}", rank=rank, world_size=world)
    from rcl_dist import dist as rdist
    from rcl_dist.config import Config
    from rcl_dist.data.dali import DALILoader
    from rcl_dist.train.diagnostics import gradient_diagnostics, manifest_noise_probe
    from rcl_dist.train.pretrain import _Batches, pair_spec

    cfg = Config.from_dict(opts["config"])
    torch.manual_seed(cfg.train.seed + rank)
    loader = DALILoader(opts["manifest"], pair_spec(cfg, rank, world), num_threads=max(1, cfg.data.threads))
    next_batch = _Batches(loader).next  # the trainer's endless iteration over epochs

    s = _Setup(cfg, rank, world)
    s.model.train()
    result: dict = {"torch_threads": torch.get_num_threads(), "dali_threads": cfg.data.threads}
    result["staged_grad_rel_diff"] = check_staged(s, next_batch())

    # staged steps with DALI input
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    enc_target, enc_grad = [], []
    step_wall = []
    for i in range(opts["warmup"] + opts["steps"]):
        acc = dict.fromkeys(PHASES, 0.0)
        t = [time.perf_counter()]

        def lap(name: str) -> None:
            now = time.perf_counter()
            acc[name] += now - t[0]
            t[0] = now

        t_start = t[0]
        batch = next_batch()
        lap("data_wait")
        staged_step(s, batch, lap)
        if i >= opts["warmup"]:
            step_wall.append(time.perf_counter() - t_start)
            for p in PHASES:
                times[p].append(acc[p])
            enc_target.append(s.encoder_calls[0])
            enc_grad.append(s.encoder_calls[1])
    result["staged"] = {p: _mean(v) for p, v in times.items()}
    result["staged"]["encoder_fwd_target"] = _mean(enc_target)
    result["staged"]["encoder_fwd_grad_branch"] = _mean(enc_grad)
    result["staged_step_s"] = _mean(step_wall)

    # the product's step, whole: with DALI input, then on one cached batch (no input work)
    for mode in ("product", "product_cached"):
        cached = next_batch() if mode == "product_cached" else None
        walls, waits = [], []
        for i in range(opts["warmup"] + opts["steps"]):
            t0 = time.perf_counter()
            batch = cached if cached is not None else next_batch()
            t1 = time.perf_counter()
            product_step(s, batch)
            if i >= opts["warmup"]:
                walls.append(time.perf_counter() - t0)
                waits.append(t1 - t0)
        result[f"{mode}_step_s"] = _mean(walls)
        result[f"{mode}_data_wait_s"] = _mean(waits)

    # a log step's extra work (pretrain.py's _metrics), a few times
    probe = manifest_noise_probe(cfg, opts["manifest"])
    tracker = None
    if rank == 0:
        from rcl_dist.tracking import RunTracker

        tracker = RunTracker.start(f"sqlite:///{opts['workdir']}/mlflow.db", "step-profile", None, {"crop": cfg.data.crop})
    batch = next_batch()
    parts: dict[str, list[float]] = {"diagnostics": [], "probe": [], "all_reduce": [], "mlflow": []}
    for i in range(opts["reports"]):
        t0 = time.perf_counter()
        values = {"loss": 0.0}
        values.update(gradient_diagnostics(cfg, s.objective, s.inner, batch))
        t1 = time.perf_counter()
        if probe is not None:
            values.update(probe(s.inner))
        t2 = time.perf_counter()
        metrics = rdist.all_reduce_mean(values)
        t3 = time.perf_counter()
        if tracker is not None:
            tracker.log_metrics(metrics, step=i + 1)
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[key].append(dt)
    if tracker is not None:
        tracker.end()
    result["reporting_per_log_step"] = {k: _mean(v) for k, v in parts.items()}
    per_log = sum(result["reporting_per_log_step"].values())
    result["staged"]["reporting"] = per_log / cfg.train.log_every
    result["log_every"] = cfg.train.log_every
    Path(opts["workdir"], f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        torch.distributed.destroy_process_group()


def run_setting(workers: int, crop: int, args, manifest: Path, extra: list[str]) -> list[dict]:
    """Start ``workers`` processes for one setting and return each rank's result."""
    cfg = product_config(crop, workers, extra)
    threads = math.floor(cfg.dist.cpus_per_worker) if args.torch_threads == "ray" else int(args.torch_threads)
    with tempfile.TemporaryDirectory() as work:
        opts = dict(config=cfg.to_dict(), manifest=str(manifest), warmup=args.warmup, steps=args.steps,
                    reports=args.reports, workdir=work, rendezvous=str(Path(work) / "rendezvous"))  # fmt: skip
        ctx = mp.get_context("spawn")
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(max(1, threads))  # read by torch when the child imports it
        try:
            procs = [ctx.Process(target=_worker, args=(r, workers, opts)) for r in range(workers)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a worker of setting {workers} worker(s), crop {crop} failed: {[p.exitcode for p in procs]}")
        return [json.loads(Path(work, f"rank{r}.json").read_text()) for r in range(workers)]


# --------------------------------------------------------------------------------------------------
# Summary, results files
# --------------------------------------------------------------------------------------------------


def summarise(workers: int, crop: int, ranks: list[dict], flops: dict, peaks: dict[str, float], cfg) -> dict:
    """Shares of rank 0's staged step, the product step's rate and its FLOP ratio to the GEMM peak."""
    r0 = ranks[0]
    st = r0["staged"]
    total = sum(st[p] for p in PHASES)
    peak_all = peaks[str(os.cpu_count())]
    peak_worker = peaks[str(r0["torch_threads"])]
    step_s = r0["product_step_s"] + st["reporting"]  # a step as the trainer runs it, log steps amortised
    train_flops = flops["train_step"] * workers
    phase_ratio = {p: flops[p] / st[p] / peak_worker for p in PHASES if p in flops and flops[p] > 0 and st[p] > 0}
    target_share = st["encoder_fwd_target"] / total
    return {
        "workers": workers,
        "crop": crop,
        "per_worker_batch": cfg.train.batch_size // workers,
        "torch_threads_per_worker": r0["torch_threads"],
        "dali_threads_per_worker": r0["dali_threads"],
        "samples_per_s": cfg.train.batch_size / step_s,
        "step_s": step_s,
        "product_step_s": r0["product_step_s"],
        "product_cached_step_s": r0["product_cached_step_s"],
        "staged_step_s": total,
        "data_wait_fraction": r0["product_data_wait_s"] / r0["product_step_s"],
        "input_cost_fraction": 1.0 - r0["product_cached_step_s"] / r0["product_step_s"],
        "train_gflop_per_step": train_flops / 1e9,
        "achieved_over_peak": train_flops / step_s / peak_all,
        "achieved_over_peak_compute_only": train_flops / r0["product_cached_step_s"] / peak_all,
        "phase_achieved_over_worker_peak": phase_ratio,
        "shares": {p: st[p] / total for p in PHASES},
        "encoder_target_share": target_share,
        "phase_s": {**{p: st[p] for p in PHASES}, "encoder_fwd_target": st["encoder_fwd_target"],
                    "encoder_fwd_grad_branch": st["encoder_fwd_grad_branch"]},  # fmt: skip
        "reporting_per_log_step_s": r0["reporting_per_log_step"],
        "flops_per_worker": flops,
        "staged_grad_rel_diff": max(r["staged_grad_rel_diff"] for r in ranks),
        "rank_step_s": [r["product_step_s"] for r in ranks],
    }


def _manifest(workdir: Path) -> tuple[Path, str]:
    """A manifest of ../shared/data/train/CBSD432 (else the bundled photographs as PNG tiles)."""
    from rcl_dist.data.images import shared_data_dir
    from rcl_dist.data.index import index_images

    out = workdir / "manifest.parquet"
    root = shared_data_dir()
    if root is not None and (root / "train" / "CBSD432").is_dir():
        folder, source = root / "train" / "CBSD432", "shared/data/train/CBSD432 (432 JPEG, 481x321)"
    else:
        import numpy as np
        from skimage import io

        from rcl_dist.data.images import bundled_images

        folder, source = workdir / "bundled", "scikit-image bundled photographs (PNG)"
        folder.mkdir(exist_ok=True)
        for i, img in enumerate(bundled_images()):
            io.imsave(folder / f"{i}.png", (img.transpose(1, 2, 0) * 255).round().astype(np.uint8), check_contrast=False)
    if not out.exists():
        index_images([f"{folder}:train"], out, log=lambda *_: None)
    return out, source


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def write_markdown(path: Path, results: dict) -> None:
    lines = ["# One pre-training step against the machine's limit (CPU)", ""]
    for label, run in results.items():
        lines += [f"## {label}", "", f"Command: `{run['command']}`  ", f"Commit: {run['commit']}  ",
                  f"Machine: {run['machine']}  ",
                  f"Load average (1 min) before / after the run: {run['load_before']:.2f} / {run['load_after']:.2f}  ",
                  f"fp32 GEMM peak (torch.mm, n=2048): " + ", ".join(f"{k} thread(s) {v / 1e9:.1f} GFLOP/s" for k, v in run["gemm_peak"].items()) + "  ",
                  f"Settings: {run['settings']}  ", f"Data: {run['source']}; rcl_dist from {run['rcl_dist']}", ""]  # fmt: skip
        settings = run["settings_results"]
        head = " | ".join(f"{s['workers']}w {s['crop']}²" for s in settings)
        lines += [f"| figure | {head} |", "|---" * (len(settings) + 1) + "|"]
        rows = [
            ("samples/s (step with data wait and reporting)", lambda s: f"{s['samples_per_s']:.1f}"),
            ("achieved / peak fp32 FLOP/s (whole step)", lambda s: _fmt_pct(s["achieved_over_peak"])),
            ("achieved / peak (compute only: cached batch, no reporting)", lambda s: _fmt_pct(s["achieved_over_peak_compute_only"])),
            ("GFLOP per step (all workers)", lambda s: f"{s['train_gflop_per_step']:.1f}"),
            ("torch / DALI threads per worker", lambda s: f"{s['torch_threads_per_worker']} / {s['dali_threads_per_worker']}"),
            ("data wait / step", lambda s: _fmt_pct(s["data_wait_fraction"])),
            ("input cost (1 - cached / DALI step time)", lambda s: _fmt_pct(s["input_cost_fraction"])),
        ] + [(f"share: {PHASE_NAMES[p]}", (lambda p: lambda s: _fmt_pct(s["shares"][p]))(p)) for p in PHASES] + [
            ("  of which encoder target branch phi(g(x))", lambda s: _fmt_pct(s["encoder_target_share"])),
        ] + [(f"phase achieved / 1-worker peak: {PHASE_NAMES[p]}", (lambda p: lambda s: _fmt_pct(s["phase_achieved_over_worker_peak"].get(p, 0.0)))(p))
             for p in ("unet_fwd", "unet_bwd", "encoder_fwd", "encoder_bwd")] + [
            ("staged gradient vs product (max rel. diff)", lambda s: f"{s['staged_grad_rel_diff']:.1e}"),
        ]  # fmt: skip
        for name, fn in rows:
            lines.append(f"| {name} | " + " | ".join(fn(s) for s in settings) + " |")
        lines.append("")
        if run.get("note"):
            lines += [run["note"], ""]
    if "before" in results and "after" in results:
        lines += ["## Before -> after", "", "| setting | samples/s | achieved / peak | data wait |", "|---|---|---|---|"]
        after = {(s["workers"], s["crop"]): s for s in results["after"]["settings_results"]}
        for b in results["before"]["settings_results"]:
            a = after.get((b["workers"], b["crop"]))
            if a is None:
                continue
            lines.append(f"| {b['workers']}w {b['crop']}² | {b['samples_per_s']:.1f} -> {a['samples_per_s']:.1f} "
                         f"({a['samples_per_s'] / b['samples_per_s']:.2f}x) | {_fmt_pct(b['achieved_over_peak'])} -> "
                         f"{_fmt_pct(a['achieved_over_peak'])} | {_fmt_pct(b['data_wait_fraction'])} -> {_fmt_pct(a['data_wait_fraction'])} |")  # fmt: skip
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/step_profile_cpu.json"))
    ap.add_argument("--label", default="before", help="key of this run in the results file (before / after / ...)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--crops", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reports", type=int, default=3, help="timed log steps")
    ap.add_argument("--torch-threads", default="ray", help="'ray' (floor(dist.cpus_per_worker), as Ray sets) or a number")
    ap.add_argument("--note", default="", help="a line for the results file")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.width=16")
    args = ap.parse_args()

    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        manifest, source = _manifest(Path(tmp))
        peaks = {str(t): gemm_peak(t) for t in sorted({1, os.cpu_count() or 1})}
        if args.torch_threads != "ray":
            peaks.setdefault(str(int(args.torch_threads)), gemm_peak(int(args.torch_threads)))
        settings = []
        for workers in args.workers:
            for crop in args.crops:
                cfg = product_config(crop, workers, args.overrides)
                flops = count_flops(cfg, cfg.train.batch_size // workers)
                ranks = run_setting(workers, crop, args, manifest, args.overrides)
                s = summarise(workers, crop, ranks, flops, peaks, cfg)
                settings.append(s)
                print(f"{workers} worker(s), crop {crop}: {s['samples_per_s']:.1f} samples/s, achieved/peak "
                      f"{_fmt_pct(s['achieved_over_peak'])}, shares " + ", ".join(f"{p} {_fmt_pct(v)}" for p, v in s["shares"].items()),
                      flush=True)  # fmt: skip
        # the peak again at the end: a busy machine shows as a drift between the two
        peaks_end = {str(t): gemm_peak(t) for t in sorted({1, os.cpu_count() or 1})}
    import rcl_dist

    cfg = product_config(args.crops[0], args.workers[0], args.overrides)
    env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    command = env + "python benchmarks/step_profile.py " + " ".join(sys.argv[1:])
    run = {
        "command": command,
        "commit": commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}, "
                   f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}",
        "load_before": load_before,
        "load_after": load_average(),
        "gemm_peak": peaks,
        "gemm_peak_end": peaks_end,
        "settings": (f"U-Net width {cfg.model.width} depth {cfg.model.depth}, global batch {cfg.train.batch_size}, "
                     f"loss {cfg.loss.method}/{cfg.loss.distance} Q={cfg.loss.quantiles}, negatives {cfg.dist.negatives}, "
                     f"encoder {cfg.loss.encoder}, log_every {cfg.train.log_every}, {args.steps} timed steps after "
                     f"{args.warmup} warm-up per mode, overrides {args.overrides or 'none'}"),
        "source": source,
        "rcl_dist": str(Path(rcl_dist.__file__).parent),  # which tree ran (PYTHONPATH may point at another)
        "note": args.note,
        "settings_results": settings,
    }  # fmt: skip
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(args.out.with_suffix(".md"), results)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
