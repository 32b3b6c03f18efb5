"""What a DALI pipeline decodes (rcl_dist.data.dali, rcl_dist.data.decoded): only a sample's window
(ROI decoding), or, for a small 8-bit pre-training set on a CPU, nothing after the first pass (the
pixels kept in memory). Either way the pairs must be those of the spec: crops cut exactly from the
decoded image, one shared Eq. 8 realisation per pair, variance linear in intensity."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")

from rcl_dist.data.dali import DALILoader  # noqa: E402
from rcl_dist.data.spec import MANIFEST_SCHEMA, PairSpec, crop_geometry  # noqa: E402


def _row(path: Path, image_id: str, shape: tuple[int, int], shot: float, read: float, channels: int = 3, bit_depth: int = 8) -> dict:
    h, w = shape
    return dict(path=str(path), image_id=image_id, width=w, height=h, channels=channels, bit_depth=bit_depth,
                mode="RGB" if channels == 3 else "L", split="train", shot=float(shot), read=float(read),
                noise_seed=0, sha256=image_id, size_bytes=0, mtime_ns=0)  # fmt: skip


def _images8(tmp_path: Path, n: int, shape=(40, 44), shot=0.0, read=0.0, suffix=".png", seed=0):
    """n random 8-bit RGB images: (manifest table, clean [C, H, W] float32 list as the decoder gives them)."""
    rng = np.random.default_rng(seed)
    rows, clean = [], []
    for i in range(n):
        a = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        p = tmp_path / f"im{i}{suffix}"
        Image.fromarray(a).save(p, quality=95) if suffix == ".jpg" else Image.fromarray(a).save(p)
        rows.append(_row(p, f"im{i:04d}", shape, shot, read))
        clean.append((a.astype(np.float32) / 255.0).transpose(2, 0, 1))
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), clean


def _samples(loader: DALILoader, epochs: int) -> list[dict[str, np.ndarray]]:
    out = []
    for _ in range(epochs):
        for b in loader:
            n = b["q"].shape[0]
            out += [{k: v[i].numpy() for k, v in b.items()} for i in range(n)]
    return out


def _locate(ref: np.ndarray, crop: np.ndarray) -> tuple[int, int, float]:
    c = crop.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(ref, (c, c), axis=(1, 2))
    ssd = ((win - crop[:, None, None]) ** 2).sum(axis=(0, 3, 4))
    y, x = np.unravel_index(np.argmin(ssd), ssd.shape)
    return int(y), int(x), float(ssd[y, x] / crop.size)


@pytest.mark.parametrize("keep", [True, False])
def test_pretrain_pairs_are_exact_windows_from_memory_and_from_roi_decoding(tmp_path, keep):
    c, overlap = 16, 0.5
    s, _ = crop_geometry(c, overlap)
    table, clean = _images8(tmp_path, 6)
    loader = DALILoader(table, PairSpec(task="pretrain", crop=c, batch_size=3, seed=5), return_index=True, keep_decoded=keep)
    assert loader.keeps_decoded is keep
    shifts = []
    for smp in _samples(loader, 12):
        i = int(smp["index"])
        (yq, xq, eq), (yk, xk, ek) = _locate(clean[i], smp["q"]), _locate(clean[i], smp["k"])
        assert max(eq, ek) < 1e-12  # the decoded pixels themselves (k / 255 up to float rounding)
        assert abs(yq - yk) <= s and abs(xq - xk) <= s
        shifts.append(max(abs(yq - yk), abs(xq - xk)))
    assert max(shifts) > 0


def test_roi_decoded_jpeg_windows_are_those_of_the_whole_decoded_image(tmp_path):
    """JPEG: decoding only the window gives the very pixels of decoding everything (the memory copy)."""
    table, _ = _images8(tmp_path, 4, shape=(48, 56), suffix=".jpg")
    spec = PairSpec(task="pretrain", crop=16, batch_size=4, seed=2)
    from_memory = DALILoader(table, spec, return_index=True, keep_decoded=True)
    from rcl_dist.data.decoded import decode_into_memory

    whole = decode_into_memory(list(table["path"].to_pylist()), gray=False)
    images = [np.fromfile(f, dtype=np.uint8).reshape(h, w, 3).transpose(2, 0, 1).astype(np.float32) / 255.0
              for f, h, w in zip(whole.files, whole.heights, whole.widths)]  # fmt: skip
    whole.remove()
    roi = DALILoader(table, spec, return_index=True, keep_decoded=False)
    for loader in (from_memory, roi):
        for smp in _samples(loader, 3):
            assert _locate(images[int(smp["index"])], smp["q"])[2] < 1e-12


@pytest.mark.parametrize("keep", [True, False])
def test_pretrain_noise_variance_is_linear_in_intensity(tmp_path, keep):
    """Eq. 8 on the parent crop, from memory or decoded: var(q - x) = shot * x + read over flat images."""
    shot, read = 0.02, 0.001
    levels = np.round(np.linspace(0.0, 1.0, 6) * 255) / 255
    rows = []
    for i, v in enumerate(levels):
        p = tmp_path / f"flat{i}.png"
        Image.fromarray(np.full((48, 48, 3), int(round(v * 255)), dtype=np.uint8)).save(p)
        rows.append(_row(p, f"flat{i}", (48, 48), shot, read))
    loader = DALILoader(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA),
                        PairSpec(task="pretrain", crop=32, batch_size=6, seed=1), return_index=True, keep_decoded=keep)  # fmt: skip
    res: dict[int, list[np.ndarray]] = {i: [] for i in range(len(levels))}
    for smp in _samples(loader, 6):
        i = int(smp["index"])
        res[i].append((smp["q"] - levels[i]).ravel())
    var = np.array([np.concatenate(res[i]).var() for i in range(len(levels))])
    slope, intercept = np.polyfit(levels, var, 1, w=1.0 / var)
    assert slope == pytest.approx(shot, rel=0.08)
    assert intercept == pytest.approx(read, rel=0.08)


def test_decoded_copy_is_kept_only_where_it_applies_and_removed_with_the_loader(tmp_path):
    table, _ = _images8(tmp_path, 4)
    loader = DALILoader(table, PairSpec(task="pretrain", crop=16, batch_size=2))  # 8-bit, CPU, small: kept
    assert loader.keeps_decoded
    folder = loader._plan.decoded.folder
    assert folder.is_dir() and len(list(folder.iterdir())) == 4
    next(iter(loader))
    del loader
    gc.collect()
    assert not folder.exists()
    assert not DALILoader(table, PairSpec(task="denoise", crop=16, batch_size=2)).keeps_decoded  # windows only
    assert not DALILoader(table, PairSpec(task="pretrain", crop=16, batch_size=2), keep_decoded=False).keeps_decoded
    sixteen = table.set_column(table.schema.get_field_index("bit_depth"), "bit_depth",
                               pa.array([16] * 4, type=pa.int8()))  # fmt: skip
    assert not DALILoader(sixteen, PairSpec(task="pretrain", crop=16, batch_size=2)).keeps_decoded


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("files", ["grey", "rgb"])
def test_grey_pairs_from_grey_files_and_from_rgb_files(tmp_path, keep, files):
    """spec.gray: 1-channel files decode to GRAY; RGB files become rgb2gray's luma, in memory or not."""
    rng = np.random.default_rng(3)
    rows, clean = [], []
    for i in range(4):
        a = rng.integers(0, 256, (36, 40) if files == "grey" else (36, 40, 3), dtype=np.uint8)
        p = tmp_path / f"g{i}.png"
        Image.fromarray(a).save(p)
        rows.append(_row(p, f"g{i:04d}", (36, 40), 0.0, 0.0, channels=1 if files == "grey" else 3))
        x = a.astype(np.float32) / 255.0
        clean.append(x[None] if files == "grey" else (x @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32))[None])
    spec = PairSpec(task="pretrain", crop=16, batch_size=2, gray=True, seed=4)
    loader = DALILoader(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), spec, return_index=True, keep_decoded=keep)
    assert loader.keeps_decoded is keep
    for smp in _samples(loader, 4):
        assert smp["q"].shape == (1, 16, 16)
        assert _locate(clean[int(smp["index"])], smp["q"])[2] < 1e-10


