"""Issue 16, defects 2 and 7 (`rcl-dist denoise` and the image reader every command and the server
share): image headers over the pixel budget, decompression bombs, special files named ``.png``.

The probes that, unfixed, allocate without bound or block forever run in a child process with an
address-space cap and a timeout, so a regression fails the test instead of taking the machine down."""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcl_dist.data.codec import decode_image_bytes, encode_png, read_image
from rcl_dist.denoise import OUTPUT_RECORD, denoise_paths

from hostile_inputs import lying_png, noisy_rgb, zero_png
from test_denoise import fine_tuned_checkpoint

REPO = Path(__file__).resolve().parents[2]
MEMORY_CAP = 4 << 30  # bytes of address space for a child process: torch's import fits, a 60 GB image does not


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_capped(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run(
        [sys.executable, *args], env=full_env, capture_output=True, text=True, timeout=timeout, preexec_fn=_capped
    )


READ_ONE = """
import sys, time
from rcl_dist.data.codec import read_image
t0 = time.monotonic()
try:
    read_image(sys.argv[1])
except ValueError as e:
    print(f"refused in {time.monotonic() - t0:.2f} s: {e}")
    sys.exit(3)
print("decoded")
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return fine_tuned_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _encoded(fmt: str, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "TIFF16":
        import tifffile

        tifffile.imwrite(buf, np.full((h, w, 3), 1000, np.uint16), photometric="rgb")
    else:
        Image.fromarray(noisy_rgb(h, w)).save(buf, format=fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- pixel budget


@pytest.mark.parametrize(
    "probe, data",
    [
        ("png16_header_100000x100000", lying_png(100000, 100000, depth=16, colour_type=2)),
        ("png16_grey_header_100000x100000", lying_png(100000, 100000, depth=16, colour_type=0)),
        ("png8_decompression_bomb_20000x20000", lying_png(20000, 20000, depth=8, colour_type=2)),
    ],
)
def test_lying_header_refused_before_decoding(tmp_path, probe, data):
    """Unfixed: the 16-bit reader allocated until MemoryError; Pillow raised DecompressionBombError, a
    type `denoise` did not catch. Now: a ValueError naming the file and the budget, in well under a second."""
    path = tmp_path / f"{probe}.png"
    path.write_bytes(data)
    r = run_capped(["-c", READ_ONE, str(path)], timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr[-3000:]
    assert "too large" in r.stdout and "pixel budget of 67108864" in r.stdout and path.name in r.stdout
    assert float(r.stdout.split("refused in ")[1].split(" s")[0]) < 2.0


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF16"])
def test_every_reader_honours_the_pixel_budget(fmt, monkeypatch):
    """One budget for every format: 48x40 = 1920 pixels against budgets of 1919 (refused, whatever the
    reader: 16-bit TIFF through tifffile, the others through Pillow) and 1920 (decoded)."""
    data = _encoded(fmt, 40, 48)
    with pytest.raises(ValueError, match=r"too large: 48x40 = 1920 pixels, over the pixel budget of 1919"):
        decode_image_bytes(data, max_pixels=1919)
    assert decode_image_bytes(data, max_pixels=1920).shape[:2] == (40, 48)
    monkeypatch.setenv("RCL_DIST_MAX_PIXELS", "1919")  # the same budget from the environment (server, CLI)
    with pytest.raises(ValueError, match="pixel budget of 1919"):
        decode_image_bytes(data)


def test_all_zero_png_over_budget_refused_from_its_header(monkeypatch):
    """A valid all-zero PNG is a few hundred bytes for any size (6000^2: 35 KB, 2.5 GB and 42 s in the
    server before the fix). Over the budget it is refused without inflating it."""
    data = zero_png(6000, 6000)
    assert len(data) < 100_000
    monkeypatch.setenv("RCL_DIST_MAX_PIXELS", "16e6")  # scientific notation is read too
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="6000x6000 = 36000000 pixels, over the pixel budget of 16000000"):
        decode_image_bytes(data)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5", "nan", "inf"])
def test_bad_pixel_budget_setting_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("RCL_DIST_MAX_PIXELS", value)
    with pytest.raises(ValueError, match=r"\$RCL_DIST_MAX_PIXELS must be a whole number of pixels >= 1"):
        decode_image_bytes(encode_png(noisy_rgb(4, 4)))


def test_decompression_bomb_at_file_3_of_12_rest_of_folder_done(ckpt, tmp_path, capsys):
    """Unfixed: DecompressionBombError aborted `denoise` at file 3 of 12, files 4-12 never done."""
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(12):
        (src / f"img{i:02d}.png").write_bytes(lying_png(20000, 20000) if i == 2 else encode_png(noisy_rgb(12, 10, i)))
    done, failed = denoise_paths(ckpt, [src], tmp_path / "out", tile=32, overlap=8, device="cpu")
    assert len(done) == 11 and [p.name for p, _ in failed] == ["img02.png"]
    assert "img02.png" in failed[0][1] and "20000x20000 = 400000000 pixels, over the pixel budget" in failed[0][1]
    assert "[3/12]" in capsys.readouterr().err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([OUTPUT_RECORD] + [f"img{i:02d}.png" for i in range(12) if i != 2])


def test_cli_max_pixels_option(ckpt, tmp_path):
    """`--max-pixels` on the command line: the 12x10 image is refused under 100, done under 120."""
    (tmp_path / "a.png").write_bytes(encode_png(noisy_rgb(10, 12)))
    r = run_capped(["-m", "rcl_dist.cli", "denoise", "--model", str(ckpt), "--tile", "32", "--overlap", "8",
                    "--max-pixels", "100", str(tmp_path / "a.png"), str(tmp_path / "o1")])  # fmt: skip
    assert r.returncode == 1 and "12x10 = 120 pixels, over the pixel budget of 100" in r.stdout + r.stderr
    r = run_capped(["-m", "rcl_dist.cli", "denoise", "--model", str(ckpt), "--tile", "32", "--overlap", "8",
                    "--max-pixels", "120", str(tmp_path / "a.png"), str(tmp_path / "o2")])  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_image(tmp_path / "o2" / "a.png").shape == (10, 12, 3)


# ----------------------------------------------------------------------------------------- special files


def _special(tmp_path: Path, probe: str) -> Path:
    path = tmp_path / f"{probe}.png"
    if probe == "symlink_to_dev_zero":
        path.symlink_to("/dev/zero")
    elif probe == "fifo_named_png":
        os.mkfifo(path)
    elif probe == "folder_named_png":
        path.mkdir()
    return path


SPECIAL = ["symlink_to_dev_zero", "fifo_named_png", "folder_named_png"]


@pytest.mark.parametrize("probe", SPECIAL)
def test_special_file_refused_before_reading(tmp_path, probe):
    """Unfixed: /dev/zero was read until MemoryError (6.7 s under a 3 GB cap); opening the FIFO blocked forever."""
    path = _special(tmp_path, probe)
    r = run_capped(["-c", READ_ONE, str(path)], timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr[-3000:]
    assert "not a regular file" in r.stdout and path.name in r.stdout


def test_special_files_in_a_folder_reported_rest_done(ckpt, tmp_path):
    """The whole command, as a user runs it, on a folder holding a good image and the three special files
    (explicitly named too): each refused with its reason, the good image written, exit status 1."""
    src = tmp_path / "photos"
    src.mkdir()
    (src / "good.png").write_bytes(encode_png(noisy_rgb(12, 10)))
    specials = [_special(src, probe) for probe in SPECIAL]
    (tmp_path / "named").mkdir()
    named = tmp_path / "named" / "other_fifo.png"
    os.mkfifo(named)
    r = run_capped(["-m", "rcl_dist.cli", "denoise", "--model", str(ckpt), "--tile", "32", "--overlap", "8",
                    str(src), str(named), str(tmp_path / "out")])  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "denoised 1 file(s)" in r.stdout and "4 failed" in r.stdout
    for kind, path in zip(("a character device", "a FIFO", "a folder", "a FIFO"), [*specials, named]):
        assert f"{path}: cannot read image: not a regular file ({kind})" in r.stdout
    assert read_image(tmp_path / "out" / "good.png").shape == (12, 10, 3)
