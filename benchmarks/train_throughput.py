"""Training throughput: the sketch-based loss against a naive one, and the distributed job on Ray.

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json

1. ``loss_speedup_vs_naive``: one forward + backward of the residual contrastive loss at batch 64,
   128x128 crops, 3 channels: the library (sketches: one sort per crop, Q=256 cell means, pairwise L1)
   against a naive implementation that computes every pairwise EMD from full sorts of both crops.
2. Ray Train runs of ``rcl-dist pretrain`` (local Ray, CPU, DALI input, no MLflow) with the same
   model and global batch: samples/s with 1 and 2 workers; step time with ``global`` vs ``local``
   negatives on 2 workers; ``global+queue`` with growing queues, to find the largest negative set per
   anchor within 10 % of the local step time. Each figure is the rate over the last logging window
   (warm-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from rcl_dist.losses.contrastive import ResidualContrastiveLoss


def naive_loss(res_q: torch.Tensor, res_k: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 3 with each EMD computed from full sorts of both crops, per pair and channel."""
    n = res_q.shape[0]
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            a = torch.sort(res_q[i].flatten(1), dim=-1).values  # [C, P]
            b = torch.sort(res_k[j].flatten(1), dim=-1).values
            row.append((a - b).abs().mean())
        rows.append(torch.stack(row))
    logits = -torch.stack(rows) / tau
    return torch.nn.functional.cross_entropy(logits, torch.arange(n), reduction="sum")


def time_loss(fn, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    q = (0.05 * torch.randn(64, 3, 128, 128, generator=g)).requires_grad_(True)
    k = (0.05 * torch.randn(64, 3, 128, 128, generator=g)).requires_grad_(True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(q, k).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ray_rate(overrides: list[str], home: Path) -> dict:
    from rcl_dist.config import load_config
    from rcl_dist.train.launch import run_pretrain

    name = f"bench-{time.time_ns()}"
    cfg = load_config(None, [*overrides, f"dist.run_name={name}", f"dist.storage_path={home / 'ray'}", "tracking.enabled=false"])
    r = run_pretrain(cfg, log=lambda *_: None)
    return {"samples_per_s": r.metrics["samples_per_s"], "data_wait_fraction": r.metrics["data_wait_fraction"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    result: dict = {}

    tau = 0.1
    lib = ResidualContrastiveLoss("emd", temperature=tau)
    t_lib = time_loss(lambda q, k: lib(q, k), repeats=5)
    t_naive = time_loss(lambda q, k: naive_loss(q, k, tau), repeats=1)
    result.update(loss_s_sketch=t_lib, loss_s_naive=t_naive, loss_speedup_vs_naive=t_naive / t_lib)
    print(f"loss fwd+bwd, batch 64, 128x128x3: sketch {t_lib:.3f} s, naive {t_naive:.1f} s", flush=True)

    base_batch = 16
    common = [
        "model.width=16",
        "model.depth=3",
        "data.crop=64",
        "data.tile=128",
        "data.engine=dali",
        "data.threads=1",
        f"train.batch_size={base_batch}",
        f"train.steps={args.steps}",
        f"train.log_every={args.steps // 3}",
        f"dist.checkpoint_every={args.steps}",
    ]
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["RCL_DIST_HOME"] = str(home)
        runs["1w_local"] = ray_rate([*common, "dist.workers=1", "dist.negatives=local"], home)
        runs["2w_local"] = ray_rate([*common, "dist.workers=2", "dist.negatives=local"], home)
        runs["2w_global"] = ray_rate([*common, "dist.workers=2", "dist.negatives=global"], home)
        for q in (64, 256, 1024, 4096):
            runs[f"2w_queue{q}"] = ray_rate(
                [*common, "dist.workers=2", "dist.negatives=global+queue", f"dist.queue_size={q}"], home
            )
        for k, v in runs.items():
            print(f"{k}: {v['samples_per_s']:.1f} samples/s, data wait {100 * v['data_wait_fraction']:.0f}%", flush=True)
    local = runs["2w_local"]["samples_per_s"]
    b_local = base_batch // 2
    result["samples_per_s_1w"] = runs["1w_local"]["samples_per_s"]
    result["samples_per_s_2w"] = local
    result["global_negatives_overhead"] = local / runs["2w_global"]["samples_per_s"] - 1.0
    within = [base_batch - 1]  # global negatives per anchor
    for q in (64, 256, 1024, 4096):
        if local / runs[f"2w_queue{q}"]["samples_per_s"] - 1.0 <= 0.10:
            within.append(base_batch - 1 + q)
    result["max_negatives_at_10pct"] = max(within)
    result["local_batch"] = b_local
    result["max_negatives_over_local_batch"] = max(within) / b_local
    result["runs"] = runs
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    result.update(
        command=f"python benchmarks/train_throughput.py --out {args.out}",
        commit=commit,
        machine=f"{platform.machine()}, {os.cpu_count()} cores, no GPU, {platform.platform()}",
        settings=common,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
