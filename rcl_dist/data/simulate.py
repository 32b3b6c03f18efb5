"""Each indexed image's fixed noisy realisation on disk (``rcl-dist data simulate``, ``realisation="fixed"``).

For every manifest row, ``spec.fixed_noisy_image(clean, shot, read, noise_seed)`` (Eq. 8 noise, in
the RAW domain for a Bayer mosaic) is saved as float32 ``.npy``, so a pipeline can read the same
noisy image every epoch and on every machine. Idempotent and atomic; files that are gone or changed
since indexing are skipped with a warning.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rcl_dist.data.files import ordered_map, save_npy_atomic
from rcl_dist.data.images import _to_chw_float, load_image
from rcl_dist.data.manifest import read_manifest
from rcl_dist.data.spec import fixed_noisy_image, simulated_path

__all__ = ["simulate"]

# Modes that imageio (hence load_image) returns unconverted: decoded through Pillow's RGB conversion.
_CONVERT_MODES = ("CMYK", "YCbCr", "LAB", "HSV")


def _load_clean(path: str, mode: str, gray: bool | None) -> np.ndarray:
    """The clean image as [C, H, W] float32 in [0, 1], as the reference loader reads it.

    ``load_image`` (imageio) returns CMYK / YCbCr / LAB samples unconverted; those go through
    Pillow's RGB conversion instead, as their ``channels`` = 3 in the manifest promises.
    """
    if mode in _CONVERT_MODES:
        from PIL import Image

        with Image.open(path) as im:
            return _to_chw_float(np.asarray(im.convert("RGB")), gray)
    return load_image(path, gray)


def _npy_ok(path: Path, shape: tuple[int, ...]) -> bool:
    """An existing realisation of the expected shape and dtype (a torn or stale file is rewritten)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return arr.shape == shape and arr.dtype == np.float32


def _realise(row: dict[str, Any], out_dir: Path, indices: tuple[int, ...], raw: bool, gray: bool | None,
             force: bool) -> tuple[dict[str, int], str | None]:
    """One row's realisations written where missing or stale: (counts to add, a warning to log or None)."""
    import torch

    from rcl_dist.noise import mosaic

    path, h, w = row["path"], row["height"], row["width"]
    if raw:
        shape: tuple[int, ...] = (h - h % 2, w - w % 2, 1)
    else:
        shape = (h, w, {None: row["channels"], False: 3, True: 1}[gray])
    targets = [(i, simulated_path(out_dir, row["image_id"], raw, i)) for i in indices]
    targets = [(i, p) for i, p in targets if force or not _npy_ok(p, shape)]
    if not targets:
        return {"present": len(indices)}, None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {"missing": 1}, f"warning: {path} (image {row['image_id']}) is gone; its realisation is skipped"
    if st.st_size != row["size_bytes"] or st.st_mtime_ns != row["mtime_ns"]:
        return {"changed": 1}, f"warning: {path} (image {row['image_id']}) changed since indexing; skipped (index again)"
    clean = _load_clean(path, row["mode"], False if raw else gray)
    if clean.shape[1:] != (h, w):
        return {"changed": 1}, f"warning: {path} decodes to {clean.shape[2]}x{clean.shape[1]}, the manifest says {w}x{h}; skipped"
    if raw:
        rgb = torch.from_numpy(clean[:, : shape[0], : shape[1]])[None]
        clean = mosaic(rgb)[0].numpy()  # [1, H, W]
    for i, target in targets:
        noisy = fixed_noisy_image(clean, row["shot"], row["read"], row["noise_seed"] + i)
        save_npy_atomic(target, np.ascontiguousarray(noisy.transpose(1, 2, 0), dtype=np.float32))
    return {"written": len(targets), "present": len(indices) - len(targets)}, None


def simulate(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    raw: bool = False,
    pairs: bool = False,
    split: str | None = None,
    gray: bool | None = None,
    force: bool = False,
    workers: int | None = None,
    log: Callable[[str], Any] = print,
) -> int:
    """Materialise each image's fixed noisy realisation (``realisation="fixed"``); returns files written.

    For every manifest row (of ``split``, if given): ``spec.fixed_noisy_image(clean, shot, read,
    noise_seed)`` saved as float32 .npy, HWC, at ``spec.simulated_path(out_dir, image_id, raw, 0)``;
    with ``pairs`` also realisation 1 (seed ``noise_seed + 1``, Noise2Noise's second image).

    ``gray``: as :func:`load_image`: None keeps each image's own channels (1 or 3), False makes grey
    images RGB before the noise (independent noise per channel, what an RGB pipeline needs), True
    makes RGB images grey. ``raw``: the clean RGB image is cropped to even height and width (the last
    row / column of an odd side is dropped, so the RGGB quads are whole), mosaicked RGGB, and noise is
    added in the RAW domain: [H, W, 1]; grey images are made RGB first.

    Idempotent: a realisation already on disk with the expected shape and dtype is kept (``force``
    rewrites all: needed after re-indexing with another seed, since file names hold only the image id).
    Files are written atomically. An image whose file is gone, or has changed since indexing (size or
    mtime differ), is skipped with a warning naming it, and counted in the last log line.
    """
    import rcl_dist.noise  # noqa: F401  (torch and the mosaic: imported here, not first in the worker threads)

    if raw and gray:
        raise ValueError("simulate: raw=True needs RGB images (a Bayer mosaic), not gray=True")
    table = read_manifest(manifest, split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = (0, 1) if pairs else (0,)
    workers = max(1, min(4, os.cpu_count() or 1) if workers is None else int(workers))
    lock = threading.Lock()
    counts: Counter[str] = Counter()

    def one(row: dict[str, Any]) -> None:
        add, warning = _realise(row, out_dir, indices, raw, gray, force)
        with lock:
            counts.update(add)
            if warning is not None:
                log(warning)

    rows = table.to_pylist()
    with contextlib.closing(ordered_map(one, rows, workers)) as it:
        for _ in it:
            pass
    log(
        f"simulate: {counts['written']} realisations written, {counts['present']} already present, "
        f"{counts['missing']} images gone, {counts['changed']} changed since indexing -> {out_dir}"
    )
    return counts["written"]
