"""The plain PyTorch pipelines over a manifest (rcl_dist.data.reference): the pairs of spec.py."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rcl_dist.data.images import load_image
from rcl_dist.data.reference import ManifestPairs, ShardSampler, make_loader
from rcl_dist.data.spec import real_partner
from rcl_dist.data.spec import MANIFEST_SCHEMA, PairSpec, crop_geometry, fixed_noisy_image, simulated_path
from rcl_dist.noise import mosaic, pack_bayer

TINY = 3e-4  # noise std that keeps round(255 * value) equal to the clean 8-bit code


# ----------------------------------------------------------------------------- helpers


def _write(path: Path, arr: np.ndarray) -> str:
    Image.fromarray(arr).save(path)
    return str(path)


def position_image(h: int, w: int, extra: int = 0) -> np.ndarray:
    """8-bit RGB whose pixel (y, x) is (x, y, (x + 2y + extra) % 256): every pixel locates itself."""
    y, x = np.mgrid[:h, :w]
    return np.stack([x, y, (x + 2 * y + extra) % 256], -1).astype(np.uint8)


def flat_image(h: int, w: int, code: int) -> np.ndarray:
    return np.full((h, w, 3), code, dtype=np.uint8)


def manifest(paths, shot=0.0, read=0.0, split="train", noise_seed=None) -> pa.Table:
    n = len(paths)
    per = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
    sizes = [Image.open(p).size for p in paths]
    cols = {
        "path": [str(p) for p in paths],
        "image_id": [f"{i:016x}" for i in range(n)],
        "width": [s[0] for s in sizes],
        "height": [s[1] for s in sizes],
        "channels": [3] * n,
        "bit_depth": [8] * n,
        "mode": ["RGB"] * n,
        "split": per(split),
        "shot": [float(v) for v in per(shot)],
        "read": [float(v) for v in per(read)],
        "noise_seed": per(noise_seed) if noise_seed is not None else [1000 + 7 * i for i in range(n)],
        "sha256": ["0" * 64] * n,
        "size_bytes": [os.path.getsize(p) for p in paths],
        "mtime_ns": [0] * n,
    }
    return pa.Table.from_pydict(cols, schema=MANIFEST_SCHEMA)


def locate(rgb_crop: torch.Tensor) -> tuple[int, int]:
    """(y, x) of an RGB crop of a position image from its top-left pixel."""
    return int(round(float(rgb_crop[1, 0, 0]) * 255)), int(round(float(rgb_crop[0, 0, 0]) * 255))


def locate_raw(raw: torch.Tensor, packed: bool) -> tuple[int, int]:
    """(y, x) of a RGGB crop (mosaic [1,c,c] or packed [4,c/2,c/2]) of a position image."""
    r, g = (raw[0, 0, 0], raw[1, 0, 0]) if packed else (raw[0, 0, 0], raw[0, 0, 1])  # R=x at (y,x), G=y at (y,x+1)
    return int(round(float(g) * 255)), int(round(float(r) * 255))


def crop(t, y, x, c):
    return t[..., y : y + c, x : x + c]


@pytest.fixture
def posdir(tmp_path):
    """Four position images of different sizes (all even sides)."""
    sizes = [(80, 80), (96, 72), (72, 100), (88, 88)]
    paths = [_write(tmp_path / f"p{i}.png", position_image(h, w, i)) for i, (h, w) in enumerate(sizes)]
    return tmp_path, paths


def quiet_dataset(*args, **kw) -> ManifestPairs:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fixtures are all valid: no warning expected
        return ManifestPairs(*args, **kw)


# ----------------------------------------------------------------------------- noise statistics


def test_denoise_noise_is_heteroscedastic_eq8(tmp_path):
    codes = [0, 51, 102, 153, 204, 255]  # intensities 0, 0.2, ..., 1.0
    groups = {(0.02, 0.004): [], (0.01, 0.002): []}  # two known (shot, read) pairs, per row
    paths, shots, reads = [], [], []
    for gi, (shot, read) in enumerate(groups):
        for code in codes:
            for rep in range(2):
                paths.append(_write(tmp_path / f"f{gi}_{code}_{rep}.png", flat_image(96, 96, code)))
                shots.append(shot)
                reads.append(read)
    ds = quiet_dataset(manifest(paths, shots, reads), PairSpec(task="denoise", crop=96))
    resid: dict = {(k, c): [] for k in groups for c in codes}
    for i in range(len(ds)):
        s = ds[i]
        assert s["input"].dtype == torch.float32 and s["input"].shape == (3, 96, 96)
        key = (shots[i], reads[i])
        code = int(round(float(s["target"].mean()) * 255))
        resid[(key, code)].append((s["input"] - s["target"]).flatten())
    for (shot, read) in groups:
        x = np.array([c / 255 for c in codes])
        r = [torch.cat(resid[((shot, read), c)]) for c in codes]
        assert max(abs(float(v.mean())) for v in r) < 2e-3  # zero-mean noise
        var = np.array([float(v.var()) for v in r])
        slope, intercept = np.polyfit(x, var, 1)
        assert slope == pytest.approx(shot, rel=0.05)
        assert intercept == pytest.approx(read, rel=0.05)


# ----------------------------------------------------------------------------- pre-training geometry


@pytest.mark.parametrize("overlap", [0.5, 0.75, 1.0])
def test_pretrain_crops_overlap_and_share_one_realisation(posdir, overlap):
    _, paths = posdir
    c = 32
    s, parent = crop_geometry(c, overlap)
    for noise, read in (("none", 0.0), ("tiny", TINY**2)):
        ds = quiet_dataset(manifest(paths, 0.0, read), PairSpec(task="pretrain", crop=c, overlap=overlap))
        clean = [torch.from_numpy(load_image(p, gray=False)) for p in paths]
        shifts = []
        for epoch in range(12):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                q, k = ds[i]["q"], ds[i]["k"]
                assert q.shape == k.shape == (3, c, c)
                (yq, xq), (yk, xk) = locate(q), locate(k)
                dy, dx = yk - yq, xk - xq
                assert abs(dy) <= s and abs(dx) <= s  # at least `overlap` of the side is shared per axis
                assert (c - abs(dy)) / c >= overlap - 1e-9
                shifts.append(max(abs(dy), abs(dx)))
                if noise == "none":
                    assert torch.equal(q, crop(clean[i], yq, xq, c)) and torch.equal(k, crop(clean[i], yk, xk, c))
                else:
                    assert not torch.equal(q, crop(clean[i], yq, xq, c))  # noise is there
                    assert (q - crop(clean[i], yq, xq, c)).abs().max() < 6 * TINY
                    # one noisy realisation: the two crops agree exactly where they overlap
                    oy, ox = max(yq, yk), max(xq, xk)
                    hh, ww = min(yq, yk) + c - oy, min(xq, xk) + c - ox
                    a = q[:, oy - yq : oy - yq + hh, ox - xq : ox - xq + ww]
                    b = k[:, oy - yk : oy - yk + hh, ox - xk : ox - xk + ww]
                    assert a.numel() > 0 and torch.equal(a, b)
        if s == 0:
            assert max(shifts) == 0
        else:
            assert s // 2 <= max(shifts) <= s  # the shifts use the configured range


@pytest.mark.parametrize("raw", ["mosaic", "packed"])
def test_raw_pretrain_even_positions_and_layout(posdir, raw):
    _, paths = posdir
    c = 24
    s, _ = crop_geometry(c, 0.5, even=True)
    assert s % 2 == 0
    ds = quiet_dataset(manifest(paths), PairSpec(task="pretrain", crop=c, raw=raw))
    clean = [torch.from_numpy(load_image(p, gray=False)) for p in paths]
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            pair = ds[i]
            for key in ("q", "k"):
                t = pair[key]
                assert t.shape == ((1, c, c) if raw == "mosaic" else (4, c // 2, c // 2))
                y, x = locate_raw(t, raw == "packed")
                assert y % 2 == 0 and x % 2 == 0
                expect = mosaic(crop(clean[i], y, x, c)[None])
                expect = (expect if raw == "mosaic" else pack_bayer(expect))[0]
                assert torch.equal(t, expect)
            dy = locate_raw(pair["q"], raw == "packed")[0] - locate_raw(pair["k"], raw == "packed")[0]
            assert abs(dy) <= s


# ----------------------------------------------------------------------------- realisations


def test_fixed_realisation_is_the_same_every_epoch_and_fresh_is_not(tmp_path):
    paths = [_write(tmp_path / f"w{i}.png", position_image(32, 32, i)) for i in range(3)]
    m = manifest(paths, 0.01, 0.001)
    for realisation in ("fixed", "fresh"):
        ds = quiet_dataset(m, PairSpec(task="denoise", crop=32, realisation=realisation))  # crop = image
        ds.set_epoch(0)
        a = [ds[i]["input"] for i in range(3)]
        ds.set_epoch(1)
        b = [ds[i]["input"] for i in range(3)]
        same = [torch.equal(x, y) for x, y in zip(a, b)]
        assert all(same) if realisation == "fixed" else not any(same)
        ds.set_epoch(0)
        assert all(torch.equal(ds[i]["input"], a[i]) for i in range(3))  # reproducible
        if realisation == "fixed":
            for i, p in enumerate(paths):
                r = m.slice(i, 1).to_pylist()[0]
                ref = fixed_noisy_image(load_image(p, gray=False), r["shot"], r["read"], r["noise_seed"])
                assert torch.equal(a[i], torch.from_numpy(ref))


def _fixed_ref(path, row, raw=False, index=0):
    clean = torch.from_numpy(load_image(path, gray=False))
    if raw:
        clean = mosaic(clean[None])[0]
    return torch.from_numpy(fixed_noisy_image(clean.numpy(), row["shot"], row["read"], row["noise_seed"] + index))


@pytest.mark.parametrize("task,raw", [("denoise", None), ("n2n", None), ("pretrain", None), ("pretrain", "mosaic"), ("jdd", "packed")])
def test_fixed_crops_are_crops_of_fixed_noisy_image(posdir, task, raw):
    tmp, paths = posdir
    m = manifest(paths, 0.0, TINY**2)
    rows = m.to_pylist()
    c = 24
    spec = PairSpec(task=task, crop=c, raw=raw, realisation="fixed")
    sim = tmp / "sim"
    sim.mkdir()
    for with_files in (False, True):
        if with_files:  # as `rcl-dist data simulate` stores them
            for i, p in enumerate(paths):
                for index in range(2 if task == "n2n" else 1):
                    arr = _fixed_ref(p, rows[i], raw is not None, index).numpy().transpose(1, 2, 0)
                    np.save(simulated_path(sim, rows[i]["image_id"], raw=raw is not None, index=index), arr)
        ds = quiet_dataset(m, spec, simulated_dir=sim if with_files else None)
        for epoch in range(3):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                out = ds[i]
                ref0 = _fixed_ref(paths[i], rows[i], raw is not None)
                if task in ("denoise", "n2n"):
                    y, x = locate(out[spec.keys[0]])
                    assert torch.equal(out[spec.keys[0]], crop(ref0, y, x, c))
                    if task == "n2n":
                        ref1 = _fixed_ref(paths[i], rows[i], False, 1)
                        assert torch.equal(out["noisy2"], crop(ref1, y, x, c))
                        assert not torch.equal(out["noisy"], out["noisy2"])
                elif task == "pretrain" and raw is None:
                    for key in ("q", "k"):
                        y, x = locate(out[key])
                        assert torch.equal(out[key], crop(ref0, y, x, c))
                elif task == "pretrain":
                    for key in ("q", "k"):
                        y, x = locate_raw(out[key], False)
                        assert torch.equal(out[key], crop(ref0, y, x, c))
                else:  # jdd packed: input from the RAW realisation, target the clean RGB crop
                    y, x = locate(out["target"])
                    assert y % 2 == 0 and x % 2 == 0
                    assert torch.equal(out["input"], pack_bayer(crop(ref0, y, x, c)[None])[0])
    # the stored files are what is read: tamper with one and see it
    arr = np.load(simulated_path(sim, rows[0]["image_id"], raw=raw is not None))
    np.save(simulated_path(sim, rows[0]["image_id"], raw=raw is not None), arr + 1.0)
    ds = quiet_dataset(m, spec, simulated_dir=sim)
    first = ds[0][spec.keys[0]]
    assert first.min() > 0.99  # every crop value moved by +1


def test_missing_simulated_files_warn_and_are_computed(posdir):
    tmp, paths = posdir
    m = manifest(paths, 0.01, 0.001)
    spec = PairSpec(task="denoise", crop=24, realisation="fixed")
    with pytest.warns(UserWarning, match="4 fixed realisations are missing"):
        ds = ManifestPairs(m, spec, simulated_dir=tmp / "nothing")
    plain = quiet_dataset(m, spec)
    assert torch.equal(ds[1]["input"], plain[1]["input"])


# ----------------------------------------------------------------------------- other tasks


def test_sr_jdensr_jdd_real_n2n_shapes_and_sanity(tmp_path):
    h = w = 64
    yy, xx = np.mgrid[:h, :w]
    smooth = (np.stack([xx * 3, yy * 3, (xx + yy) * 2], -1) % 256).astype(np.uint8)  # smooth ramps
    paths = [_write(tmp_path / f"s{i}.png", np.roll(smooth, 5 * i, axis=1)) for i in range(3)]
    c = 32
    clean = {p: torch.from_numpy(load_image(p, gray=False)) for p in paths}

    # sr: input is the antialiased bicubic x2 of the HR target
    ds = quiet_dataset(manifest(paths), PairSpec(task="sr", crop=c))
    out = ds[0]
    assert out["input"].shape == (3, c // 2, c // 2) and out["target"].shape == (3, c, c)
    lr = F.interpolate(out["target"][None], scale_factor=0.5, mode="bicubic", antialias=True)[0]
    assert torch.allclose(out["input"], lr, atol=1e-6)
    interior = (out["input"] - F.avg_pool2d(out["target"][None], 2)[0])[:, 2:-2, 2:-2]
    assert interior.abs().max() < 0.02  # close to box downsampling on ramps (away from the wraps)

    # jdensr: noise (Eq. 8) on the LR
    ds = quiet_dataset(manifest(paths, 0.0, 0.01**2), PairSpec(task="jdensr", crop=c))
    resid = []
    for i in range(len(ds)):
        out = ds[i]
        assert out["input"].shape == (3, c // 2, c // 2) and out["target"].shape == (3, c, c)
        lr = F.interpolate(out["target"][None], scale_factor=0.5, mode="bicubic", antialias=True)[0]
        resid.append((out["input"] - lr).flatten())
    assert float(torch.cat(resid).std()) == pytest.approx(0.01, rel=0.1)
    with pytest.raises(ValueError, match="jdensr.*realisation='fresh'"):  # as the DALI pipeline
        ManifestPairs(manifest(paths), PairSpec(task="jdensr", crop=c, realisation="fixed"))

    # jdd: zero-noise input is the mosaic of the RGB target at an even position
    pos = [_write(tmp_path / f"q{i}.png", position_image(48, 56, i)) for i in range(2)]
    for raw in ("mosaic", "packed"):
        ds = quiet_dataset(manifest(pos), PairSpec(task="jdd", crop=c, raw=raw))
        for epoch in range(4):
            ds.set_epoch(epoch)
            out = ds[epoch % 2]
            y, x = locate(out["target"])
            assert y % 2 == 0 and x % 2 == 0
            assert torch.equal(out["target"], crop(torch.from_numpy(load_image(pos[epoch % 2], gray=False)), y, x, c))
            m = mosaic(out["target"][None])
            assert torch.equal(out["input"], (m if raw == "mosaic" else pack_bayer(m))[0])

    # n2n: two realisations of one crop
    ds = quiet_dataset(manifest(paths, 0.0, 0.02**2), PairSpec(task="n2n", crop=c))
    out = ds[1]
    assert out["noisy"].shape == out["noisy2"].shape == (3, c, c)
    d = out["noisy"] - out["noisy2"]
    assert float(d.std()) == pytest.approx(0.02 * 2**0.5, rel=0.1)  # independent noise, same crop

    # real: *_real input and *_mean target at the same position, no synthetic noise
    reals = []
    for i in range(2):
        reals.append(_write(tmp_path / f"r{i}_real.png", position_image(40, 48, 3 * i)))
        _write(tmp_path / f"r{i}_mean.png", position_image(40, 48, 3 * i + 1))
    assert real_partner(reals[0]) == str(tmp_path / "r0_mean.png")
    m = manifest(reals + [str(real_partner(r)) for r in reals], 0.5, 0.5)  # partners are not samples
    ds = quiet_dataset(m, PairSpec(task="real", crop=c, gray=False))
    assert len(ds) == 2
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(2):
            out = ds[i]
            y, x = locate(out["input"])
            assert locate(out["target"]) == (y, x)
            assert torch.equal(out["input"], crop(torch.from_numpy(load_image(reals[i], gray=False)), y, x, c))
            assert torch.equal(out["target"][:2], out["input"][:2]) and not torch.equal(out["target"], out["input"])


def test_gray_spec_gives_one_channel(posdir):
    _, paths = posdir
    ds = quiet_dataset(manifest(paths, 0.0, 1e-4), PairSpec(task="pretrain", crop=16, gray=True))
    assert ds[0]["q"].shape == (1, 16, 16)


# ----------------------------------------------------------------------------- sharding and loading


def test_shards_are_disjoint_cover_the_split_and_have_equal_batches(tmp_path):
    paths = [_write(tmp_path / f"t{i}.png", position_image(16, 16, i)) for i in range(10)]
    m = manifest(paths, 0.0, 1e-4, split=["train"] * 10)
    n, shards = 10, 3
    for epoch in (0, 1):
        parts = []
        for r in range(shards):
            smp = ShardSampler(n, shards, r, seed=5)
            smp.set_epoch(epoch)
            parts.append(list(smp))
        assert all(len(p) == 4 for p in parts)  # ceil(10 / 3)
        allidx = sum(parts, [])
        assert sorted(set(allidx)) == list(range(n))  # every image once per epoch...
        assert len(allidx) - len(set(allidx)) == 2  # ...plus the two padding repeats
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        assert [i for i in allidx if allidx.count(i) > 1] and set(i for i in allidx if allidx.count(i) > 1) == set(perm[:2])
    assert ShardSampler(n, shards, 0, seed=5).indices(0) != ShardSampler(n, shards, 0, seed=5).indices(1)

    counts = []
    for r in range(shards):
        spec = PairSpec(task="denoise", crop=8, batch_size=3, num_shards=shards, shard_id=r, seed=5)
        loader = make_loader(m, spec)
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        assert all(b["input"].shape == (3, 3, 8, 8) and b["target"].shape == (3, 3, 8, 8) for b in batches)
    assert counts == [(1, 1)] * shards  # 4 samples per shard -> one batch of 3, the partial one dropped
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_loader(m, PairSpec(task="denoise", crop=8, batch_size=5, num_shards=3, shard_id=0))


def test_workers_give_the_same_batches_and_epochs_advance(posdir):
    _, paths = posdir
    copies = [str(Path(p).with_name(f"c{k}_" + Path(p).name)) for k in range(2) for p in paths]
    for c in copies:  # a manifest lists each file once: 12 rows from 3 copies of the 4 images
        Path(c).write_bytes(Path(paths[copies.index(c) % len(paths)]).read_bytes())
    m = manifest(list(paths) + copies, 0.01, 0.002)  # 12 rows
    spec = PairSpec(task="pretrain", crop=16, batch_size=4, seed=3)

    def epochs(loader, k):
        return [[{key: v.clone() for key, v in b.items()} for b in loader] for _ in range(k)]

    serial = epochs(make_loader(m, spec, num_workers=0), 2)
    loader = make_loader(m, spec, num_workers=2)
    parallel = epochs(loader, 2)
    assert len(serial[0]) == 3
    for es, ep in zip(serial, parallel):
        for bs, bp in zip(es, ep):
            assert bs.keys() == bp.keys() == {"q", "k"} and bs["q"].shape == (4, 3, 16, 16)
            assert all(torch.equal(bs[key], bp[key]) for key in bs)
    # the next iteration is the next epoch: its permutation and its noise / crops for every image
    ds = quiet_dataset(m, spec)
    for e in (0, 1):
        ds.set_epoch(e)
        order = ShardSampler(len(ds), seed=spec.seed).indices(e)
        expect = torch.stack([ds[i]["q"] for i in order[:12]]).view(3, 4, 3, 16, 16)
        assert all(torch.equal(expect[b], parallel[e][b]["q"]) for b in range(3))
    assert not torch.equal(ds[(0, 0)]["q"], ds[(1, 0)]["q"])
    loader.set_epoch(0)  # and set_epoch goes back, also with persistent workers
    again = epochs(loader, 1)[0]
    assert all(torch.equal(a["q"], b["q"]) for a, b in zip(again, serial[0]))


# ----------------------------------------------------------------------------- bad data


def test_small_images_are_dropped_with_a_count_or_fail_naming_the_largest(tmp_path):
    big = _write(tmp_path / "big.png", position_image(40, 40))
    small = [_write(tmp_path / f"small{i}.png", position_image(20, 30 + i)) for i in range(2)]
    spec = PairSpec(task="pretrain", crop=24, overlap=0.5)  # parent 36
    with pytest.warns(UserWarning, match=r"2 of 3 images .* smaller than 36x36"):
        ds = ManifestPairs(manifest([big] + small), spec)
    assert ds.paths == [big]
    with pytest.raises(ValueError, match=r"at least 36x36 \(task 'pretrain', crop 24, parent crop 36\); the largest is 31x20: .*small1\.png"):
        ManifestPairs(manifest(small), spec)
    # fine-tuning tasks only need the crop itself
    assert len(quiet_dataset(manifest([big] + small), PairSpec(task="denoise", crop=20))) == 3
    with pytest.raises(ValueError, match="no images"):
        ManifestPairs(manifest([big], split="val"), spec)


def test_vanished_files_are_skipped_then_substituted(posdir):
    _, paths = posdir
    extra = [str(Path(p).with_name("copy" + Path(p).name)) for p in paths]
    for p, e in zip(paths, extra):
        Path(e).write_bytes(Path(p).read_bytes())
    m = manifest(paths + extra, 0.01, 0.001)
    os.remove(paths[2])
    spec = PairSpec(task="denoise", crop=24, batch_size=2)
    with pytest.warns(UserWarning, match=r"1 indexed files no longer exist.*p2\.png"):
        ds = ManifestPairs(m, spec)
    assert ds.skipped == 1 and ds.skipped_paths == [paths[2]] and len(ds) == 7
    ref = [ds[i] for i in range(len(ds))]

    gone = ds.paths[4]
    os.remove(gone)  # vanishes after the dataset was built
    with pytest.warns(UserWarning, match="vanished"):
        s4 = ds[4]
    assert ds.substituted == 1
    again = ds[4]  # the substitution is deterministic (warned once per file)
    assert ds.substituted == 2 and all(torch.equal(s4[k], again[k]) for k in s4)
    assert not torch.equal(s4["input"], ref[4]["input"]) and not torch.equal(s4["input"], ref[5]["input"])
    assert all(torch.equal(ds[i]["input"], ref[i]["input"]) for i in (0, 5, 6))

    # an epoch through worker processes completes; their substitutions are counted here too
    loader = make_loader(ds, spec, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert len(batches) == 3 and ds.substituted == 3


def test_stale_simulated_file_is_an_error_naming_it(posdir):
    tmp, paths = posdir
    m = manifest(paths, 0.01, 0.001)
    sim = tmp / "sim"
    sim.mkdir()
    for r in m.to_pylist():
        np.save(simulated_path(sim, r["image_id"]), np.zeros((8, 8, 3), np.float32))  # not this image's size
    ds = quiet_dataset(m, PairSpec(task="denoise", crop=24, realisation="fixed"), simulated_dir=sim)
    with pytest.raises(ValueError, match=r"0000000000000000\.npy.*rerun 'rcl-dist data simulate'"):
        ds[0]
