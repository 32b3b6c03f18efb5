"""Recipe measurement: which training settings make a denoiser beat its noisy input at the CPU budget.

    python benchmarks/recipe.py --out benchmarks/results/recipe_cpu \
        --cell 'A|model.global_residual=false' --cell 'B|model.global_residual=true' ...

Each cell trains the supervised U-Net (``loss.method=supervised``: the Oracle of the fidelity matrix,
clean targets, NLF noise with sigma in [0, 20] drawn per crop) in one process (``train_local``: no
Ray, no DALI: the recipe is the same on every engine) on CBSD432 crops with the cell's config
overrides on top of ``--base``, then evaluates the model with its own last layer on the first
``--eval-limit`` CBSD68 images (fixed NLF test noise, evaluation seed 0, the fidelity harness's
inputs). Results: ``<out>.md`` (table with the command, commit and machine) and ``<out>.jsonl``
(one line per finished cell; a rerun skips cells already there with the same overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ("model.name=unet model.width=16 model.depth=3 data.source=shared:train/CBSD432 data.tile=0 data.crop=64 "
        "loss.method=supervised loss.encoder=null train.batch_size=16 train.steps=1000 train.lr=1e-3 "
        "train.log_every=250 tracking.enabled=false")  # fmt: skip


def run_cell(overrides: list[str], eval_limit: int, eval_set: str) -> dict:
    import torch

    from rcl_dist.config import load_config
    from rcl_dist.data.images import shared_data_dir
    from rcl_dist.evaluate import evaluate_folder, summarise
    from rcl_dist.train.local import train_local

    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    model, hist = train_local(cfg, log=None)
    train_s = time.perf_counter() - t0
    model.eval()
    table = evaluate_folder(model, shared_data_dir() / eval_set, "denoise", seed=0, limit=eval_limit, progress=None)
    s = summarise(table)
    return {
        "psnr": s["psnr_mean"], "ssim": s["ssim_mean"], "psnr_input": s["psnr_input_mean"], "n": s["n"],
        "train_seconds": round(train_s, 1), "final_loss": hist.metrics["loss"][-1], "threads": torch.get_num_threads(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default=BASE, help="space-separated overrides every cell starts from")
    ap.add_argument("--cell", action="append", required=True, metavar="NAME|OVERRIDES")
    ap.add_argument("--eval-limit", type=int, default=12)
    ap.add_argument("--eval-set", default="test/CBSD68")
    args = ap.parse_args(argv)
    out = Path(args.out)
    cache_path = out.with_name(out.name + ".jsonl")
    done = {}
    if cache_path.is_file():
        for line in cache_path.read_text().splitlines():
            rec = json.loads(line)
            done[(rec["name"], tuple(rec["overrides"]))] = rec
    records = []
    for item in args.cell:
        name, _, ov = item.partition("|")
        overrides = args.base.split() + ov.split()
        key = (name, tuple(overrides))
        if key in done:
            records.append(done[key])
            continue
        print(f"[recipe] {name}: {ov}", flush=True)
        rec = {"name": name, "overrides": overrides, "cell": ov, **run_cell(overrides, args.eval_limit, args.eval_set)}
        print(f"[recipe] {name}: PSNR {rec['psnr']:.2f} dB (input {rec['psnr_input']:.2f}) in {rec['train_seconds']} s", flush=True)
        with open(cache_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Recipe measurement: supervised U-Net, own head, {args.eval_set} (first {args.eval_limit} images, NLF sigma in [0, 20])\n",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/recipe.py', *(argv or sys.argv[1:])])}`",
        f"- commit: `{commit}`; machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        f"- base overrides: `{args.base}`\n",
        "| cell | overrides | PSNR (dB) | SSIM | noisy input (dB) | gain (dB) | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['name']} | `{r['cell']}` | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['psnr_input']:.2f} | "
                     f"{r['psnr'] - r['psnr_input']:+.2f} | {r['train_seconds']:.0f} |")  # fmt: skip
    out.with_name(out.name + ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
