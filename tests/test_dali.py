"""DALI pipelines (rcl_dist.data.dali) against the contract of rcl_dist.data.spec, on real DALI pipelines.

Every test builds a tiny manifest of images written into tmp_path, runs CPU pipelines
(``device_id=None``), and, where DALI sees a GPU, the same checks with ``device_id=0``.
Crops are located in the known source images by exhaustive window matching, so positions, overlaps
and alignment are checked exactly, not only shapes.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from rcl_dist.data import dali as D  # noqa: E402
from rcl_dist.data.dali import DALILoader, build_pipeline  # noqa: E402
from rcl_dist.data.spec import real_partner  # noqa: E402
from rcl_dist.data.spec import MANIFEST_SCHEMA, PairSpec, crop_geometry, fixed_noisy_image, simulated_path  # noqa: E402
from rcl_dist.noise import mosaic, pack_bayer, unpack_bayer  # noqa: E402


def _dali_gpus() -> int:
    try:
        from nvidia.dali.backend import GetCUDADeviceCount

        return int(GetCUDADeviceCount())
    except Exception:  # no driver: DALI raises or reports 0
        return 0


DEVICE_IDS = [None] + ([0] if _dali_gpus() else [])


# ---------------------------------------------------------------- helpers: files and manifests


def _png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG (grey HxW or RGB HxWx3) written by hand: PIL cannot write 16-bit RGB."""
    h, w = arr.shape[:2]
    colour_type = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\x00" + np.ascontiguousarray(arr[y]).astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _row(path: Path, image_id: str, shape: tuple[int, int], shot: float, read: float, **kw) -> dict:
    h, w = shape
    row = dict(
        path=str(path), image_id=image_id, width=w, height=h, channels=3, bit_depth=8, mode="RGB", split="train",
        shot=float(shot), read=float(read), noise_seed=int(kw.pop("noise_seed", 0)), sha256=image_id,
        size_bytes=0, mtime_ns=0,
    )
    row.update(kw)
    return row


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _random_images(tmp_path: Path, n: int, shape=(40, 40), seed=0, shot=0.0, read=0.0, prefix="im", suffix=""):
    """n random 16-bit RGB images (practically unique pixel values): (rows, clean [C, H, W] float32 list)."""
    rng = np.random.default_rng(seed)
    rows, clean = [], []
    for i in range(n):
        a = rng.integers(0, 65536, (*shape, 3), dtype=np.uint16)
        p = tmp_path / f"{prefix}{i}{suffix}.png"
        _png16(p, a)
        s = shot[i] if isinstance(shot, (list, tuple)) else shot
        r = read[i] if isinstance(read, (list, tuple)) else read
        rows.append(_row(p, f"{prefix}{i:04d}", shape, s, r, bit_depth=16, noise_seed=100 + i))
        clean.append((a.astype(np.float32) / 65535.0).transpose(2, 0, 1))
    return rows, clean


def _flat_images(tmp_path: Path, levels, shape=(32, 32), shot=0.0, read=0.0, prefix="flat"):
    rows, values = [], []
    for i, v in enumerate(levels):
        q = int(round(v * 65535))
        p = tmp_path / f"{prefix}{i}.png"
        _png16(p, np.full((*shape, 3), q, dtype=np.uint16))
        s = shot[i] if isinstance(shot, (list, tuple)) else shot
        r = read[i] if isinstance(read, (list, tuple)) else read
        rows.append(_row(p, f"{prefix}{i:04d}", shape, s, r, bit_depth=16))
        values.append(q / 65535.0)
    return rows, values


