"""The GPU path in one command: input pipeline, one pre-training step in bf16, the loss with a queue.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_h200          # on a GPU machine, < 8 min
    python benchmarks/gpu_check.py --cpu --out benchmarks/results/gpu_check_cpu     # the same code paths, CPU, small

Everything is written to ``<out>.json`` and ``<out>.md``; a part that fails is recorded with its error
and the others still run. Parts:

1. **Input**: the DALI pre-training pair pipeline (``rcl_dist.data.dali.DALILoader``, mixed decoder and
   GPU operators with ``device_id=0``) at 128^2 crops, batch 64: pairs/s; beside it the PyTorch
   reference DataLoader (``rcl_dist.data.reference.make_loader``) doing the same work on this
   machine's CPUs with 0, 4 and (cores - 2) workers. Images: the photographs bundled with
   scikit-image cut into 256^2 tiles (no ``shared/`` data on a lent machine), indexed into a manifest.
2. **Peak**: a dense GEMM (8192^2, bf16 on the GPU; 2048^2 fp32 on the CPU), timed here, so every
   achieved figure is a fraction of what this chip does.
3. **Step**: one pre-training step of Eq. 6 (the paper's U-Net 32/4, RCL-EMD with the
   EfficientNet-Lite0 consistency term, Adam) with bf16 autocast and channels_last, fed by the DALI
   loader: samples/s, the fraction of the step spent waiting for data, and achieved FLOP/s
   (``torch.utils.flop_counter`` on one step, forward + backward) against the GEMM peak. Then the same
   with ``torch.compile`` of the U-Net when it compiles within ``--compile-budget`` seconds.
4. **Queue**: the loss with 4096 queued negatives (``extra_negatives``) against none: step time.

A 2-rank NCCL run on one GPU is not attempted: NCCL refuses two ranks on one device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bundled_manifest(folder: Path, tile: int) -> Path:
    """scikit-image's photographs as ``tile``^2 PNG tiles, indexed (seed 0, NLF sigma in [0, 20])."""
    from PIL import Image

    from rcl_dist.data.images import bundled_images
    from rcl_dist.data.images import tile as cut
    from rcl_dist.data.index import index_images

    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(cut(bundled_images(), tile)):
        Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(img_dir / f"t{i:03d}.png")
    out = folder / "manifest.parquet"
    index_images([(str(img_dir), "train")], out, log=lambda *_: None)
    return out


def rate(loader_iter: Callable[[], Any], batches: int, batch: int, device: torch.device, warmup: int = 2) -> float:
    """Pairs/s over ``batches`` batches after ``warmup``."""
    it = loader_iter()
    for _ in range(warmup):
        next(it)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        next(iter(b.values())).sum().item() if device.type == "cuda" else None  # the batch has arrived
    _sync(device)
    return batches * batch / (time.perf_counter() - t0)


def endless(loader):
    while True:
        yield from loader


def part_input(args, manifest: Path, device: torch.device) -> dict:
    from rcl_dist.data.dali import DALILoader
    from rcl_dist.data.reference import make_loader
    from rcl_dist.data.spec import PairSpec

    spec = PairSpec(task="pretrain", crop=args.crop, batch_size=args.batch, seed=0)
    out: dict[str, Any] = {"crop": args.crop, "batch": args.batch}
    dev_id = device.index if device.type == "cuda" else None
    dali = DALILoader(manifest, spec, device_id=dev_id, num_threads=args.threads)
    out["dali_pairs_per_s"] = rate(lambda: endless(dali), args.batches, args.batch, device)
    cores = os.cpu_count() or 1
    for w in sorted({0, min(4, cores), max(cores - 2, 0)}):
        loader = make_loader(manifest, spec, num_workers=w)
        out[f"dataloader_{w}_workers_pairs_per_s"] = rate(lambda: endless(loader), args.batches, args.batch, torch.device("cpu"))
    return out


