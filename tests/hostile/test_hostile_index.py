"""Issue 16, defect 8: a file name that is not UTF-8 (any bytes are legal in a POSIX name) aborted the
whole `rcl-dist data index` (exit status 2, no manifest, the file not named). Now that file is a rejects
row showing its name with escapes, and the rest is indexed."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
from PIL import Image

from rcl_dist.cli import main
from rcl_dist.data.index import index_images, rejects_path

from hostile_inputs import noisy_rgb


def _png_at_bytes_path(path: bytes, seed: int) -> None:
    """Write a PNG at a bytes path (created with os.open: no str round trip that could hide the bytes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        Image.fromarray(noisy_rgb(8, 8, seed)).save(f, format="PNG")


def test_non_utf8_file_name_rejected_with_escapes_rest_indexed(tmp_path, capsys):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(noisy_rgb(8, 8, 0)).save(d / "good.png")
    _png_at_bytes_path(os.fsencode(d) + b"/bad\xff.png", 1)
    os.mkdir(os.fsencode(d) + b"/dir\xfe")  # a sub-folder with such a name: every file under it
    _png_at_bytes_path(os.fsencode(d) + b"/dir\xfe/inside.png", 2)
    Image.fromarray(noisy_rgb(8, 8, 3)).save(d / "sub" / "caf\u00e9.png")  # valid UTF-8, not ASCII: indexed

    out = tmp_path / "m.parquet"
    assert main(["data", "index", str(d), "--out", str(out)]) == 0
    rows = pq.read_table(out).column("path").to_pylist()
    assert sorted(os.path.basename(p) for p in rows) == ["caf\u00e9.png", "good.png"]
    rejects = {r["path"]: r["reason"] for r in pq.read_table(rejects_path(out)).to_pylist()}
    assert set(rejects) == {f"{d}/bad\\xff.png", f"{d}/dir\\xfe/inside.png"}
    assert all(r.startswith("unsupported: the file name is not valid UTF-8") for r in rejects.values())
    assert f"rejected {d}/bad\\xff.png: unsupported" in capsys.readouterr().out

    # incremental re-index: the same result, nothing lost
    res = index_images([d], out, log=lambda s: None)
    assert res.accepted == 2 and res.reused == 2 and res.rejected == {"unsupported": 2}