def _epochs(loader: DALILoader, n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(n):
        batches = list(loader)
        assert len(batches) == len(loader)
        out += batches
    return out


def _samples(batches) -> list[dict[str, np.ndarray]]:
    """Batches -> one dict of numpy arrays per sample (tensors moved to the CPU)."""
    out = []
    for b in batches:
        n = next(iter(b.values())).shape[0]
        for i in range(n):
            out.append({k: v[i].cpu().numpy() for k, v in b.items()})
    return out


def _locate(ref: np.ndarray, crop: np.ndarray) -> tuple[int, int, float]:
    """(y, x, mean squared error) of the window of ref [C, H, W] closest to crop [C, c, c]."""
    c = crop.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(ref, (c, c), axis=(1, 2))  # [C, H-c+1, W-c+1, c, c]
    ssd = ((win - crop[:, None, None]) ** 2).sum(axis=(0, 3, 4))
    y, x = np.unravel_index(np.argmin(ssd), ssd.shape)
    return int(y), int(x), float(ssd[y, x] / crop.size)


def _mosaic_np(rgb: np.ndarray) -> np.ndarray:
    """[3, H, W] -> [1, H, W] RGGB of the whole image (even-sized images)."""
    return mosaic(torch.from_numpy(rgb)[None])[0].numpy()


# ---------------------------------------------------------------- Eq. 8 statistics


@pytest.mark.parametrize("device_id", DEVICE_IDS)
def test_noise_variance_is_linear_in_intensity(tmp_path, device_id):
    """Residual variance of denoise pairs over 11 flat images: slope = shot, intercept = read (within 5%)."""
    shot, read = 0.02, 0.001
    rows, levels = _flat_images(tmp_path, np.linspace(0.0, 1.0, 11), shape=(64, 64), shot=shot, read=read)
    spec = PairSpec(task="denoise", crop=64, batch_size=11, seed=3)
    loader = DALILoader(_table(rows), spec, device_id=device_id, return_index=True)
    res: dict[int, list[np.ndarray]] = {i: [] for i in range(11)}
    for s in _samples(_epochs(loader, 3)):
        clean = s["target"]
        assert np.allclose(clean, levels[s["index"]], atol=1e-6)  # 16-bit levels decoded exactly
        res[int(s["index"])].append((s["input"] - clean).ravel())
    x = np.array(levels)
    var = np.array([np.concatenate(res[i]).var() for i in range(11)])
    mean = np.array([np.concatenate(res[i]).mean() for i in range(11)])
    # weighted least squares: a variance estimate's standard error is proportional to the variance itself
    slope, intercept = np.polyfit(x, var, 1, w=1.0 / var)
    assert slope == pytest.approx(shot, rel=0.05)
    assert intercept == pytest.approx(read, rel=0.05)
    assert np.abs(mean).max() < 4 * np.sqrt(var.max() / (3 * 64 * 64 * 3))


def test_per_image_parameters_and_lookup_blocks(tmp_path, monkeypatch):
    """Each image gets its own (shot, read), also when the lookup is split into blocks; variance clamps at 0."""
    monkeypatch.setattr(D, "_LUT_BLOCK", 4)  # 10 rows -> 3 lookup tables
    reads = [1e-4 * 2.0**i for i in range(9)] + [-0.01]  # last: negative read at level 0 -> variance 0
    shots = [0.004] * 9 + [0.02]
    levels = [0.5] * 9 + [0.0]
    rows, lv = _flat_images(tmp_path, levels, shape=(32, 32), shot=shots, read=reads)
    loader = DALILoader(_table(rows), PairSpec(task="denoise", crop=32, batch_size=5), return_index=True)
    res: dict[int, list[np.ndarray]] = {i: [] for i in range(10)}
    for s in _samples(_epochs(loader, 2)):
        res[int(s["index"])].append((s["input"] - s["target"]).ravel())
    for i in range(9):
        expected = shots[i] * lv[i] + reads[i]
        assert np.concatenate(res[i]).var() == pytest.approx(expected, rel=0.1), i
    assert np.all(np.concatenate(res[9]) == 0.0)


# ---------------------------------------------------------------- pre-training pairs


@pytest.mark.parametrize("raw", [None, "mosaic", "packed"])
@pytest.mark.parametrize("device_id", DEVICE_IDS)
def test_pretrain_crops_overlap_and_share_one_realisation(tmp_path, raw, device_id):
    c, overlap = 16, 0.5
    s, parent = crop_geometry(c, overlap, even=raw is not None)
    # images 0-2 noise-free (exact layout checks), 3-5 noisy (shared-realisation checks)
    rows, clean = _random_images(tmp_path, 6, shape=(40, 40), shot=[0.0] * 3 + [1e-4] * 3, read=[0.0] * 3 + [1e-5] * 3)
    spec = PairSpec(task="pretrain", crop=c, overlap=overlap, raw=raw, batch_size=3, seed=7)
    loader = DALILoader(_table(rows), spec, device_id=device_id, return_index=True)
    shifts = []
    # 24 epochs x 6 images: enough draws that the extreme offset s (probability 2/(s+1)^2 per axis
    # and sample) is all but certain to appear
    for smp in _samples(_epochs(loader, 24)):
        i = int(smp["index"])
        q, k = smp["q"], smp["k"]
        if raw == "packed":
            assert q.shape == (4, c // 2, c // 2)
            q, k = (unpack_bayer(torch.from_numpy(t)[None])[0].numpy() for t in (q, k))
        ref = clean[i] if raw is None else _mosaic_np(clean[i])
        assert q.shape == k.shape == (ref.shape[0], c, c)
        (yq, xq, eq), (yk, xk, ek) = _locate(ref, q), _locate(ref, k)
        assert max(eq, ek) < (1e-12 if i < 3 else 1e-3)
        # both crops inside one parent of side c + s
        assert abs(yq - yk) <= s and abs(xq - xk) <= s
        shifts.append((abs(yq - yk), abs(xq - xk)))
        if raw is not None:
            assert yq % 2 == xq % 2 == yk % 2 == xk % 2 == 0
        if i < 3:  # noise-free: exactly the mosaic / packed layout of rcl_dist.noise of the clean crop
            want = clean[i][:, yq : yq + c, xq : xq + c]
            if raw is not None:
                want = mosaic(torch.from_numpy(np.ascontiguousarray(want))[None])
                if raw == "packed":
                    np.testing.assert_allclose(smp["q"], pack_bayer(want)[0].numpy(), atol=1e-6)
                want = want[0].numpy()
            np.testing.assert_allclose(q, want, atol=1e-6)
        else:  # one realisation: identical values where the crops overlap, and noise is present
            y0, y1 = max(yq, yk), min(yq, yk) + c
            x0, x1 = max(xq, xk), min(xq, xk) + c
            a = q[:, y0 - yq : y1 - yq, x0 - xq : x1 - xq]
            b = k[:, y0 - yk : y1 - yk, x0 - xk : x1 - xk]
            assert a.size and np.array_equal(a, b)
            assert np.abs(q - ref[:, yq : yq + c, xq : xq + c]).max() > 1e-3
    shifts = np.array(shifts)
    assert shifts.max() == s  # the full range of offsets is used ...
    assert (shifts == 0).any()


def test_pretrain_fixed_realisation_crops_come_from_the_stored_image(tmp_path):
    c, overlap = 16, 0.5
    s, _ = crop_geometry(c, overlap)
    rows, clean = _random_images(tmp_path, 4, shape=(40, 40), shot=1e-3, read=1e-4)
    sim = tmp_path / "sim"
    sim.mkdir()
    noisy = []
    for r, x in zip(rows, clean):
        n = fixed_noisy_image(x, r["shot"], r["read"], r["noise_seed"])
        np.save(simulated_path(sim, r["image_id"]), n.transpose(1, 2, 0))
        noisy.append(n)
    spec = PairSpec(task="pretrain", crop=c, overlap=overlap, realisation="fixed", batch_size=2)
    loader = DALILoader(_table(rows), spec, simulated_dir=sim, return_index=True)
    for smp in _samples(_epochs(loader, 3)):
        i = int(smp["index"])
        (yq, xq, eq), (yk, xk, ek) = _locate(noisy[i], smp["q"]), _locate(noisy[i], smp["k"])
        assert eq == ek == 0.0  # exactly the stored realisation, every epoch
        assert abs(yq - yk) <= s and abs(xq - xk) <= s


# ---------------------------------------------------------------- fixed vs fresh realisations


def test_fixed_realisation_is_identical_across_epochs_and_fresh_is_not(tmp_path):
    rows, clean = _random_images(tmp_path, 4, shape=(24, 24), shot=1e-3, read=1e-4)
    sim = tmp_path / "sim"
    sim.mkdir()
    stored = {}
    for r, x in zip(rows, clean):
        n = fixed_noisy_image(x, r["shot"], r["read"], r["noise_seed"])
        np.save(simulated_path(sim, r["image_id"]), n.transpose(1, 2, 0))
        stored[r["image_id"]] = n
    table = _table(rows)
    seen: dict[str, dict[int, list[np.ndarray]]] = {}
    for realisation in ("fixed", "fresh"):
        spec = PairSpec(task="denoise", crop=24, realisation=realisation, batch_size=2)  # crop = image: no position
        loader = DALILoader(table, spec, simulated_dir=sim, return_index=True)
        seen[realisation] = {}
        for epoch in range(3):
            for smp in _samples(list(loader)):
                i = int(smp["index"])
                np.testing.assert_allclose(smp["target"], clean[i], atol=1e-6)
                seen[realisation].setdefault(i, []).append(smp["input"])
                if realisation == "fixed":
                    assert np.array_equal(smp["input"], stored[loader.rows["image_id"][i].as_py()])
    for i, xs in seen["fixed"].items():
        assert all(np.array_equal(x, xs[0]) for x in xs)
    assert any(len(xs) > 1 for xs in seen["fresh"].values())
    for xs in seen["fresh"].values():
        for a in xs[1:]:
            assert not np.allclose(a, xs[0])


@pytest.mark.parametrize("task", ["denoise", "jdd", "n2n"])
def test_fixed_realisation_is_aligned_with_the_clean_crop(tmp_path, task):
    """Two readers (clean image, stored noisy array) stay in step and share the crop position."""
    c = 16
    raw = "mosaic" if task == "jdd" else None
    rows, clean = _random_images(tmp_path, 5, shape=(40, 44), shot=1e-3, read=1e-4)
    sim = tmp_path / "sim"
    sim.mkdir()
    stored = []
    for r, x in zip(rows, clean):
        base = _mosaic_np(x) if raw else x
        real = []
        for index in range(2 if task == "n2n" else 1):
            n = fixed_noisy_image(base, r["shot"], r["read"], r["noise_seed"] + index)
            np.save(simulated_path(sim, r["image_id"], raw=raw is not None, index=index), n.transpose(1, 2, 0))
            real.append(n)
        stored.append(real)
    spec = PairSpec(task=task, crop=c, raw=raw, realisation="fixed", batch_size=2, seed=11)
    loader = DALILoader(_table(rows), spec, simulated_dir=sim, return_index=True)
    for smp in _samples(_epochs(loader, 3)):
        i = int(smp["index"])
        if task == "n2n":
            y, x, e = _locate(stored[i][0], smp["noisy"])
            assert e == 0.0
            np.testing.assert_array_equal(smp["noisy2"], stored[i][1][:, y : y + c, x : x + c])
            continue
        y, x, e = _locate(clean[i], smp["target"])
        assert e < 1e-12
        if raw:
            assert y % 2 == x % 2 == 0
        np.testing.assert_array_equal(smp["input"], stored[i][0][:, y : y + c, x : x + c])


def test_missing_fixed_realisation_names_the_file_and_the_command(tmp_path):
    rows, _ = _random_images(tmp_path, 2, shape=(24, 24))
    (tmp_path / "sim").mkdir()
    with pytest.raises(FileNotFoundError, match=r"rcl-dist data simulate") as err:
        DALILoader(_table(rows), PairSpec(task="denoise", crop=16, realisation="fixed", batch_size=1),
                   simulated_dir=tmp_path / "sim")
    assert f"{rows[0]['image_id']}.npy" in str(err.value) or f"{rows[1]['image_id']}.npy" in str(err.value)
    with pytest.raises(ValueError, match="jdensr"):
        DALILoader(_table(rows), PairSpec(task="jdensr", crop=16, realisation="fixed", batch_size=1),
                   simulated_dir=tmp_path / "sim")


# ---------------------------------------------------------------- sharding


def _shard_indices(table, spec_kw, shard, epochs):
    spec = PairSpec(task="denoise", crop=8, shard_id=shard, num_shards=2, **spec_kw)
    loader = DALILoader(table, spec, return_index=True)
    ids = []
    for _ in range(epochs):
        batches = list(loader)
        assert len(batches) == len(loader)
        ids.append([[loader.rows["image_id"][int(i)].as_py() for i in b["index"]] for b in batches])
    return loader, ids


def test_two_shards_split_an_epoch_and_yield_equal_batch_counts(tmp_path):
    rows, _ = _random_images(tmp_path, 7, shape=(16, 16))
    table = _table(rows)
    all_ids = {r["image_id"] for r in rows}
    l0, e0 = _shard_indices(table, dict(batch_size=2, seed=5), 0, epochs=3)
    l1, e1 = _shard_indices(table, dict(batch_size=2, seed=5), 1, epochs=3)
    # 7 images -> padded to 8 (one repeat), 4 per shard, 2 full batches each
    assert len(l0) == len(l1) == 2 and l0.samples_per_shard == l1.samples_per_shard == 4
    for b0, b1 in zip(e0, e1):
        s0 = [i for b in b0 for i in b]
        s1 = [i for b in b1 for i in b]
        assert len(s0) == len(s1) == 4
        assert set(s0) | set(s1) == all_ids  # nothing dropped: 4 = 2 full batches
        assert len(s0) + len(s1) - len(set(s0 + s1)) == 1  # the single padding repeat
    # shards rotate between epochs: a rank does not see the same subset every epoch
    assert any(set(i for b in e0[0] for i in b) != set(i for b in ep for i in b) for ep in e0[1:])


def test_uneven_shards_never_emit_a_batch_of_padding(tmp_path):
    """7 images, 2 shards, batch 3: DALI alone emits a batch of one repeated sample; padding the list prevents it."""
    rows, _ = _random_images(tmp_path, 7, shape=(16, 16))
    table = _table(rows)
    for shard in (0, 1):
        loader, epochs = _shard_indices(table, dict(batch_size=3, seed=1), shard, epochs=4)
        assert len(loader) == 1
        for batches in epochs:
            assert len(batches) == 1 and len(set(batches[0])) == 3


# ---------------------------------------------------------------- fine-tuning tasks


@pytest.mark.parametrize("device_id", DEVICE_IDS)
def test_sr_input_is_a_bicubic_downscale_of_the_target(tmp_path, device_id):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(2)
    rows = []
    for i in range(3):
        a = np.stack([gaussian_filter(rng.random((48, 48)), 2.0) for _ in range(3)], -1)
        a = (a - a.min()) / (a.max() - a.min())
        p = tmp_path / f"s{i}.png"
        _png16(p, np.round(a * 65535).astype(np.uint16))
        rows.append(_row(p, f"s{i}", (48, 48), 0.01, 0.001))
    c = 32
    loader = DALILoader(_table(rows), PairSpec(task="sr", crop=c, batch_size=3), device_id=device_id)
    for smp in _samples(_epochs(loader, 2)):
        lr, hr = smp["input"], smp["target"]
        assert lr.shape == (3, c // 2, c // 2) and hr.shape == (3, c, c)
        pil = np.stack([np.asarray(Image.fromarray(ch, "F").resize((c // 2, c // 2), Image.BICUBIC)) for ch in hr])
        assert np.abs(lr - pil).mean() < 2e-3 and np.abs(lr - pil).max() < 2e-2


def test_jdensr_adds_noise_to_the_lr_image(tmp_path):
    shot, read = 0.01, 0.002
    rows, levels = _flat_images(tmp_path, [0.2, 0.8], shape=(32, 32), shot=shot, read=read)
    loader = DALILoader(_table(rows), PairSpec(task="jdensr", crop=32, batch_size=2), return_index=True)
    res = {0: [], 1: []}
    for smp in _samples(_epochs(loader, 4)):
        i = int(smp["index"])
        assert smp["input"].shape == (3, 16, 16) and smp["target"].shape == (3, 32, 32)
        np.testing.assert_allclose(smp["target"], levels[i], atol=1e-6)
        res[i].append((smp["input"] - levels[i]).ravel())  # bicubic of a flat image is flat
    for i in (0, 1):
        assert np.concatenate(res[i]).var() == pytest.approx(shot * levels[i] + read, rel=0.1)


@pytest.mark.parametrize("raw", ["mosaic", "packed"])
def test_jdd_input_is_the_noisy_mosaic_of_the_rgb_target(tmp_path, raw):
    c = 16
    rows, clean = _random_images(tmp_path, 4, shape=(36, 40), shot=[0.0, 0.0, 0.01, 0.01], read=[0.0, 0.0, 1e-3, 1e-3])
    loader = DALILoader(_table(rows), PairSpec(task="jdd", crop=c, raw=raw, batch_size=2), return_index=True)
    res = []
    for smp in _samples(_epochs(loader, 3)):
        i = int(smp["index"])
        rgb = smp["target"]
        assert rgb.shape == (3, c, c)
        y, x, e = _locate(clean[i], rgb)
        assert e < 1e-12 and y % 2 == x % 2 == 0  # RGGB phase of the image kept
        want = mosaic(torch.from_numpy(rgb)[None])
        if raw == "packed":
            want = pack_bayer(want)
        want = want[0].numpy()
        assert smp["input"].shape == ((1, c, c) if raw == "mosaic" else (4, c // 2, c // 2))
        if i < 2:
            np.testing.assert_allclose(smp["input"], want, atol=1e-6)
        else:
            res.append(((smp["input"] - want) ** 2).mean() / (0.01 * want.mean() + 1e-3))
    assert 0.8 < np.mean(res) < 1.2  # residual variance ~ shot * x + read


def test_real_pairs_share_the_crop_position(tmp_path):
    rng = np.random.default_rng(4)
    rows, means, reals = [], [], []
    for i in range(4):
        mean = rng.integers(20, 236, (30, 34, 3), dtype=np.uint8)
        real = np.clip(mean.astype(int) + rng.integers(-20, 21, mean.shape), 0, 255).astype(np.uint8)
        p = tmp_path / f"scene{i}_real.png"
        Image.fromarray(real).save(p)
        Image.fromarray(mean).save(real_partner(str(p)))
        rows.append(_row(p, f"scene{i}", (30, 34), 0.5, 0.5))  # parameters are ignored: no synthetic noise
        means.append(mean.transpose(2, 0, 1) / 255.0)
        reals.append(real.transpose(2, 0, 1) / 255.0)
    assert real_partner("/a/x_real.png") == "/a/x_mean.png"
    with pytest.raises(ValueError, match="_real"):
        real_partner("/a/x_real_1.png")
    # a manifest of the pair folder lists the *_mean files too: they are partners, not samples
    rows += [_row(Path(real_partner(r["path"])), f"mean{i}", (30, 34), 0.5, 0.5) for i, r in enumerate(rows)]
    c = 16
    loader = DALILoader(_table(rows), PairSpec(task="real", crop=c, batch_size=2), return_index=True)
    assert len(loader.rows) == 4
    for smp in _samples(_epochs(loader, 3)):
        i = int(smp["index"])
        y, x, e = _locate(means[i], smp["target"])
        assert e < 1e-12
        np.testing.assert_allclose(smp["input"], reals[i][:, y : y + c, x : x + c], atol=1e-6)


def test_n2n_gives_two_independent_realisations_of_one_crop(tmp_path):
    shot, read = 0.01, 0.001
    rows, levels = _flat_images(tmp_path, [0.3, 0.7], shape=(32, 32), shot=shot, read=read)
    loader = DALILoader(_table(rows), PairSpec(task="n2n", crop=32, batch_size=2), return_index=True)
    d = {0: [], 1: []}
    for smp in _samples(_epochs(loader, 3)):
        i = int(smp["index"])
        a, b = smp["noisy"], smp["noisy2"]
        assert a.shape == b.shape == (3, 32, 32) and not np.allclose(a, b)
        sd = np.sqrt(shot * levels[i] + read)
        assert abs(a.mean() - levels[i]) < 4 * sd / 55 and abs(b.mean() - levels[i]) < 4 * sd / 55
        d[i].append((a - b).ravel())
    for i in (0, 1):  # independent draws: var(a - b) = 2 var
        assert np.concatenate(d[i]).var() == pytest.approx(2 * (shot * levels[i] + read), rel=0.1)


# ---------------------------------------------------------------- decoding


def test_decoding_16bit_grey_rgba_palette(tmp_path):
    rng = np.random.default_rng(9)
    shape = (20, 24)
    rgb16 = rng.integers(0, 65536, (*shape, 3), dtype=np.uint16)
    grey16 = rng.integers(0, 65536, shape, dtype=np.uint16)
    rgba = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    grey8 = rng.integers(0, 256, shape, dtype=np.uint8)
    pal = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).convert("P")
    files = {
        "rgb16": (rgb16.astype(np.float64) / 65535, 3, 16),
        "grey16": (np.repeat(grey16[..., None].astype(np.float64) / 65535, 3, -1), 1, 16),
        "rgba": (rgba[..., :3] / 255.0, 3, 8),  # alpha dropped, not composited
        "grey8": (np.repeat(grey8[..., None] / 255.0, 3, -1), 1, 8),
        "pal": (np.asarray(pal.convert("RGB")) / 255.0, 3, 8),
    }
    _png16(tmp_path / "rgb16.png", rgb16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")  # PIL mode I;16
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey8).save(tmp_path / "grey8.png")
    pal.save(tmp_path / "pal.png")
    rows = [
        _row(tmp_path / f"{k}.png", k, shape, 0.0, 0.0, channels=ch, bit_depth=bd) for k, (_, ch, bd) in files.items()
    ]
    spec = PairSpec(task="denoise", crop=20, batch_size=5)
    loader = DALILoader(_table(rows), spec, return_index=True)
    for smp in _samples(list(loader)):
        name = loader.rows["image_id"][int(smp["index"])].as_py()
        want = files[name][0].transpose(2, 0, 1)
        y, x, _ = _locate(want.astype(np.float32), smp["target"])
        # 16-bit: every one of the 65536 levels kept (error far below 1/65535)
        np.testing.assert_allclose(smp["target"], want[:, y : y + 20, x : x + 20], atol=1e-6, err_msg=name)

    # grey runs: 1-channel files decode exactly; an RGB file uses the luminance weights of images.load_image
    grey_rows = [r for r in rows if r["channels"] == 1]
    grey_spec = PairSpec(task="denoise", crop=20, batch_size=2, gray=True)
    loader = DALILoader(_table(grey_rows), grey_spec, return_index=True)
    for smp in _samples(list(loader)):
        name = loader.rows["image_id"][int(smp["index"])].as_py()
        want = files[name][0][..., :1].transpose(2, 0, 1)
        y, x, _ = _locate(want.astype(np.float32), smp["target"])
        assert smp["target"].shape == (1, 20, 20)
        np.testing.assert_allclose(smp["target"], want[:, y : y + 20, x : x + 20], atol=1e-6, err_msg=name)
    # (compared with images._to_chw_float, the conversion of load_image, on the true pixel values:
    # load_image itself reads 16-bit RGB PNGs as 8-bit through imageio/PIL)
    from rcl_dist.data.images import _to_chw_float

    mixed = [r for r in rows if r["image_id"] in ("rgb16", "grey8")]
    source = {"rgb16": rgb16, "grey8": grey8}
    loader = DALILoader(_table(mixed), grey_spec, return_index=True)
    for smp in _samples(list(loader)):
        name = loader.rows["image_id"][int(smp["index"])].as_py()
        want = _to_chw_float(source[name], gray=True)
        assert smp["target"].shape == (1, 20, 20)
        y, x, _ = _locate(want, smp["target"])
        np.testing.assert_allclose(smp["target"], want[:, y : y + 20, x : x + 20], atol=1e-5, err_msg=name)


# ---------------------------------------------------------------- what is left out


def test_vanished_file_is_skipped_with_a_warning(tmp_path):
    rows, _ = _random_images(tmp_path, 5, shape=(16, 16))
    gone = Path(rows[2]["path"])
    gone.unlink()
    with pytest.warns(UserWarning, match=gone.name):
        loader = DALILoader(_table(rows), PairSpec(task="pretrain", crop=8, batch_size=2), return_index=True)
    assert loader.skipped == 1 and loader.skipped_paths == [str(gone)]
    assert gone.name not in " ".join(loader.rows["path"].to_pylist())
    batches = _epochs(loader, 2)
    assert len(batches) == 2 * len(loader) > 0


def test_file_vanishing_mid_epoch_raises_naming_it_and_keeps_raising(tmp_path):
    """Beyond the reader's shuffle buffer (1024 samples) files are opened as they come: a deleted one
    breaks the pipeline; the loader says which file and refuses later epochs instead of yielding none."""
    rows = []
    for i in range(1100):
        p = tmp_path / f"t{i}.png"
        Image.fromarray(np.full((8, 8), i % 256, dtype=np.uint8)).save(p)
        rows.append(_row(p, f"t{i:05d}", (8, 8), 0.0, 0.0, channels=1))
    loader = DALILoader(_table(rows), PairSpec(task="denoise", crop=8, batch_size=100), prefetch=1)
    for r in rows:
        Path(r["path"]).unlink()
    with pytest.raises(RuntimeError, match=r"mid-epoch: .*t\d+\.png.*build a new DALILoader"):
        for _ in loader:
            pass
    with pytest.raises(RuntimeError, match="failed earlier"):
        next(iter(loader))


def test_small_images_are_left_out_and_none_left_is_an_error(tmp_path):
    rows, _ = _random_images(tmp_path, 3, shape=(32, 32))
    small, _ = _random_images(tmp_path, 1, shape=(20, 30), prefix="small")
    spec = PairSpec(task="pretrain", crop=16, overlap=0.5, batch_size=2)  # parent 24
    with pytest.warns(UserWarning, match=r"1 of 4 images .* smaller than 24x24"):
        loader = DALILoader(_table(rows + small), spec)
    assert loader.rows.num_rows == 3
    with pytest.raises(ValueError, match=r"at least 24x24 \(task 'pretrain', crop 16, parent crop 24\); the largest is 30x20: "):
        build_pipeline(_table(small), spec)


def test_too_few_images_for_a_batch_is_an_error(tmp_path):
    rows, _ = _random_images(tmp_path, 3, shape=(16, 16))
    with pytest.raises(ValueError, match="batch size 4"):
        build_pipeline(_table(rows), PairSpec(task="denoise", crop=8, batch_size=4))


# ---------------------------------------------------------------- the GPU graph, defined on any machine


@pytest.mark.parametrize(
    "kw",
    [
        dict(task="pretrain"),
        dict(task="pretrain", raw="packed"),
        dict(task="pretrain", raw="mosaic", realisation="fixed"),
        dict(task="n2n", realisation="fixed"),
        dict(task="denoise", gray=True),
        dict(task="jdensr"),
        dict(task="jdd", raw="packed", realisation="fixed"),
        dict(task="real"),
    ],
)
def test_gpu_graph_places_the_work_on_the_gpu(tmp_path, kw):
    """device_id set -> mixed decoding and GPU outputs; device_id None -> CPU only (graph defined, not run)."""
    from dali_graphs import check_graph_devices

    raw = kw.get("raw") is not None
    rows, clean = _random_images(tmp_path, 2, shape=(40, 40), prefix="g", suffix="_real" if kw["task"] == "real" else "")
    sim = tmp_path / "sim"
    sim.mkdir()
    for r, x in zip(rows, clean):
        if kw["task"] == "real":
            Path(real_partner(r["path"])).write_bytes(Path(r["path"]).read_bytes())
        for index in (0, 1):
            a = _mosaic_np(x) if raw else x
            np.save(simulated_path(sim, r["image_id"], raw=raw, index=index), a.transpose(1, 2, 0))
    spec = PairSpec(crop=16, batch_size=2, **kw)
    check_graph_devices(D._plan(_table(rows), spec, sim), spec)
