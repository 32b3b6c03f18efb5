"""Loss benchmark: time of one residual contrastive loss evaluation and the EMD sketch's error.

    python benchmarks/loss_timing.py --out benchmarks/results/loss_timing_cpu.md

1. Error of the quantile sketch (default Q=256) against exact EMD, on the residuals RCL is built on:
   heteroscedastic NLF noise (App. C.1 sampler, sigma in [0, 20/255]) on crops of bundled photographs,
   one (shot, read) pair per image, 64 images, every pair (i, j) of first/second crops.
2. Wall time of one loss evaluation (forward, and forward + backward) at batch N+1 = 64,
   3 channels, crops 64x64 and 128x128, for each distance; median of repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from rcl_dist.data.images import bundled_images, tile
from rcl_dist.data.sampler import PairSampler
from rcl_dist.losses.contrastive import ResidualContrastiveLoss
from rcl_dist.losses.distances import get_distance


def noise_residuals(crop: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals noisy - clean of two crops per image: the target residual distribution."""
    images = tile(bundled_images(), crop + crop // 2)
    gen = torch.Generator().manual_seed(seed)
    sampler = PairSampler(images, crop=crop, overlap=0.5, generator=gen)
    b = sampler.sample(min(n, len(images)), "clean")
    res_q = b["input"] - b["target"]
    b = sampler.sample(min(n, len(images)), "clean")
    return res_q, b["input"] - b["target"]


def sketch_error(crop: int, quantiles: int) -> dict[str, float]:
    res_q, res_k = noise_residuals(crop, 64)
    exact = get_distance("emd", quantiles=None)
    approx = get_distance("emd", quantiles=quantiles)
    d_exact = exact.pairwise(exact.sketch(res_q.double()), exact.sketch(res_k.double()))
    d_q = approx.pairwise(approx.sketch(res_q.double()), approx.sketch(res_k.double()))
    rel = ((d_exact - d_q) / d_exact).flatten()
    return {
        "pairs": rel.numel(),
        "mean_rel": rel.abs().mean().item(),
        "max_rel": rel.abs().max().item(),
        "mean_emd": d_exact.mean().item(),
    }


def time_loss(distance: str, crop: int, backward: bool, repeats: int, **opts) -> float:
    gen = torch.Generator().manual_seed(0)
    loss = ResidualContrastiveLoss(distance, temperature=0.1, **opts)
    q = (0.05 * torch.randn(64, 3, crop, crop, generator=gen)).requires_grad_(backward)
    k = (0.05 * torch.randn(64, 3, crop, crop, generator=gen)).requires_grad_(backward)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        if backward:
            loss(q, k).backward()
        else:
            with torch.no_grad():
                loss(q, k)
        if i:  # first run is warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    lines = [
        "# Residual contrastive loss: sketch error and evaluation time",
        "",
        f"Command: `python benchmarks/loss_timing.py --out {args.out}` (also `make bench`)",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.platform()}",
        "",
        "## EMD quantile sketch vs exact EMD (relative error over all 64x64 = 4096 pairs)",
        "",
        "| crop | Q | mean EMD | mean rel. error | max rel. error |",
        "|---|---|---|---|---|",
    ]
    for crop in (64, 128):
        for q in (64, 256, 1024):
            e = sketch_error(crop, q)
            lines.append(f"| {crop}x{crop} | {q} | {e['mean_emd']:.4g} | {e['mean_rel']:.2e} | {e['max_rel']:.2e} |")
            print(lines[-1], flush=True)
    lines += [
        "",
        "## One loss evaluation, batch N+1 = 64, 3 channels (median of repeats, seconds)",
        "",
        "| distance | crop | forward | forward + backward |",
        "|---|---|---|---|",
    ]
    cases = [("emd", {"quantiles": 256}, "emd (Q=256)"), ("emd", {"quantiles": None}, "emd (exact)"), ("bd", {}, "bd"), ("mmd", {}, "mmd (S=32)")]
    for crop in (64, 128):
        for name, opts, label in cases:
            f = time_loss(name, crop, False, args.repeats, **opts)
            fb = time_loss(name, crop, True, args.repeats, **opts)
            lines.append(f"| {label} | {crop}x{crop} | {f:.4f} | {fb:.4f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
