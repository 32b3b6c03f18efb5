"""Full fine-tuning recipes on few labels, from one pre-trained checkpoint: which recipe keeps the
pre-training's gain?

For each recipe and label count, ``finetune_local`` fine-tunes the whole network on exactly that many
labelled crops (the label set of ``rcl_dist.train.labels.build_label_set``, seed 0, nested across
counts) and the result is evaluated on the first ``--eval-limit`` images of each test folder
(evaluation seed 0, NLF noise sigma in [0, 20], the inputs every fidelity row sees). The checkpoint as
it is (no labels) is the zero-label row. Each row records the label L1 before and after fine-tuning,
so an optimisation failure (label L1 up) reads apart from over-fitting (label L1 down, test PSNR down).

A recipe is ``NAME:key=value,...`` over FinetuneSpec fields (``lr``, ``steps``, ``warmup``,
``schedule``, ``head``, ``batch_size``, ``probe_first``, ``augment``, ...): e.g. ``low-lr:lr=2e-4``.
``source=none`` trains the fidelity harness's from-scratch network instead (``random_init_config`` of
its ``cpu`` preset: the input-skip U-Net 16/3 of its "SL (scratch)" rows) on the same labels.

    python benchmarks/finetune_recipe.py --source CKPT --manifest M.parquet --labels 10 100 \\
        --recipe paper:lr=2e-3 --recipe low:lr=2e-4 --out benchmarks/results/finetune_recipe_cpu
    python benchmarks/finetune_recipe.py ... --recipe lpft:probe_first=true,lr=2e-4,augment=none \\
        --recipe lpft-aug:probe_first=true,lr=2e-4,augment=auto --recipe scratch:source=none,augment=none ...
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_recipe(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    fields: dict = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        if v.lower() in ("true", "false"):
            fields[k.strip()] = v.lower() == "true"
            continue
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                continue
        fields[k.strip()] = v
    return name, fields


def evaluate(model, folders, limit) -> dict:
    from rcl_dist.evaluate import evaluate_folder, summarise

    out = {}
    for folder in folders:
        s = summarise(evaluate_folder(model, folder, "denoise", seed=0, limit=limit, progress=None))
        out[Path(folder).name] = {"psnr": s["psnr_mean"], "ssim": s["ssim_mean"], "input": s["psnr_input_mean"]}
    return out


def main() -> int:
    from rcl_dist.models.io import load_checkpoint
    from rcl_dist.train.finetune import finetune_local
    from rcl_dist.train.finetune_spec import FinetuneSpec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="pre-training checkpoint")
    ap.add_argument("--manifest", required=True, help="labelled images (rcl-dist data index)")
    ap.add_argument("--labels", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--recipe", action="append", required=True, help="NAME:field=value,... (repeatable)")
    ap.add_argument("--test", nargs="+", required=True, help="test folders")
    ap.add_argument("--eval-limit", type=int, default=12)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="output stem: writes <out>.md and <out>.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    model, _, _ = load_checkpoint(args.source)
    rows.append({"recipe": "none (zero labels)", "labels": 0, "eval": evaluate(model, args.test, args.eval_limit)})
    print(json.dumps(rows[-1]), flush=True)
    for text in args.recipe:
        name, fields = parse_recipe(text)
        for n in args.labels:
            base = dict(source=args.source, task="denoise", mode="full", labels=n, steps=1000, batch_size=min(16, n),
                        lr=2e-3, seed=0, crop=args.crop, manifest=args.manifest, schedule="cosine", warmup=50,
                        tracking=False, log_every=50)  # fmt: skip
            base.update(fields)
            if base["source"] == "none":  # the harness's from-scratch network
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                from fidelity import PRESETS, random_init_config

                base["config"] = random_init_config(PRESETS["cpu"], False, supervised=True)
            t0 = time.perf_counter()
            model, metrics, history = finetune_local(FinetuneSpec(**base))
            secs = time.perf_counter() - t0
            row = {"recipe": name, "fields": fields, "labels": n, "seconds": round(secs, 1),
                   "label_l1_initial": metrics.get("label_l1_initial"), "label_l1": metrics.get("label_l1"),
                   "loss_curve": [round(h["loss"], 5) for h in history], "eval": evaluate(model, args.test, args.eval_limit)}  # fmt: skip
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "loss_curve"}), flush=True)

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = {"command": "python " + " ".join(sys.argv), "commit": commit, "torch": torch.__version__,
            "machine": f"{platform.platform()}, {torch.get_num_threads()} threads", "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}  # fmt: skip
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    sets = [Path(f).name for f in args.test]
    lines = [f"# Full fine-tuning recipes on few labels\n", *[f"- **{k}**: `{v}`" for k, v in meta.items()], "",
             "| recipe | labels | label L1 before -> after | " + " | ".join(f"{s} PSNR / SSIM" for s in sets) + " | seconds |",
             "|---|---|---|" + "---|" * len(sets) + "---|"]  # fmt: skip
    for r in rows:
        l1 = "" if r["labels"] == 0 else f"{r['label_l1_initial']:.4f} -> {r['label_l1']:.4f}"
        cells = " | ".join(f"{r['eval'][s]['psnr']:.2f} / {r['eval'][s]['ssim']:.4f}" for s in sets)
        lines.append(f"| {r['recipe']} {r.get('fields', '')} | {r['labels']} | {l1} | {cells} | {r.get('seconds', '')} |")
    lines.append("\nInput PSNR: " + ", ".join(f"{s} {rows[0]['eval'][s]['input']:.2f}" for s in sets))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