def part_peak(args, device: torch.device) -> dict:
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (args.gemm_cpu, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    sec = (time.perf_counter() - t0) / reps
    return {"gemm_n": n, "dtype": str(dtype), "peak_flops": 2 * n**3 / sec}


def _objective(args, device: torch.device):
    from rcl_dist.config import load_config
    from rcl_dist.models.factory import build_model_from_config
    from rcl_dist.losses.build import build_consistency_from_config, build_objective_from_config

    cfg = load_config(None, [f"model.width={args.width}", f"model.depth={args.depth}", f"data.crop={args.crop}",
                             f"train.batch_size={args.batch}"])  # fmt: skip
    model = build_model_from_config(cfg).to(device).to(memory_format=torch.channels_last)
    objective = build_objective_from_config(cfg, build_consistency_from_config(cfg), torch.Generator().manual_seed(0)).to(device)
    return cfg, model, objective


def _step(model, objective, opt, batch, autocast, extra=None):
    with autocast:
        out = objective(model, batch, extra_negatives=extra)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    return out


def part_step(args, manifest: Path, device: torch.device, peak: float | None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from rcl_dist.data.dali import DALILoader
    from rcl_dist.data.spec import PairSpec

    cfg, model, objective = _objective(args, device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32)
    spec = PairSpec(task="pretrain", crop=args.crop, batch_size=args.batch, seed=0)
    dali = DALILoader(manifest, spec, device_id=device.index if device.type == "cuda" else None, num_threads=args.threads)
    it = endless(dali)

    def to_dev(b):
        return {k: v.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last) for k, v in b.items()}

    batch = to_dev(next(it))
    with FlopCounterMode(display=False) as counter:
        _step(model, objective, opt, batch, autocast)
    flops = counter.get_total_flops()

    def run(steps: int, net) -> dict:
        waits, totals = [], []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            b = to_dev(next(it))
            _sync(device)
            t1 = time.perf_counter()
            _step(net, objective, opt, b, autocast)
            _sync(device)
            t2 = time.perf_counter()
            if i >= 2:  # warm-up excluded
                waits.append(t1 - t0)
                totals.append(t2 - t0)
        sec = statistics.fmean(totals)
        res = {"samples_per_s": args.batch / sec, "step_s": sec, "data_wait_fraction": sum(waits) / sum(totals),
               "flops_per_step": flops, "achieved_flops": flops / sec}  # fmt: skip
        if peak:
            res["achieved_over_peak"] = flops / sec / peak
        return res

    out = {"bf16": not args.fp32, "channels_last": True, "eager": run(args.steps, model)}
    if args.compile_budget > 0:
        try:
            t0 = time.perf_counter()
            compiled = torch.compile(model)
            _step(compiled, objective, opt, batch, autocast)  # compiles
            took = time.perf_counter() - t0
            out["compile_s"] = took
            if took <= args.compile_budget:
                out["compiled"] = run(args.steps, compiled)
            else:
                out["compiled"] = f"compiled in {took:.0f} s, over the {args.compile_budget} s budget: not timed"
        except Exception as e:  # noqa: BLE001 - report and go on
            out["compiled"] = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return out


def part_queue(args, device: torch.device) -> dict:
    cfg, model, objective = _objective(args, device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32)
    g = torch.Generator().manual_seed(0)
    q = (0.5 + 0.05 * torch.randn(args.batch, 3, args.crop, args.crop, generator=g)).to(device)
    batch = {"q": q, "k": q.roll(1, -1)}
    sketch = objective.contrastive.sketch(torch.zeros(1, 3, args.crop, args.crop, device=device))
    queue = torch.randn(args.queue, *sketch.shape[1:], device=device) * 0.01
    res = {}
    for name, extra in (("no_queue", None), (f"queue_{args.queue}", queue)):
        times = []
        for i in range(args.steps + 2):
            _sync(device)
            t0 = time.perf_counter()
            _step(model, objective, opt, batch, autocast, extra)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        res[f"{name}_step_s"] = statistics.fmean(times)
    res["queue_overhead"] = res[f"queue_{args.queue}_step_s"] / res["no_queue_step_s"] - 1
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="no GPU: the same parts at small sizes (checks the code paths)")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batches", type=int, default=50, help="batches timed per input pipeline")
    ap.add_argument("--steps", type=int, default=20, help="training steps timed")
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=8, help="DALI threads")
    ap.add_argument("--compile-budget", type=float, default=120.0, help="seconds torch.compile may take (0: skip)")
    ap.add_argument("--gemm-cpu", type=int, default=2048)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = ap.parse_args(argv)
    if args.cpu:  # small: the code paths, not the numbers
        args.crop, args.batch, args.width, args.depth = 64, 8, 8, 2
        args.batches, args.steps, args.queue, args.threads, args.compile_budget = 4, 2, 256, 1, 0.0
    device = torch.device("cuda:0" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPU cores, "
        + (torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU") + f", torch {torch.__version__}",
        "args": vars(args),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        manifest = bundled_manifest(Path(tmp), 256)
        parts: list[tuple[str, Callable[[], dict]]] = [
            ("input", lambda: part_input(args, manifest, device)),
            ("peak", lambda: part_peak(args, device)),
            ("step", lambda: part_step(args, manifest, device, (results.get("peak") or {}).get("peak_flops"))),
            ("queue", lambda: part_queue(args, device)),
        ]
        for name, fn in parts:
            t0 = time.perf_counter()
            try:
                results[name] = fn()
            except Exception as e:  # noqa: BLE001 - one failing part must not lose the others
                results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
            print(f"[gpu_check] {name}: {json.dumps(results[name], default=str)[:400]}", flush=True)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    lines = [f"# GPU path check ({'CPU code-path run, numbers not meaningful' if args.cpu else device})", "",
             f"- command: `{results['command']}`", f"- commit {results['commit']}; {results['machine']}",
             f"- wall {results['wall_s']} s", ""]  # fmt: skip
    for name, _ in parts:
        lines.append(f"## {name}\n")
        lines.append("```\n" + json.dumps(results[name], indent=1, default=str)[:3000] + "\n```\n")
    out.with_suffix(".md").write_text("\n".join(lines))
    return 0 if not any(isinstance(results.get(n), dict) and "error" in results[n] for n, _ in parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
