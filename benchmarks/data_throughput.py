"""Input-pipeline throughput: DALI vs a PyTorch DataLoader doing the same work vs decode-only.

    python benchmarks/data_throughput.py --out benchmarks/results/data_throughput.json

Pre-training pairs per second (Sec. 3.4: parent crop, noise once, two overlapping crops, float CHW)
from ``../shared/data/train/CBSD432`` (fallback: the photographs bundled with scikit-image, written
as PNGs), at 64x64 and 128x128 crops, batch 32:

* DALI: ``rcl_dist.data.dali.DALILoader`` on the CPU (``device_id=None``), ``num_threads`` in {1, 2, 4};
* PyTorch: ``rcl_dist.data.reference.make_loader`` with ``num_workers`` in {0, 1, 2, 3};
* decode-only: a DALI file reader + CPU image decoder and nothing else (the input stage's limit);
  images per second, one pair per image.

The best setting of each is reported (the same cores for all), with every setting in ``details``.
With ``--gpu`` (a GPU present) the DALI pipeline is also measured with ``device_id=0`` at 128x128.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from rcl_dist.data.images import shared_data_dir
from rcl_dist.data.spec import PairSpec

BATCH = 32


def _source_folder(tmp: Path) -> tuple[Path, str]:
    root = shared_data_dir()
    if root is not None and (root / "train" / "CBSD432").is_dir():
        return root / "train" / "CBSD432", "shared/data/train/CBSD432 (432 JPEG, 481x321)"
    from skimage import io

    from rcl_dist.data.images import bundled_images

    out = tmp / "bundled"
    out.mkdir()
    for i, img in enumerate(bundled_images()):
        io.imsave(out / f"{i}.png", (img.transpose(1, 2, 0) * 255).round().astype(np.uint8), check_contrast=False)
    return out, "scikit-image bundled photographs (PNG)"


def _rate(loader, seconds: float, warmup: int = 2) -> float:
    """Pairs per second over at least ``seconds`` (after ``warmup`` batches), across epochs."""
    it, n, t0 = iter(loader), 0, None
    batches = 0
    while True:
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            continue
        batches += 1
        if batches == warmup:
            t0 = time.perf_counter()
        elif batches > warmup:
            n += BATCH
            if time.perf_counter() - t0 >= seconds:
                return n / (time.perf_counter() - t0)


def _decode_only(files: list[str], threads: int, seconds: float) -> float:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=BATCH, num_threads=threads, device_id=None, prefetch_queue_depth=2)
    def pipe():
        enc, _ = fn.readers.file(files=files, random_shuffle=True, seed=0, name="Reader")
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    for _ in range(2):
        p.run()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        p.run()
        n += BATCH
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/data_throughput.json"))
    ap.add_argument("--seconds", type=float, default=8.0, help="measuring time per setting")
    ap.add_argument("--gpu", action="store_true", help="also measure the GPU pipeline (device_id=0)")
    args = ap.parse_args()

    from rcl_dist.data.dali import DALILoader
    from rcl_dist.data.index import index_images
    from rcl_dist.data.reference import make_loader

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder, source = _source_folder(tmp)
        manifest = tmp / "manifest.parquet"
        index_images([f"{folder}:train"], manifest, log=lambda *_: None)
        import pyarrow.parquet as pq

        files = pq.read_table(manifest).column("path").to_pylist()
        details: dict = {"dali": {}, "torch": {}, "decode_only": {}, "gpu": {}}
        for crop in (64, 128):
            spec = PairSpec(task="pretrain", crop=crop, batch_size=BATCH)
            for threads in (1, 2, 4):
                r = _rate(DALILoader(manifest, spec, num_threads=threads), args.seconds)
                details["dali"][f"{crop}/threads={threads}"] = r
                print(f"dali   crop {crop} threads {threads}: {r:.1f} pairs/s", flush=True)
            for workers in (0, 1, 2, 3):
                r = _rate(make_loader(manifest, spec, num_workers=workers), args.seconds)
                details["torch"][f"{crop}/workers={workers}"] = r
                print(f"torch  crop {crop} workers {workers}: {r:.1f} pairs/s", flush=True)
            if args.gpu:
                r = _rate(DALILoader(manifest, spec, device_id=0, num_threads=4), args.seconds)
                details["gpu"][f"{crop}/threads=4"] = r
        for threads in (1, 2, 4):
            r = _decode_only(files, threads, args.seconds)
            details["decode_only"][f"threads={threads}"] = r
            print(f"decode-only threads {threads}: {r:.1f} images/s", flush=True)

    def best(kind: str, crop: int) -> float:
        return max(v for k, v in details[kind].items() if k.startswith(f"{crop}/"))

    dali_128, torch_128, dec = best("dali", 128), best("torch", 128), max(details["decode_only"].values())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    result = {
        "dali_pairs_per_s": dali_128,
        "torch_pairs_per_s": torch_128,
        "decode_only_per_s": dec,
        "dali_over_torch": dali_128 / torch_128,
        "dali_over_decode_only": dali_128 / dec,
        "at_64": {"dali_pairs_per_s": best("dali", 64), "torch_pairs_per_s": best("torch", 64)},
        "gpu_dali_pairs_per_s_128": max(details["gpu"].values()) if details["gpu"] else None,
        "batch": BATCH,
        "source": source,
        "details": details,
        "command": f"python benchmarks/data_throughput.py --out {args.out}",
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(
        "# Input pipeline throughput (pre-training pairs)\n\n"
        f"Command: `{result['command']}`  \nCommit: {commit}  \nMachine: {result['machine']}  \n"
        f"Data: {source}; batch {BATCH}; best setting of each\n\n"
        "| pipeline | 64x64 pairs/s | 128x128 pairs/s |\n|---|---|---|\n"
        f"| DALI (CPU) | {best('dali', 64):.1f} | {dali_128:.1f} |\n"
        f"| PyTorch DataLoader | {best('torch', 64):.1f} | {torch_128:.1f} |\n"
        f"| decode-only (images/s) | {dec:.1f} | {dec:.1f} |\n\n"
        f"DALI / DataLoader at 128: {result['dali_over_torch']:.2f}x; DALI / decode-only: "
        f"{result['dali_over_decode_only']:.2f}x\n\nAll settings:\n\n```\n{json.dumps(details, indent=2)}\n```\n"
    )
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
