"""Input-pipeline throughput: DALI vs a PyTorch DataLoader doing the same work vs the input stage's limits.

    python benchmarks/data_throughput.py --out benchmarks/results/data_throughput.json

Pre-training pairs per second (Sec. 3.4: parent crop, Eq. 8 noise once on it, two overlapping crops,
float CHW) from ``../shared/data/train/CBSD432`` (fallback: the photographs bundled with scikit-image,
written as PNGs), at 64x64 and 128x128 crops, batch 32, on the same cores for all:

* ``dali_roi``: ``rcl_dist.data.dali.DALILoader`` on the CPU decoding only each sample's parent crop
  (``keep_decoded=False``), ``num_threads`` in {1, 2, 4};
* ``dali_memory``: the same loader with the images decoded once and kept in memory (``keep_decoded=True``,
  what the loader does by itself for a data set this small);
* ``torch``: ``rcl_dist.data.reference.make_loader`` with ``num_workers`` in {0, 1, 2, 3} (each sample's
  image decoded from its file, as the DALI loaders without a copy in memory);
* ``torch_memory``: ``rcl_dist.data.sampler.PairSampler``, the same pairs from images held in memory as
  float tensors, in the calling process with 1 or 2 torch threads (the fair match of ``dali_memory``);
* the input stage's own limits, per parent crop: ``roi_decode_only`` (reader + ROI decode of the parent
  window, nothing else), ``memory_crop_only`` (reader of the decoded pixels + the parent slice),
  ``decode_only`` (the whole image decoded, the old figure) and ``noise_only`` (torch's N(0, 1) fill of a
  batch of parent crops, one thread: the draw Eq. 8 needs).

The best setting of each is reported, with every setting in ``details``. The input-wait fraction of a
training step at each setting comes from ``benchmarks/results/step_profile_cpu.json`` (label
``--step-profile-label``) when it is there. Results are stored under ``--label`` (default ``after``); the
figures of the earlier pipeline stay under ``before``. ``--modes`` limits what is measured (the earlier
tree, run with ``PYTHONPATH``, has no ``keep_decoded``: ``--modes dali torch decode_only``, where ``dali``
is its one DALI pipeline). With ``--gpu`` (a GPU present) the DALI pipeline is also measured with
``device_id=0``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _provenance import commit, load_average  # benchmarks/_provenance.py (this script's folder)

from rcl_dist.data.images import shared_data_dir
from rcl_dist.data.spec import PairSpec, crop_geometry

BATCH = 32
CROPS = (64, 128)
MODES = ("dali_roi", "dali_memory", "torch", "torch_memory", "roi_decode_only", "memory_crop_only", "decode_only", "noise_only")


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


def _pipe_rate(define, threads: int, seconds: float) -> float:
    """Samples per second of a bare DALI pipeline whose graph ``define()`` builds."""
    from nvidia.dali import pipeline_def

    p = pipeline_def(define, batch_size=BATCH, num_threads=threads, device_id=None, prefetch_queue_depth=2, seed=1)()
    p.build()
    for _ in range(2):
        p.run()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        p.run()
        n += BATCH
    return n / (time.perf_counter() - t0)


def _window_anchor(hw, side: int):
    """int32 [y, x], uniform over the windows of side ``side`` (the loader's own rule)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    n = hw - float(side) + 1.0
    u = fn.random.uniform(range=[0.0, 1.0], shape=[2])
    return fn.cast(dmath.min(dmath.floor(u * n), n - 1.0), dtype=types.INT32)


def _stage_limits(files: list[str], side: int, threads: int, seconds: float, decoded) -> dict[str, float]:
    """Per parent side: ROI decode only, and (``decoded``: an in-memory copy) raw read + parent slice only."""
    from nvidia.dali import fn, types

    def roi():
        enc, _ = fn.readers.file(files=files, random_shuffle=True, seed=0, name="Reader")
        at = _window_anchor(fn.peek_image_shape(enc, dtype=types.FLOAT)[0:2], side)
        return fn.decoders.image_slice(enc, start=at, shape=[side, side], axes=[0, 1], device="cpu", output_type=types.RGB)

    out = {"roi_decode_only": _pipe_rate(roi, threads, seconds)}
    if decoded is not None:
        from rcl_dist.data.dali import _lookup

        def memory():
            raw, label = fn.readers.file(files=decoded.files, labels=list(range(len(decoded.files))), random_shuffle=True,
                                         seed=0, name="Reader")  # fmt: skip
            label = fn.squeeze(label, axes=[0])
            h, w = _lookup(fn, types, label, decoded.heights), _lookup(fn, types, label, decoded.widths)
            img = fn.reshape(raw, shape=fn.cast(fn.stack(h, w, h * 0.0 + 3.0), dtype=types.INT32), layout="HWC")
            return fn.slice(img, start=_window_anchor(fn.stack(h, w), side), shape=[side, side], axes=[0, 1])

        out["memory_crop_only"] = _pipe_rate(memory, threads, seconds)
    return out


def _decode_only(files: list[str], threads: int, seconds: float) -> float:
    from nvidia.dali import fn, types

    def whole():
        enc, _ = fn.readers.file(files=files, random_shuffle=True, seed=0, name="Reader")
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

    return _pipe_rate(whole, threads, seconds)


def _noise_only(side: int, seconds: float) -> float:
    """Parent crops per second of torch's in-place N(0, 1) fill, one thread (the draw of Eq. 8)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        buf, gen = torch.empty(BATCH, side, side, 3), torch.Generator().manual_seed(0)
        buf.normal_(generator=gen)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            buf.normal_(generator=gen)
            n += BATCH
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def _sampler_rate(images: list, crop: int, threads: int, seconds: float) -> float:
    """Pairs per second of PairSampler.sample (images in memory, torch in this process)."""
    from rcl_dist.data.sampler import PairSampler

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sampler = PairSampler(images, crop=crop, generator=torch.Generator().manual_seed(0))
        sampler.sample(BATCH)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            sampler.sample(BATCH)
            n += BATCH
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def measure(manifest: Path, files: list[str], modes: list[str], seconds: float, gpu: bool) -> dict:
    from rcl_dist.data.dali import DALILoader
    from rcl_dist.data.reference import make_loader

    details: dict = {m: {} for m in modes}
    details["gpu"] = {}
    decoded, images = None, None
    if "memory_crop_only" in modes:
        from rcl_dist.data.decoded import decode_into_memory

        decoded = decode_into_memory(files, gray=False)
    try:
        for crop in CROPS:
            spec = PairSpec(task="pretrain", crop=crop, batch_size=BATCH)
            side = crop_geometry(crop, spec.overlap)[1]
            for threads in (1, 2, 4):
                for mode, kw in (("dali", {}), ("dali_roi", {"keep_decoded": False}), ("dali_memory", {"keep_decoded": True})):
                    if mode in modes:
                        r = _rate(DALILoader(manifest, spec, num_threads=threads, **kw), seconds)
                        details[mode][f"{crop}/threads={threads}"] = r
                        print(f"{mode:12s} crop {crop} threads {threads}: {r:.1f} pairs/s", flush=True)
                if "roi_decode_only" in modes:
                    for key, r in _stage_limits(files, side, threads, seconds, decoded).items():
                        details[key][f"{crop}/threads={threads}"] = r
                        print(f"{key:12s} parent {side} threads {threads}: {r:.1f} crops/s", flush=True)
            if "torch" in modes:
                for workers in (0, 1, 2, 3):
                    r = _rate(make_loader(manifest, spec, num_workers=workers), seconds)
                    details["torch"][f"{crop}/workers={workers}"] = r
                    print(f"torch        crop {crop} workers {workers}: {r:.1f} pairs/s", flush=True)
            if "torch_memory" in modes:
                if images is None:
                    from rcl_dist.data.images import load_image

                    images = [load_image(p) for p in files]
                for threads in (1, 2):
                    details["torch_memory"][f"{crop}/threads={threads}"] = r = _sampler_rate(images, crop, threads, seconds)
                    print(f"torch_memory crop {crop} threads {threads}: {r:.1f} pairs/s", flush=True)
            if "noise_only" in modes:
                details["noise_only"][f"{crop}/threads=1"] = r = _noise_only(side, seconds)
                print(f"noise_only   parent {side}: {r:.1f} parent crops/s", flush=True)
            if gpu:
                details["gpu"][f"{crop}/threads=4"] = _rate(DALILoader(manifest, spec, device_id=0, num_threads=4), seconds)
        if "decode_only" in modes:
            for threads in (1, 2, 4):
                details["decode_only"][f"threads={threads}"] = r = _decode_only(files, threads, seconds)
                print(f"decode-only  threads {threads}: {r:.1f} images/s", flush=True)
    finally:
        if decoded is not None:
            decoded.remove()
    return details


def _best(details: dict, kind: str, crop: int | None = None) -> float | None:
    vals = [v for k, v in details.get(kind, {}).items() if crop is None or k.startswith(f"{crop}/")]
    return max(vals) if vals else None


def _step_waits(path: Path, label: str) -> dict[str, dict]:
    """{"<workers>w/<crop>": {data_wait_fraction, input_cost_fraction}} from the step profile, if any."""
    if not path.exists():
        return {}
    run = json.loads(path.read_text()).get(label)
    if not run:
        return {}
    return {f"{s['workers']}w/{s['crop']}": {"data_wait_fraction": s["data_wait_fraction"],
                                              "input_cost_fraction": s["input_cost_fraction"],
                                              "samples_per_s": s["samples_per_s"]}
            for s in run["settings_results"]}  # fmt: skip


def summarise(details: dict) -> dict:
    """Best settings per crop: pairs/s of each pipeline, the stage limits, and the ratios the issue asks for."""
    out: dict = {}
    for crop in CROPS:
        d = {k: _best(details, k, crop) for k in ("dali", "dali_roi", "dali_memory", "torch", "torch_memory",
                                                   "roi_decode_only", "memory_crop_only", "noise_only", "gpu")}  # fmt: skip
        d["decode_only"] = _best(details, "decode_only")
        dali = d["dali_memory"] or d["dali_roi"] or d["dali"]
        if dali and d["torch"]:
            d["dali_over_torch"] = dali / d["torch"]
        if d["dali_roi"] and d["torch"]:
            d["dali_roi_over_torch"] = d["dali_roi"] / d["torch"]
        if d["dali_memory"] and d["torch_memory"]:
            d["dali_memory_over_torch_memory"] = d["dali_memory"] / d["torch_memory"]
        if d["dali_roi"] and d["roi_decode_only"]:
            d["dali_roi_over_roi_decode_only"] = d["dali_roi"] / d["roi_decode_only"]
        if d["dali_memory"] and d["memory_crop_only"]:
            d["dali_memory_over_memory_crop_only"] = d["dali_memory"] / d["memory_crop_only"]
        out[str(crop)] = d
    return out


def _f(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def write_markdown(path: Path, results: dict) -> None:
    lines = ["# Input pipeline throughput (pre-training pairs, CPU)", ""]
    for label, run in results.items():
        lines += [f"## {label}", ""]
        if "summary" not in run:  # the figures committed before this file had labels
            d = run["details"]
            lines += [f"Command: `{run.get('command', '?')}`  ", f"Commit: {run.get('commit', '?')}  ",
                      f"Machine: {run.get('machine', '?')}  ", f"Data: {run.get('source', '?')}; batch {run.get('batch', BATCH)}", "",
                      "| pipeline | 64x64 pairs/s | 128x128 pairs/s |", "|---|---|---|",
                      f"| DALI (CPU, whole image decoded) | {_f(_best(d, 'dali', 64), '{:.1f}')} | {_f(_best(d, 'dali', 128), '{:.1f}')} |",
                      f"| PyTorch DataLoader | {_f(_best(d, 'torch', 64), '{:.1f}')} | {_f(_best(d, 'torch', 128), '{:.1f}')} |",
                      f"| decode-only (whole images/s) | {_f(_best(d, 'decode_only'), '{:.1f}')} | {_f(_best(d, 'decode_only'), '{:.1f}')} |",
                      "", f"All settings: `{json.dumps(d)}`", ""]  # fmt: skip
            continue
        s = run["summary"]
        lines += [f"Command: `{run['command']}`  ", f"Commit: {run['commit']}  ", f"Machine: {run['machine']}  ",
                  f"Load average (1 min) before / after: {run['load_before']:.2f} / {run['load_after']:.2f}  ",
                  f"Data: {run['source']}; batch {run['batch']}; best setting of each; rcl_dist from {run['rcl_dist']}", "",
                  "| pipeline (pairs/s; limits: samples/s) | 64x64 (parent 96) | 128x128 (parent 192) |", "|---|---|---|"]  # fmt: skip
        rows = [("DALI, earlier pipeline (whole image decoded)", "dali"),
                ("DALI, ROI: only the parent crop decoded", "dali_roi"),
                ("DALI, images decoded once, kept in memory (the default here)", "dali_memory"),
                ("PyTorch DataLoader (same work, same cores)", "torch"),
                ("PyTorch, images in memory (PairSampler, 1-2 threads)", "torch_memory"),
                ("limit: reader + ROI decode of the parent crop only", "roi_decode_only"),
                ("limit: reader of decoded pixels + parent slice only", "memory_crop_only"),
                ("limit: N(0, 1) draw for the parent crop only (1 thread)", "noise_only"),
                ("decode-only, whole images", "decode_only"),
                ("DALI on the GPU (device_id=0)", "gpu")]  # fmt: skip
        for name, key in rows:
            if s["64"].get(key) is not None or s["128"].get(key) is not None:
                lines.append(f"| {name} | {_f(s['64'].get(key))} | {_f(s['128'].get(key))} |")
        lines.append("")
        for key, name in (("dali_over_torch", "DALI (default) / DataLoader"), ("dali_roi_over_torch", "DALI ROI / DataLoader"),
                          ("dali_memory_over_torch_memory", "DALI in memory / PyTorch in memory"),
                          ("dali_roi_over_roi_decode_only", "DALI ROI / its decode limit"),
                          ("dali_memory_over_memory_crop_only", "DALI in memory / its read limit")):  # fmt: skip
            if key in s["64"] or key in s["128"]:
                lines.append(f"- {name}: {_f(s['64'].get(key), '{:.2f}')}x at 64, {_f(s['128'].get(key), '{:.2f}')}x at 128")
        waits = run.get("step_input_wait", {})
        if waits:
            lines += ["", f"Input wait of a training step (benchmarks/results/step_profile_cpu.json, "
                      f"label {run['step_profile_label']!r}: DALI input, the trainer's step, product defaults):", "",
                      "| setting | samples/s | data wait / step | input cost (1 - cached-batch / DALI step time) |", "|---|---|---|---|"]  # fmt: skip
            for k, v in waits.items():
                lines.append(f"| {k.replace('/', ' ')}² | {v['samples_per_s']:.1f} | {100 * v['data_wait_fraction']:.1f} % | "
                             f"{100 * v['input_cost_fraction']:.1f} % |")  # fmt: skip
        lines += ["", "All settings:", "", "```", json.dumps(run["details"], indent=1), "```", ""]
        if run.get("note"):
            lines += [run["note"], ""]
    path.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/data_throughput.json"))
    ap.add_argument("--label", default="after", help="key of this run in the results file")
    ap.add_argument("--seconds", type=float, default=8.0, help="measuring time per setting")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=[*MODES, "dali"])
    ap.add_argument("--gpu", action="store_true", help="also measure the GPU pipeline (device_id=0)")
    ap.add_argument("--step-profile", type=Path, default=Path("benchmarks/results/step_profile_cpu.json"))
    ap.add_argument("--step-profile-label", default="after")
    ap.add_argument("--note", default="", help="a paragraph for the results file")
    args = ap.parse_args()

    import rcl_dist
    from rcl_dist.data.index import index_images

    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder, source = _source_folder(tmp)
        manifest = tmp / "manifest.parquet"
        index_images([f"{folder}:train"], manifest, log=lambda *_: None)
        import pyarrow.parquet as pq

        files = pq.read_table(manifest).column("path").to_pylist()
        details = measure(manifest, files, args.modes, args.seconds, args.gpu)
    run = {
        "command": (f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else "")
                   + "python benchmarks/data_throughput.py " + " ".join(sys.argv[1:]),
        "commit": commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}",
        "load_before": load_before,
        "load_after": load_average(),
        "rcl_dist": str(Path(rcl_dist.__file__).parent),
        "batch": BATCH,
        "source": source,
        "summary": summarise(details),
        "step_profile_label": args.step_profile_label,
        "step_input_wait": _step_waits(args.step_profile, args.step_profile_label),
        "note": args.note,
        "details": details,
    }
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "details" in results:  # the single run committed before labels: it is the "before"
        results = {"before": results}
    results[args.label] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(args.out.with_suffix(".md"), results)
    print(json.dumps(run["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