@pytest.mark.parametrize("raw", [None, "packed"])
def test_gpu_graph_of_the_decoded_copy_puts_the_work_on_the_gpu(tmp_path, raw):
    """With device_id set the in-memory parent crop moves to the GPU before the cast, mosaic and noise
    (graph defined and serialised here; a GPU pipeline cannot be built without one)."""
    from dali_graphs import check_graph_devices

    from rcl_dist.data import dali as D
    from rcl_dist.data.decoded import decode_into_memory

    table, _ = _images8(tmp_path, 2)
    spec = PairSpec(task="pretrain", crop=16, batch_size=2, raw=raw)
    plan = D._plan(table, spec, None)
    plan.decoded = decode_into_memory(plan.images, gray=False)
    try:
        check_graph_devices(plan, spec)
    finally:
        plan.decoded.remove()


def test_a_killed_process_s_decoded_copy_is_removed_by_the_next_one(tmp_path):
    import subprocess
    import sys

    from rcl_dist.data.decoded import decode_into_memory, memory_folder, remove_orphans

    table, _ = _images8(tmp_path, 2)
    code = ("import os, signal, sys; from rcl_dist.data.decoded import decode_into_memory; "
            "d = decode_into_memory(sys.argv[1:], gray=False); print(d.folder, flush=True); os.kill(os.getpid(), signal.SIGKILL)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, *table["path"].to_pylist()], capture_output=True, text=True)
    left = Path(out.stdout.strip())
    assert left.parent == memory_folder() and left.is_dir()  # SIGKILL: no finalizer, no atexit
    mine = decode_into_memory(table["path"].to_pylist(), gray=False)  # the next decoding cleans up
    assert not left.exists() and mine.folder.is_dir()
    assert remove_orphans() == []  # a live process's copy stays
    mine.remove()
