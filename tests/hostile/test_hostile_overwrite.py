"""Issue 16, defect 6: `rcl-dist denoise --model M photos/x.jpg photos` silently replaced an existing
photos/x.png that it had not written. Now an existing file is replaced only when this command wrote it
(recorded in the output folder) and it is unchanged since, or with --overwrite."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from rcl_dist.cli import main
from rcl_dist.data.codec import read_image
from rcl_dist.denoise import OUTPUT_RECORD, denoise_paths

from hostile_inputs import noisy_rgb
from test_denoise import fine_tuned_checkpoint

MINE = b"the user's own file, not an image at all"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return fine_tuned_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _denoise(ckpt: Path, *paths: str | Path, overwrite: bool = False) -> int:
    return main(["denoise", "--model", str(ckpt), "--tile", "32", "--overlap", "8", *map(str, paths),
                 *(["--overwrite"] if overwrite else [])])  # fmt: skip


def test_jpeg_into_its_own_folder_keeps_unrelated_png(ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(noisy_rgb(12, 10)).save(photos / "x.jpg", quality=90)
    Image.fromarray(noisy_rgb(12, 10, 1)).save(photos / "y.jpg", quality=90)
    (photos / "x.png").write_bytes(MINE)
    assert _denoise(ckpt, photos / "x.jpg", photos / "y.jpg", photos) == 1
    captured = capsys.readouterr()
    assert f"{photos / 'x.png'} already exists and was not written by rcl-dist denoise; not replaced" in captured.out
    assert "--overwrite" in captured.out
    assert (photos / "x.png").read_bytes() == MINE  # untouched
    assert read_image(photos / "y.png").shape == (12, 10, 3)  # the other input is still done

    # its own output of an earlier run is replaced (recorded); the user's file still is not
    assert _denoise(ckpt, photos / "x.jpg", photos / "y.jpg", photos) == 1
    assert (photos / "x.png").read_bytes() == MINE
    record = json.loads((photos / OUTPUT_RECORD).read_text())["files"]
    assert set(record) == {"y.png"}

    # --overwrite: replaced, and from then on recorded as written by the command
    assert _denoise(ckpt, photos / "x.jpg", photos, overwrite=True) == 0
    assert read_image(photos / "x.png").shape == (12, 10, 3)
    assert _denoise(ckpt, photos / "x.jpg", photos) == 0


def test_output_changed_since_written_is_not_replaced(ckpt, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(noisy_rgb(12, 10)).save(src)
    done, failed = denoise_paths(ckpt, [src], tmp_path / "out", tile=32, overlap=8, progress=False, device="cpu")
    assert failed == [] and len(done) == 1
    out = tmp_path / "out" / "a.png"
    out.write_bytes(MINE)  # the user edited the output afterwards
    os.utime(out, ns=(1, 1))
    done, failed = denoise_paths(ckpt, [src], tmp_path / "out", tile=32, overlap=8, progress=False, device="cpu")
    assert done == [] and "changed since rcl-dist denoise wrote it" in failed[0][1]
    assert out.read_bytes() == MINE


def test_single_file_output_and_planted_link_are_not_replaced(ckpt, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(noisy_rgb(12, 10)).save(src)
    target = tmp_path / "clean.png"
    target.write_bytes(MINE)
    done, failed = denoise_paths(ckpt, [src], target, tile=32, overlap=8, progress=False, device="cpu")
    assert done == [] and "clean.png already exists" in failed[0][1] and target.read_bytes() == MINE
    # a link at an output name is a file of its own: not followed, not replaced
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").symlink_to(target)
    done, failed = denoise_paths(ckpt, [src], tmp_path / "out", tile=32, overlap=8, progress=False, device="cpu")
    assert done == [] and "not written by rcl-dist denoise" in failed[0][1]
    assert (tmp_path / "out" / "a.png").is_symlink() and target.read_bytes() == MINE


def test_corrupt_record_means_nothing_is_replaced(ckpt, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(noisy_rgb(12, 10)).save(src)
    denoise_paths(ckpt, [src], tmp_path / "out", tile=32, overlap=8, progress=False, device="cpu")
    (tmp_path / "out" / OUTPUT_RECORD).write_text("{not json")
    before = (tmp_path / "out" / "a.png").read_bytes()
    done, failed = denoise_paths(ckpt, [src], tmp_path / "out", tile=32, overlap=8, progress=False, device="cpu")
    assert done == [] and "not written by rcl-dist denoise" in failed[0][1]
    assert (tmp_path / "out" / "a.png").read_bytes() == before
