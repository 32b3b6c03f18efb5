"""Wall time of one proxy fit (features + solve + refinement) at the fidelity cpu preset's scale.

    python benchmarks/probe_timing.py --out benchmarks/results/probe_timing_cpu [--source CKPT]

One process (``finetune_local``), task denoise, 200 labelled 64x64 CBSD432 crops, a U-Net of width 16
and depth 3 (random initialisation unless ``--source`` names a checkpoint; the time does not depend on
the weights), for each fit of :mod:`rcl_dist.train.probe`: ``lstsq``, ``lstsq+l1`` and ``adam`` (300
steps on the cached features). Reports the whole ``finetune_local`` call (label crops included) and
the probe's own split (features, solve, refinement), and the label L1 each fit reaches.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", default="none")
    ap.add_argument("--labels", type=int, default=200)
    args = ap.parse_args(argv)

    import torch

    from rcl_dist.config import load_config
    from rcl_dist.data.images import shared_data_dir
    from rcl_dist.data.index import index_images
    from rcl_dist.train.finetune import finetune_local
    from rcl_dist.train.finetune_spec import FinetuneSpec

    root = shared_data_dir()
    if root is None:
        raise SystemExit("needs shared/data (CBSD432)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "m.parquet"
        index_images([(str(root / "train" / "CBSD432"), "train")], manifest, seed=0, log=lambda *_: None)
        cfg = load_config(None, ["model.width=16", "model.depth=3"]).to_dict()
        for fit in ("lstsq", "lstsq+l1", "adam"):
            spec = FinetuneSpec(source=args.source, task="denoise", mode="proxy", labels=args.labels, steps=300,
                                batch_size=16, crop=64, manifest=str(manifest), tracking=False, fit=fit,
                                config=cfg if args.source == "none" else None)  # fmt: skip
            t0 = time.perf_counter()
            _, m, _ = finetune_local(spec)
            rows.append((fit, time.perf_counter() - t0, m))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Proxy fit timing: {args.labels} labels of 64x64, U-Net 16/3, one process\n",
        f"- command: `python benchmarks/probe_timing.py {' '.join(argv or sys.argv[1:])}`",
        f"- commit `{commit}`; {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n",
        "| fit | whole call (s) | features (s) | solve (s) | refinement (s) | iterations | converged | label L1 closed form | label L1 final |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fit, sec, m in rows:
        lines.append(f"| {fit} | {sec:.1f} | {m['probe_feature_seconds']:.2f} | {m['probe_solve_seconds']:.2f} | "
                     f"{m['probe_refine_seconds']:.2f} | {m['probe_iterations']:.0f} | {bool(m['probe_converged'])} | "
                     f"{m.get('probe_lstsq_l1', float('nan')):.5f} | {m['label_l1']:.5f} |")  # fmt: skip
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
