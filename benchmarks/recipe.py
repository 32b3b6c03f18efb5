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

``--proxy-labels N`` (for pre-training objectives without clean targets, e.g. ``loss.method=rcl``):
evaluate the proxy instead of the network's own head: the trained model is saved as a checkpoint and
``finetune_local(mode="proxy")`` fits a fresh last layer on N labelled CBSD432 crops
(:mod:`rcl_dist.train.probe`), as the fidelity harness does. The RCL diagnostics of the last log step
(gradient ratio, logit gap, contrastive loss against its uniform guess) go into the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ("model.name=unet model.width=16 model.depth=3 data.source=shared:train/CBSD432 data.tile=0 data.crop=64 "
        "loss.method=supervised loss.encoder=null train.batch_size=16 train.steps=1000 train.lr=1e-3 "
        "train.log_every=250 tracking.enabled=false")  # fmt: skip


def _proxy(model, cfg, labels: int, workdir: Path):
    """The model's body with a fresh last layer fitted on ``labels`` CBSD432 crops (the fidelity proxy)."""
    from rcl_dist.data.images import shared_data_dir
    from rcl_dist.data.index import index_images
    from rcl_dist.models.io import save_checkpoint
    from rcl_dist.train.finetune import finetune_local
    from rcl_dist.train.finetune_spec import FinetuneSpec

    manifest = workdir / "labels.parquet"
    if not manifest.is_file():
        index_images([(str(shared_data_dir() / "train" / "CBSD432"), "train")], manifest, seed=0, log=lambda *_: None)
    ckpt = save_checkpoint(workdir / "pretrained.pt", model, cfg)
    spec = FinetuneSpec(source=str(ckpt), task="denoise", mode="proxy", labels=labels, batch_size=16, crop=64,
                        manifest=str(manifest), tracking=False)  # fmt: skip
    proxy, metrics, _ = finetune_local(spec)
    return proxy, metrics


DIAGNOSTICS = ("contrast", "contrast_uniform", "logit_gap", "grad_ratio", "grad_contrast", "grad_consistency")


def run_cell(overrides: list[str], eval_limit: int, eval_set: str, proxy_labels: int = 0, workdir: Path | None = None) -> dict:
    import torch

    from rcl_dist.config import load_config
    from rcl_dist.data.images import shared_data_dir
    from rcl_dist.evaluate import evaluate_folder, summarise
    from rcl_dist.train.local import train_local

    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    model, hist = train_local(cfg, log=None)
    train_s = time.perf_counter() - t0
    extra: dict = {k: hist.metrics[k][-1] for k in DIAGNOSTICS if k in hist.metrics}
    if proxy_labels:
        model, pm = _proxy(model, cfg, proxy_labels, workdir)
        extra.update(proxy_labels=proxy_labels, probe_converged=bool(pm.get("probe_converged")))
    model.eval()
    table = evaluate_folder(model, shared_data_dir() / eval_set, "denoise", seed=0, limit=eval_limit, progress=None)
    s = summarise(table)
    return {
        "psnr": s["psnr_mean"], "ssim": s["ssim_mean"], "psnr_input": s["psnr_input_mean"], "n": s["n"],
        "train_seconds": round(train_s, 1), "final_loss": hist.metrics["loss"][-1], "threads": torch.get_num_threads(),
        **extra,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default=BASE, help="space-separated overrides every cell starts from")
    ap.add_argument("--cell", action="append", required=True, metavar="NAME|OVERRIDES")
    ap.add_argument("--eval-limit", type=int, default=12)
    ap.add_argument("--eval-set", default="test/CBSD68")
    ap.add_argument("--proxy-labels", type=int, default=0, help="evaluate a fresh last layer fitted on N labels (0: own head)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    cache_path = out.with_name(out.name + ".jsonl")
    done = {}
    if cache_path.is_file():
        for line in cache_path.read_text().splitlines():
            rec = json.loads(line)
            done[(rec["name"], tuple(rec["overrides"]))] = rec
    records = []
    scratch = tempfile.TemporaryDirectory()  # the label manifest (indexed once) and each cell's checkpoint
    workdir = Path(scratch.name)
    for item in args.cell:
        name, _, ov = item.partition("|")
        overrides = args.base.split() + ov.split()
        key = (name, tuple(overrides + [f"proxy_labels={args.proxy_labels}"] * bool(args.proxy_labels)))
        if key in done:
            records.append(done[key])
            continue
        print(f"[recipe] {name}: {ov}", flush=True)
        rec = {"name": name, "overrides": list(key[1]), "cell": ov,
               **run_cell(overrides, args.eval_limit, args.eval_set, args.proxy_labels, workdir)}  # fmt: skip
        print(f"[recipe] {name}: PSNR {rec['psnr']:.2f} dB (input {rec['psnr_input']:.2f}) in {rec['train_seconds']} s", flush=True)
        with open(cache_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
    scratch.cleanup()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = f"proxy on {args.proxy_labels} labels" if args.proxy_labels else "own head"
    lines = [
        f"# Recipe measurement: U-Net, {head}, {args.eval_set} (first {args.eval_limit} images, NLF sigma in [0, 20])\n",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/recipe.py', *(argv or sys.argv[1:])])}`",
        f"- commit: `{commit}`; machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        f"- base overrides: `{args.base}`\n",
    ]
    diag = [k for k in DIAGNOSTICS if any(k in r for r in records)]
    lines += [
        "| cell | overrides | PSNR (dB) | SSIM | noisy input (dB) | gain (dB) | train s |" + "".join(f" {k} |" for k in diag),
        "|---|---|---|---|---|---|---|" + "---|" * len(diag),
    ]
    for r in records:
        lines.append(f"| {r['name']} | `{r['cell']}` | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['psnr_input']:.2f} | "
                     f"{r['psnr'] - r['psnr_input']:+.2f} | {r['train_seconds']:.0f} |"
                     + "".join(f" {r[k]:.3g} |" if k in r else " |" for k in diag))  # fmt: skip
    out.with_name(out.name + ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
