"""Issue 16, defect 9: APNG and EXIF orientation handled differently by different commands. The probe:
the same file through every reader (``load_image``: --local and the reference loader; the codec:
denoise, evaluate, serving; the manifest's recorded sizes, which DALI's crops rely on; DALI itself,
whose decoder applies the orientation) must give the same upright image; an animated PNG is refused
by all of them instead of each taking some frame."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from rcl_dist.cli import main
from rcl_dist.data.codec import decode_image_bytes, read_image
from rcl_dist.data.images import _to_chw_float, load_image
from rcl_dist.data.index import rejects_path
from rcl_dist.data.manifest import read_manifest

from hostile_inputs import noisy_rgb


def _tagged(path: Path, orientation: int, arr: np.ndarray) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_reader_turns_an_exif_oriented_png_upright(tmp_path, orientation):
    arr = noisy_rgb(20, 32, seed=orientation)  # not square: a swap of width and height shows
    f = _tagged(tmp_path / "o.png", orientation, arr)
    with Image.open(f) as im:
        upright = np.asarray(ImageOps.exif_transpose(im))  # Pillow's definition of upright
    assert np.array_equal(read_image(f), upright)
    np.testing.assert_array_equal(load_image(f), _to_chw_float(upright))
    out = tmp_path / "m.parquet"
    assert main(["data", "index", f"{tmp_path}:train", "--out", str(out)]) == 0
    (row,) = read_manifest(out).to_pylist()
    assert (row["height"], row["width"]) == upright.shape[:2]


def test_dali_decoder_agrees_on_orientation(tmp_path):
    """DALI's ``fn.decoders.image`` (adjust_orientation=True) on an EXIF-rotated JPEG: the same upright
    size as the manifest records (its crop plan uses those sizes)."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    arr = noisy_rgb(24, 40, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6
    f = tmp_path / "r.jpg"
    Image.fromarray(arr).save(f, exif=exif.tobytes(), quality=95)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        data, _ = fn.readers.file(files=[str(f)])
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    assert np.asarray(out.at(0)).shape[:2] == (40, 24)
    assert main(["data", "index", f"{tmp_path}:train", "--out", str(tmp_path / "m.parquet")]) == 0
    (row,) = read_manifest(tmp_path / "m.parquet").to_pylist()
    assert (row["height"], row["width"]) == (40, 24)


def _apng(path: Path) -> Path:
    frames = [Image.fromarray(noisy_rgb(16, 16, seed=s)) for s in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with Image.open(path) as im:
        assert im.n_frames == 3
    return path


def test_animated_png_refused_by_every_reader(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    f = _apng(folder / "anim.png")
    Image.fromarray(noisy_rgb(16, 16, seed=9)).save(folder / "still.png")
    with pytest.raises(ValueError, match="3 frames"):
        read_image(f)
    with pytest.raises(ValueError, match="3 frames"):
        decode_image_bytes(f.read_bytes())
    out = tmp_path / "m.parquet"
    assert main(["data", "index", f"{folder}:train", "--out", str(out)]) == 0
    assert [Path(p).name for p in read_manifest(out).column("path").to_pylist()] == ["still.png"]
    import pyarrow.parquet as pq

    reasons = pq.read_table(rejects_path(out)).to_pylist()
    assert any("anim.png" in r["path"] and "animated PNG (3 frames)" in r["reason"] for r in reasons), reasons
