"""Manifest indexing, validation, incremental re-indexing and simulation (rcl_dist.data.index, .manifest, .simulate, .files).

Every bad input is made in tmp_path: zero-byte, truncated JPEG / PNG, text named .png, a PNG whose
header declares 100000x100000 pixels (hand-made IHDR with a valid CRC), 1x1, unsupported kinds, an
unreadable file, duplicates, files that vanish or change between runs.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rcl_dist.data import files as F
from rcl_dist.data import index as I
from rcl_dist.data import manifest as M
from rcl_dist.data import simulate as S
from rcl_dist.data.images import load_image
from rcl_dist.data.spec import MANIFEST_SCHEMA, REJECTS_SCHEMA, derived_seed, fixed_noisy_image, simulated_path
from rcl_dist.noise import mosaic

# ------------------------------------------------------------------------------------------ helpers


def _png(
    arr: np.ndarray, bit_depth: int = 8, color_type: int | None = None, size: tuple[int, int] | None = None
) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB); ``size`` overrides the IHDR's (w, h)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = arr.shape[:2]
    if color_type is None:
        color_type = {2: 0, 3: {1: 0, 2: 4, 3: 2, 4: 6}[arr.shape[2] if arr.ndim == 3 else 1]}[arr.ndim]
    dt = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\x00" + np.ascontiguousarray(arr[y]).astype(dt).tobytes() for y in range(h))
    w, h = size or (w, h)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def _encoded(img: Image.Image, fmt: str) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt)
    return b.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _quiet(_: str) -> None:
    pass


def _rejects(out: Path) -> dict[str, str]:
    t = pq.read_table(I.rejects_path(out))
    assert t.schema.equals(REJECTS_SCHEMA)
    return dict(zip(t.column("path").to_pylist(), t.column("reason").to_pylist()))


def _rows(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in M.read_manifest(out).to_pylist()}


def _many(folder: Path, n: int, start: int = 0) -> list[Path]:
    """n distinct tiny PNGs (distinct content: distinct sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [_write(folder / f"img{i:04d}.png", _png(_rgb(4, 4, i))) for i in range(start, start + n)]


# ------------------------------------------------------------------------------------------ validation


@pytest.fixture
def zoo(tmp_path: Path) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """A folder of good images of every supported kind, and bad files each with its expected category."""
    d = tmp_path / "zoo"
    rgb = _rgb(32, 40, 0)
    good = {
        "rgb_jpg": _save(Image.fromarray(rgb), d / "rgb.JPG", "JPEG"),
        "gray": _save(Image.fromarray(rgb[..., 0]), d / "sub" / "gray.png"),
        "rgba": _save(Image.fromarray(rgb).convert("RGBA"), d / "rgba.png"),
        "la": _save(Image.fromarray(rgb).convert("LA"), d / "la.png"),
        "palette": _save(Image.fromarray(rgb).convert("P"), d / "palette.png"),
        "cmyk": _save(Image.fromarray(_rgb(32, 40, 1)).convert("CMYK"), d / "cmyk.jpg", "JPEG"),
        "bmp": _save(Image.fromarray(_rgb(32, 40, 2)), d / "deep" / "er" / "x.bmp"),
        "tiff": _save(Image.fromarray(_rgb(32, 40, 3)), d / "x.tiff"),
        "gray16": _write(d / "gray16.png", _png(np.arange(12 * 10, dtype=np.uint16).reshape(10, 12) * 500, 16)),
        "rgb16": _write(d / "rgb16.png", _png(np.arange(10 * 12 * 3, dtype=np.uint16).reshape(10, 12, 3) * 180, 16)),
        "small": _save(Image.fromarray(_rgb(3, 5, 4)), d / "small.png"),  # below any crop: accepted
        "two": _save(Image.fromarray(_rgb(2, 2, 5)), d / "two.png"),  # min_side exactly
    }
    bmp_wh, bmp_rest = (60000, 60000), (1, 24, 0, 0, 0, 0, 0, 0)  # a 60000x60000 24-bit BMP header, no pixels
    jpg = _encoded(Image.fromarray(_rgb(64, 64, 6)), "JPEG")
    png = _encoded(Image.fromarray(_rgb(64, 64, 7)), "PNG")
    bad = {
        "zero-byte": _write(d / "zero.png", b""),
        "truncated": _write(d / "trunc.jpg", jpg[: len(jpg) // 2]),
        "truncated png": _write(d / "trunc.png", png[: len(png) // 2]),
        "not an image": _write(d / "notes.png", b"hello, I am a text file\n"),
        "too large": _write(d / "huge.png", _png(np.zeros((1, 1), np.uint8), size=(100_000, 100_000))),
        "too large bmp": _write(d / "huge.bmp", b"BM" + struct.pack("<IHHIIiiHHIIiiII", 0, 0, 0, 54, 40, *bmp_wh, *bmp_rest)),
        "too small": _save(Image.fromarray(_rgb(1, 1, 8)), d / "one.png"),
        "unsupported gif": _save(Image.fromarray(_rgb(8, 8, 9)), d / "anim.png", "GIF"),
        "unsupported 1-bit": _save(Image.fromarray(_rgb(8, 8, 10)).convert("1"), d / "bilevel.png"),
        "unsupported 4-bit": _save(Image.fromarray(_rgb(8, 8, 11)[..., 0]), d / "grey4.png", bits=4),
        "unsupported pages": _save(
            Image.fromarray(_rgb(8, 8, 12)), d / "pages.tif", save_all=True, append_images=[Image.fromarray(_rgb(8, 8, 13))]
        ),
        "unsupported float": _save(Image.fromarray(np.ones((8, 8), np.float32)), d / "float.tif"),
    }
    _write(d / "readme.txt", b"not an image suffix: ignored")
    _write(d / "data.npy", b"ignored too")
    return d, good, bad


def test_index_rejects_each_bad_file_with_its_reason_and_keeps_the_rest(zoo, tmp_path):
    d, good, bad = zoo
    out = tmp_path / "m.parquet"
    lines: list[str] = []
    res = I.index_images([str(d)], out, log=lines.append)

    rows, rejects = _rows(out), _rejects(out)
    assert set(rows) == {str(p) for p in good.values()}
    assert set(rejects) == {str(p) for p in bad.values()}
    for key, p in bad.items():  # each key starts with its expected category
        want = next(c for c in I.REASONS if key.startswith(c))
        assert I.reason_category(rejects[str(p)]) == want, (key, rejects[str(p)])
    assert "1x1" in rejects[str(bad["too small"])]
    assert "100000x100000" in rejects[str(bad["too large"])]
    assert "multi-page" in rejects[str(bad["unsupported pages"])]
    assert "4-bit" in rejects[str(bad["unsupported 4-bit"])]
    assert res.accepted == len(good) and res.rejected_total == len(bad)
    assert res.rejected == {
        "zero-byte": 1, "truncated": 2, "not an image": 1, "too large": 2, "too small": 1, "unsupported": 5
    }  # fmt: skip
    assert any(line.startswith("rejected ") for line in lines) and "accepted" in lines[-1]
    assert "too large" in res.summary() and str(out) in res.summary()

    table = M.read_manifest(out)
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.column("path").to_pylist() == sorted(rows)

    expect = {  # (mode, channels, bit_depth, width, height)
        "rgb_jpg": ("RGB", 3, 8, 40, 32),
        "gray": ("L", 1, 8, 40, 32),
        "rgba": ("RGBA", 3, 8, 40, 32),
        "la": ("LA", 1, 8, 40, 32),
        "palette": ("P", 3, 8, 40, 32),
        "cmyk": ("CMYK", 3, 8, 40, 32),
        "bmp": ("RGB", 3, 8, 40, 32),
        "tiff": ("RGB", 3, 8, 40, 32),
        "gray16": ("I;16", 1, 16, 12, 10),
        "rgb16": ("RGB", 3, 16, 12, 10),
        "small": ("RGB", 3, 8, 5, 3),
        "two": ("RGB", 3, 8, 2, 2),
    }
    for key, p in good.items():
        r = rows[str(p)]
        assert (r["mode"], r["channels"], r["bit_depth"], r["width"], r["height"]) == expect[key], key
        # the recorded geometry is what the loaders produce
        assert S._load_clean(str(p), r["mode"], None).shape == (r["channels"], r["height"], r["width"]), key
        assert r["image_id"] == r["sha256"][:16] and r["size_bytes"] == p.stat().st_size
    # the 16-bit grey PNG keeps its 16-bit values through the reference loader
    g16 = load_image(good["gray16"])
    assert np.allclose(g16[0], np.arange(120).reshape(10, 12) * 500 / 65535.0)


def test_too_large_from_the_header_without_decoding(tmp_path):
    """Just over max_pixels and far over it: both rejected from the header, naming the declared size,
    and Pillow's global limit is restored afterwards."""
    d = tmp_path / "d"
    over = _save(Image.fromarray(_rgb(12, 12, 0)), d / "over.png")  # 144 pixels > 100
    bomb = _save(Image.fromarray(_rgb(20, 20, 1)), d / "bomb.png")  # 400 > 2 * 100: Pillow's own limit
    ok = _save(Image.fromarray(_rgb(10, 10, 2)), d / "ok.png")
    out = tmp_path / "m.parquet"
    old = Image.MAX_IMAGE_PIXELS
    res = I.index_images([d], out, max_pixels=100, log=_quiet)
    assert Image.MAX_IMAGE_PIXELS == old  # global restored
    rej = _rejects(out)
    assert res.accepted == 1 and set(_rows(out)) == {str(ok)}
    assert I.reason_category(rej[str(over)]) == "too large" and "12x12" in rej[str(over)]
    assert I.reason_category(rej[str(bomb)]) == "too large" and "20x20" in rej[str(bomb)]


def test_unreadable_file_is_rejected(tmp_path, monkeypatch):
    """chmod 000 blocks reads for a normal user; tests often run as root, where it does not, so then
    the read itself is made to fail with EACCES (what open() raises for an unreadable file)."""
    d = tmp_path / "d"
    ok = _save(Image.fromarray(_rgb(8, 8, 0)), d / "ok.png")
    locked = _save(Image.fromarray(_rgb(8, 8, 1)), d / "locked.png")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root
            real = I._read_file

            def read(path: str) -> bytes:
                if path == str(locked):
                    raise PermissionError(13, "Permission denied", path)
                return real(path)

            monkeypatch.setattr(I, "_read_file", read)
        out = tmp_path / "m.parquet"
        res = I.index_images([d], out, log=_quiet)
    finally:
        locked.chmod(0o644)
    reason = _rejects(out)[str(locked)]
    assert reason.startswith("unreadable: ") and "Permission denied" in reason
    assert set(_rows(out)) == {str(ok)} and res.rejected == {"unreadable": 1}


def test_dangling_link_and_fifo_are_unreadable_not_hangs(tmp_path):
    d = tmp_path / "d"
    ok = _save(Image.fromarray(_rgb(8, 8, 0)), d / "ok.png")
    (d / "gone.png").symlink_to(d / "nowhere.png")
    os.mkfifo(d / "pipe.png")
    (d / "folder.png").mkdir()  # a folder with an image suffix is a folder: searched, not a file
    inner = _save(Image.fromarray(_rgb(8, 8, 1)), d / "folder.png" / "inner.png")
    out = tmp_path / "m.parquet"
    I.index_images([d], out, log=_quiet)
    rej = _rejects(out)
    assert set(rej) == {str(d / "gone.png"), str(d / "pipe.png")}
    assert all(r.startswith("unreadable: ") for r in rej.values())
    assert set(_rows(out)) == {str(ok), str(inner)}


def test_duplicates_keep_the_first_path_in_sorted_order(tmp_path):
    d = tmp_path / "d"
    data = _png(_rgb(6, 6, 0))
    a, b, c = _write(d / "b.png", data), _write(d / "a" / "z.png", data), _write(d / "c.png", _png(_rgb(6, 6, 1)))
    out = tmp_path / "m.parquet"
    res = I.index_images([d], out, log=_quiet)
    assert set(_rows(out)) == {str(b), str(c)}  # ".../a/z.png" < ".../b.png"
    assert _rejects(out)[str(a)].startswith(f"duplicate: duplicate of {b}")
    assert res.rejected == {"duplicate": 1} and res.accepted == 2
    # the duplicate goes on being rejected when nothing changed; deleting the kept one promotes it
    assert I.index_images([d], out, log=_quiet).rejected == {"duplicate": 1}
    b.unlink()
    res = I.index_images([d], out, log=_quiet)
    assert set(_rows(out)) == {str(a), str(c)} and res.removed == 1 and not res.rejected


# ------------------------------------------------------------------------------------------ idempotence


def test_index_twice_is_identical_and_decodes_nothing(zoo, tmp_path, monkeypatch):
    d, good, _ = zoo
    out = tmp_path / "m.parquet"
    first = I.index_images([d], out, log=_quiet)
    t1, b1, r1 = M.read_manifest(out), out.read_bytes(), I.rejects_path(out).read_bytes()

    decoded: list[str] = []
    real = I._inspect_file
    monkeypatch.setattr(I, "_inspect_file", lambda p, *a: decoded.append(p) or real(p, *a))
    second = I.index_images([d], out, log=_quiet)
    assert M.read_manifest(out).equals(t1)
    assert out.read_bytes() == b1 and I.rejects_path(out).read_bytes() == r1  # byte-identical files
    assert second.reused == second.accepted == first.accepted == len(good) and second.validated == 0
    assert not set(decoded) & {str(p) for p in good.values()}  # only the rejected files are looked at again
    assert second.rejected == first.rejected


def test_same_content_gets_the_same_values_in_any_folder_or_order(tmp_path):
    """Parameters, seeds and the drawn split are functions of (seed, content) only."""
    files = _many(tmp_path / "a", 30)
    other = tmp_path / "b" / "nested"
    for p in files[::-1][:10]:
        _write(other / f"renamed_{p.name}", p.read_bytes())
    I.index_images([tmp_path / "a"], tmp_path / "a.parquet", log=_quiet)
    I.index_images([tmp_path / "b"], tmp_path / "b.parquet", log=_quiet)
    by_sha = {r["sha256"]: r for r in _rows(tmp_path / "a.parquet").values()}
    cols = ("image_id", "split", "shot", "read", "noise_seed", "width", "height")
    for r in _rows(tmp_path / "b.parquet").values():
        assert {k: r[k] for k in cols} == {k: by_sha[r["sha256"]][k] for k in cols}
    # and a different base seed changes them
    I.index_images([tmp_path / "b"], tmp_path / "c.parquet", seed=1, log=_quiet)
    rb, rc = _rows(tmp_path / "b.parquet"), _rows(tmp_path / "c.parquet")
    assert all(rb[p]["noise_seed"] != rc[p]["noise_seed"] and rb[p]["shot"] != rc[p]["shot"] for p in rb)
    r = next(iter(rb.values()))
    assert r["noise_seed"] == derived_seed(0, r["sha256"], "noise")


def test_incremental_changes_new_and_vanished_files(tmp_path, monkeypatch):
    d = tmp_path / "d"
    files = _many(d, 6)
    out = tmp_path / "m.parquet"
    I.index_images([d], out, log=_quiet)
    old = M.read_manifest(out)

    files[0].unlink()  # vanished
    changed = files[1]
    changed.write_bytes(_png(_rgb(5, 7, 99)))  # changed content (size differs)
    os.utime(changed, ns=(1, 1))
    new = _write(d / "new" / "n.png", _png(_rgb(4, 4, 100)))

    present, missing = M.check_paths(old)
    assert missing == [str(files[0])] and present.num_rows == 5

    decoded: list[str] = []
    real = I._inspect_file
    monkeypatch.setattr(I, "_inspect_file", lambda p, *a: decoded.append(p) or real(p, *a))
    res = I.index_images([d], out, log=_quiet)
    assert sorted(decoded) == sorted([str(changed), str(new)])
    assert (res.reused, res.validated, res.removed, res.accepted) == (4, 2, 1, 6)
    rows = _rows(out)
    assert str(files[0]) not in rows and str(new) in rows
    assert (rows[str(changed)]["width"], rows[str(changed)]["height"]) == (7, 5)
    assert M.check_paths(M.read_manifest(out))[1] == []
    assert "removed" in res.summary()


def test_reused_rows_are_rechecked_against_new_limits(tmp_path):
    d = tmp_path / "d"
    big = _save(Image.fromarray(_rgb(30, 30, 0)), d / "big.png")
    small = _save(Image.fromarray(_rgb(4, 4, 1)), d / "small.png")
    out = tmp_path / "m.parquet"
    I.index_images([d], out, log=_quiet)
    res = I.index_images([d], out, min_side=8, max_pixels=800, log=_quiet)
    rej = _rejects(out)
    assert res.accepted == 0 and rej[str(small)].startswith("too small") and rej[str(big)].startswith("too large")
    res = I.index_images([d], out, log=_quiet)
    assert res.accepted == 2


def test_interrupted_index_keeps_what_is_done(tmp_path, monkeypatch):
    d = tmp_path / "d"
    files = _many(d, 8)
    out = tmp_path / "m.parquet"
    real = I._inspect_file
    seen: list[str] = []

    def flaky(path: str, *a):
        if len(seen) == 5:
            raise KeyboardInterrupt
        seen.append(path)
        return real(path, *a)

    monkeypatch.setattr(I, "_inspect_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        I.index_images([d], out, workers=1, log=_quiet)
    assert set(_rows(out)) == {str(p) for p in files[:5]}  # a complete, valid manifest of the done part
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(I, "_inspect_file", real)
    res = I.index_images([d], out, log=_quiet)
    assert (res.reused, res.validated, res.accepted) == (5, 3, 8)


def test_periodic_checkpoint_is_a_valid_manifest(tmp_path, monkeypatch):
    d = tmp_path / "d"
    _many(d, 4)
    out = tmp_path / "m.parquet"
    real = I._inspect_file
    sizes: list[int] = []

    def spy(path: str, *a):
        if out.exists():
            sizes.append(M.read_manifest(out).num_rows)
        return real(path, *a)

    monkeypatch.setattr(I, "_inspect_file", spy)
    I.index_images([d], out, workers=1, checkpoint_s=0.0, log=_quiet)
    assert sizes == [1, 2, 3]


def test_existing_output_that_is_not_a_manifest_is_not_overwritten(tmp_path):
    _many(tmp_path / "d", 2)
    out = tmp_path / "precious.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), out)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"precious\.parquet.*not a manifest"):
        I.index_images([tmp_path / "d"], out, log=_quiet)
    assert out.read_bytes() == before


# ------------------------------------------------------------------------------------------ splits and parameters


def test_seeded_split_is_stable_and_near_val_fraction(tmp_path):
    _many(tmp_path / "d", 300)
    out = tmp_path / "m.parquet"
    res = I.index_images([tmp_path / "d"], out, val_fraction=0.1, test_fraction=0.2, log=_quiet)
    n = res.splits
    assert sum(n.values()) == 300
    assert 12 <= n["val"] <= 48 and 35 <= n["test"] <= 85  # ~ 30 +- 5 sd, 60 +- 7 sd
    assert M.read_manifest(out, "val").num_rows == n["val"]
    splits = {r["sha256"]: r["split"] for r in _rows(out).values()}
    # a second data set that shares images: the shared images keep their split
    _many(tmp_path / "e", 50, start=280)
    I.index_images([tmp_path / "e"], tmp_path / "e.parquet", val_fraction=0.1, test_fraction=0.2, log=_quiet)
    for r in _rows(tmp_path / "e.parquet").values():
        if r["sha256"] in splits:
            assert r["split"] == splits[r["sha256"]]
    # val_fraction 0 -> all train
    assert I.index_images([tmp_path / "d"], out, val_fraction=0.0, log=_quiet).splits == {"train": 300, "val": 0, "test": 0}


def test_folder_split_suffix(tmp_path):
    _many(tmp_path / "tr", 5)
    _many(tmp_path / "va", 3, start=10)
    _many(tmp_path / "tr" / "held", 2, start=20)  # a deeper folder's split wins
    out = tmp_path / "m.parquet"
    dirs = [f"{tmp_path / 'tr'}:train", f"{tmp_path / 'va'}:val", (tmp_path / "tr" / "held", "test")]
    res = I.index_images(dirs, out, log=_quiet)
    assert res.splits == {"train": 5, "val": 3, "test": 2}
    rows = _rows(out)
    assert all(r["split"] == "test" for p, r in rows.items() if "/held/" in p)

    assert I.parse_folder("data:val") == ("data", "val")
    assert I.parse_folder("C:\\images") == ("C:\\images", None)
    assert I.parse_folder("odd:name") == ("odd:name", None)
    assert I.parse_folder("a:b:test") == ("a:b", "test")
    # a folder whose name really ends in ':train' can be given as a tuple
    odd = tmp_path / "x:train"
    _many(odd, 2, start=30)
    res = I.index_images([(odd, None)], tmp_path / "o.parquet", val_fraction=0.0, log=_quiet)
    assert res.accepted == 2
    with pytest.raises(FileNotFoundError, match="nowhere"):
        I.index_images([tmp_path / "nowhere"], out, log=_quiet)
    with pytest.raises(ValueError, match="different splits"):
        I.index_images([f"{tmp_path / 'tr'}:train", f"{tmp_path / 'tr'}:val"], out, log=_quiet)


@pytest.mark.parametrize("sampler,options", [("uniform", {}), ("uniform", {"sigma_max": 0.02}), ("brooks", {})])
def test_parameters_come_from_the_sampler(tmp_path, sampler, options):
    _many(tmp_path / "d", 40)
    out = tmp_path / "m.parquet"
    I.index_images([tmp_path / "d"], out, sampler=sampler, sampler_options=options, log=_quiet)
    t = M.read_manifest(out)
    shot, read = np.array(t.column("shot").to_pylist()), np.array(t.column("read").to_pylist())
    if sampler == "uniform":
        b = options.get("sigma_max", 20 / 255) / np.sqrt(2)
        assert (np.sqrt(shot) <= b * (1 + 1e-6)).all() and (np.sqrt(read) <= b * (1 + 1e-6)).all()
        assert shot.max() > 0.3 * b**2  # spread over the range, not stuck at 0
    else:
        assert ((shot >= 0.001 * (1 - 1e-6)) & (shot <= 0.12 * (1 + 1e-6))).all() and (read > 0).all()
    assert len(set(shot.tolist())) == len(shot)  # one pair per image
    r = t.slice(0, 1).to_pylist()[0]
    from rcl_dist.noise import sample_nlf

    p = sample_nlf(sampler, 1, generator=torch.Generator().manual_seed(derived_seed(0, r["sha256"], "nlf")), **options)
    assert (r["shot"], r["read"]) == (float(p.shot[0]), float(p.read[0]))


def test_bad_settings_fail_before_any_work(tmp_path):
    _many(tmp_path / "d", 1)
    out = tmp_path / "m.parquet"
    with pytest.raises(ValueError, match="unknown noise sampler"):
        I.index_images([tmp_path / "d"], out, sampler="gauss", log=_quiet)
    with pytest.raises(ValueError, match="val_fraction"):
        I.index_images([tmp_path / "d"], out, val_fraction=0.7, test_fraction=0.5, log=_quiet)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ read_manifest


def test_read_manifest_names_the_file_and_the_problem(tmp_path):
    _many(tmp_path / "d", 3)
    out = tmp_path / "m.parquet"
    I.index_images([tmp_path / "d"], out, log=_quiet)
    t = M.read_manifest(out)
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        M.read_manifest(tmp_path / "absent.parquet")
    bad = tmp_path / "noshot.parquet"
    pq.write_table(t.drop_columns(["shot"]), bad)
    with pytest.raises(ValueError, match=r"noshot\.parquet.*'shot'"):
        M.read_manifest(bad)
    pq.write_table(t.set_column(2, "width", t.column("width").cast(pa.int64())), bad)
    with pytest.raises(ValueError, match=r"noshot\.parquet: column 'width' has type int64, expected int32"):
        M.read_manifest(bad)
    (tmp_path / "text.parquet").write_text("no")
    with pytest.raises(ValueError, match=r"text\.parquet: not a readable Parquet"):
        M.read_manifest(tmp_path / "text.parquet")
    with pytest.raises(ValueError, match="split"):
        M.read_manifest(out, split="holdout")
    assert M.read_manifest(out, "train").num_rows + M.read_manifest(out, "val").num_rows == 3


# ------------------------------------------------------------------------------------------ simulate


@pytest.fixture
def small_set(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    d = tmp_path / "imgs"
    files = {
        "rgb": _save(Image.fromarray(_rgb(9, 11, 0)), d / "rgb.png"),  # odd sides
        "gray": _save(Image.fromarray(_rgb(8, 6, 1)[..., 0]), d / "gray.png"),
        "cmyk": _save(Image.fromarray(_rgb(6, 8, 2)).convert("CMYK"), d / "cmyk.tif"),
    }
    out = tmp_path / "m.parquet"
    I.index_images([d], out, val_fraction=0.0, log=_quiet)
    return out, files


def test_simulate_matches_fixed_noisy_image_and_is_idempotent(small_set, tmp_path):
    out, files = small_set
    sim = tmp_path / "sim"
    assert S.simulate(out, sim, pairs=True, log=_quiet) == 6
    rows = {Path(r["path"]).stem: r for r in _rows(out).values()}
    for key, r in rows.items():
        clean = S._load_clean(r["path"], r["mode"], None)
        for i in (0, 1):
            got = np.load(simulated_path(sim, r["image_id"], False, i), allow_pickle=False)
            assert got.dtype == np.float32 and got.shape == (r["height"], r["width"], r["channels"])
            want = fixed_noisy_image(clean, r["shot"], r["read"], r["noise_seed"] + i).transpose(1, 2, 0)
            np.testing.assert_array_equal(got, want)
        assert not np.array_equal(
            np.load(simulated_path(sim, r["image_id"])), np.load(simulated_path(sim, r["image_id"], index=1))
        )
    gray = np.load(simulated_path(sim, rows["gray"]["image_id"]))
    assert gray.shape == (8, 6, 1)
    np.testing.assert_array_equal(load_image(files["gray"])[0], S._load_clean(str(files["gray"]), "L", None)[0])

    before = {p: p.read_bytes() for p in sim.iterdir()}
    assert S.simulate(out, sim, pairs=True, log=_quiet) == 0  # all present: nothing rewritten
    # a torn / wrong-shape file is rewritten, reproducibly
    victim = simulated_path(sim, rows["rgb"]["image_id"])
    np.save(victim, np.zeros((2, 2, 3), np.float32))
    assert S.simulate(out, sim, pairs=True, log=_quiet) == 1
    assert {p: p.read_bytes() for p in sim.iterdir()} == before
    # gray=False: grey images become RGB before the noise (shape mismatch: rewritten)
    assert S.simulate(out, sim, gray=False, log=_quiet) == 1
    assert np.load(simulated_path(sim, rows["gray"]["image_id"])).shape == (8, 6, 3)


def test_simulate_raw_is_an_even_rggb_mosaic_with_noise(small_set, tmp_path):
    out, _ = small_set
    sim = tmp_path / "sim"
    assert S.simulate(out, sim, raw=True, log=_quiet) == 3
    r = next(r for r in _rows(out).values() if r["path"].endswith("rgb.png"))
    got = np.load(simulated_path(sim, r["image_id"], raw=True), allow_pickle=False)
    assert got.shape == (8, 10, 1)  # 9x11 cropped to even sides
    clean = load_image(r["path"])[:, :8, :10]
    raw_clean = mosaic(torch.from_numpy(clean)[None])[0].numpy()
    want = fixed_noisy_image(raw_clean, r["shot"], r["read"], r["noise_seed"]).transpose(1, 2, 0)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="raw"):
        S.simulate(out, sim, raw=True, gray=True, log=_quiet)


def test_simulate_skips_vanished_and_changed_files_with_a_warning(small_set, tmp_path):
    out, files = small_set
    files["gray"].unlink()
    files["rgb"].write_bytes(_png(_rgb(9, 11, 50)))
    lines: list[str] = []
    assert S.simulate(out, tmp_path / "sim", log=lines.append) == 1
    assert any(str(files["gray"]) in s and "gone" in s for s in lines)
    assert any(str(files["rgb"]) in s and "changed" in s for s in lines)
    assert "1 images gone, 1 changed" in lines[-1]


def test_ordered_map_keeps_order_and_every_item():
    items = list(range(57))
    for workers in (1, 2, 5):
        assert list(F.ordered_map(lambda x: x * x, items, workers)) == [x * x for x in items]
