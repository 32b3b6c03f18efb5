"""rcl-dist denoise (rcl_dist.denoise): bit depth kept (8 -> 8, 16 -> 16, PNG and TIFF), odd sizes, tiled
equals untiled on a large image, unreadable files reported while the rest is done, inputs never
overwritten; the 16-bit PNG codec (all filter types, Adam7)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcl_dist.config import Config
from rcl_dist.data.codec import decode_image_bytes, encode_png, from_float, read_image, to_float, write_image
from rcl_dist.denoise import OUTPUT_RECORD, denoise_paths, main_denoise
from rcl_dist.infer import restore_array
from rcl_dist.models.io import load_checkpoint, save_checkpoint
from rcl_dist.models.factory import build_model_from_config


def fine_tuned_checkpoint(folder: Path, seed: int = 0, pretrain: str = "none", **model) -> Path:
    """A tiny U-Net saved the way `rcl-dist finetune` saves a denoiser (fresh rgb head, task info)."""
    cfg = Config.from_dict({"model": {"name": "unet", "width": 4, "depth": 2, **model}})
    torch.manual_seed(seed)
    net = build_model_from_config(cfg)
    out_ch = cfg.model.in_channels
    net.replace_head(net.new_head("rgb", out_ch))
    return save_checkpoint(
        folder, net, cfg, head={"kind": "rgb", "out_channels": out_ch}, task="denoise", mode="proxy", labels=8,
        steps=5, crop=32, seed=seed, pretrain_checkpoint=pretrain, head_fresh=True, final_loss=0.1, label_l1=0.1,
    )  # fmt: skip


def smooth(h: int, w: int, c: int, dtype, seed: int = 0) -> np.ndarray:
    """A smooth image with mild noise, in the full range of ``dtype``."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0.1, 0.9, size=(1, c, 4, 5)).astype(np.float32))
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0]
    img = img.permute(1, 2, 0).numpy() + rng.normal(0, 0.03, size=(h, w, c)).astype(np.float32)
    return from_float(img, dtype)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return fine_tuned_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def net(ckpt):
    return load_checkpoint(ckpt)[0].eval()


def expected(net, img: np.ndarray, tile: int = 256, overlap: int = 32) -> np.ndarray:
    """The reference output: the model on the CPU, tiled as the command tiles. The commands run on cuda
    when there is one, so tests that compare bit for bit pass device="cpu" (GPU: see test_cli_on_device)."""
    return from_float(restore_array(net, to_float(img), tile=tile, overlap=overlap), img.dtype)


# ----------------------------------------------------------------------------------------- the codec


def _adam7_png16(a: np.ndarray) -> bytes:
    """An interlaced (Adam7) 16-bit PNG, every row unfiltered: what the decoder must also take."""
    h, w, c = a.shape
    passes = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)]
    raw = b""
    for y0, x0, dy, dx in passes:
        sub = a[y0::dy, x0::dx]
        if sub.size == 0:
            continue
        rows = np.ascontiguousarray(sub.astype(">u2")).view(np.uint8).reshape(sub.shape[0], -1)
        raw += np.concatenate([np.zeros((rows.shape[0], 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 1))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png16_roundtrip_every_filter_and_interlace(channels):
    rng = np.random.default_rng(channels)
    a = rng.integers(0, 65536, size=(11, 13, channels), dtype=np.uint16)
    for f in range(5):
        b = decode_image_bytes(encode_png(a, filter_type=f))
        assert b.dtype == np.uint16 and np.array_equal(a, b), f"filter {f}"
    b = decode_image_bytes(_adam7_png16(a))
    assert b.dtype == np.uint16 and np.array_equal(a, b)
    # low bytes matter: Pillow alone keeps only the high byte of 16-bit RGB
    a8 = rng.integers(0, 256, size=(11, 13, channels), dtype=np.uint8)
    assert np.array_equal(decode_image_bytes(encode_png(a8)), a8)


def test_decode_rejects_garbage_with_a_clear_error():
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image_bytes(b"this is not an image")
    good = encode_png(np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(ValueError):
        decode_image_bytes(good[:40])  # truncated 16-bit PNG


# ----------------------------------------------------------------------------------------- the command


def test_png_8_and_16_bit_odd_sizes_keep_bit_depth(ckpt, net, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    img8, img16 = smooth(37, 45, 3, np.uint8, 1), smooth(33, 51, 3, np.uint16, 2)
    grey16, rgba8 = smooth(29, 31, 1, np.uint16, 3), smooth(23, 27, 4, np.uint8, 4)
    (src / "a8.png").write_bytes(encode_png(img8))
    (src / "b16.png").write_bytes(encode_png(img16))
    (src / "c_grey16.png").write_bytes(encode_png(grey16))
    (src / "d_rgba8.png").write_bytes(encode_png(rgba8))
    out = tmp_path / "out"
    assert main_denoise(str(ckpt.parent), [str(src)], str(out), tile=256, overlap=32, device="cpu") == 0
    assert "denoised 4 file(s)" in capsys.readouterr().out

    r8, r16 = read_image(out / "a8.png"), read_image(out / "b16.png")
    assert r8.dtype == np.uint8 and r8.shape == (37, 45, 3)
    assert r16.dtype == np.uint16 and r16.shape == (33, 51, 3)
    assert np.array_equal(r8, expected(net, img8)) and np.array_equal(r16, expected(net, img16))
    assert len(np.unique(r16 & 0xFF)) > 16  # really 16 bits, not an 8-bit image scaled up
    g = read_image(out / "c_grey16.png")
    assert g.dtype == np.uint16 and g.shape == (29, 31, 1) and np.array_equal(g, expected(net, grey16))
    a = read_image(out / "d_rgba8.png")
    assert a.shape == (23, 27, 4) and np.array_equal(a[..., 3], rgba8[..., 3])  # alpha passed through
    assert np.array_equal(a, expected(net, rgba8))
    assert not np.array_equal(a[..., :3], rgba8[..., :3])  # the colour was restored


def test_tiff_16_stays_tiff_and_jpeg_becomes_png(ckpt, net, tmp_path):
    import tifffile

    img16 = smooth(35, 41, 3, np.uint16, 5)
    tifffile.imwrite(tmp_path / "t.tif", img16, photometric="rgb")
    jpg = smooth(30, 34, 3, np.uint8, 6)
    Image.fromarray(jpg).save(tmp_path / "j.jpg", quality=95)
    done, failed = denoise_paths(ckpt, [tmp_path / "t.tif", tmp_path / "j.jpg"], tmp_path / "out", progress=False, device="cpu")
    assert failed == [] and [d.name for _, d in done] == ["t.tif", "j.png"]
    t = tifffile.imread(tmp_path / "out" / "t.tif")
    assert t.dtype == np.uint16 and np.array_equal(t, expected(net, img16))
    j = read_image(tmp_path / "out" / "j.png")
    assert j.dtype == np.uint8 and j.shape == (30, 34, 3)


def test_large_image_tiled_matches_untiled(ckpt, tmp_path):
    """600x520 with tile 128 against one piece: within infer.py's stated tiling accuracy
    (max |tiled - untiled| < 1e-3, PSNR > 80 dB, measured on the CPU), plus one 16-bit quantisation step."""
    img = smooth(520, 600, 3, np.uint16, 7)
    (tmp_path / "big.png").write_bytes(encode_png(img))
    done_t, _ = denoise_paths(ckpt, [tmp_path / "big.png"], tmp_path / "tiled", tile=128, overlap=32, progress=False, device="cpu")
    done_u, _ = denoise_paths(ckpt, [tmp_path / "big.png"], tmp_path / "whole", tile=1024, overlap=32, progress=False, device="cpu")
    t = to_float(read_image(done_t[0][1])).astype(np.float64)
    u = to_float(read_image(done_u[0][1])).astype(np.float64)
    assert t.shape == u.shape == (520, 600, 3)
    diff = np.abs(t - u)
    assert diff.max() < 1e-3 + 1 / 65535
    assert 10 * np.log10(1.0 / max(np.mean(diff**2), 1e-20)) > 80


def test_unreadable_file_reported_and_rest_done(ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        (src / f"ok{i}.png").write_bytes(encode_png(smooth(21, 19, 3, np.uint8, i)))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    rc = main_denoise(str(ckpt), [str(src), str(tmp_path / "missing.png")], str(tmp_path / "out"))
    assert rc == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "cannot read" in captured.err
    assert "missing.png" in captured.err and "no such file" in captured.err
    assert "2 failed" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OUTPUT_RECORD, "ok0.png", "ok1.png"]
    done, failed = denoise_paths(ckpt, [src], tmp_path / "out2", progress=False)
    assert len(done) == 2 and [(p.name, "cannot read" in r) for p, r in failed] == [("broken.png", True)]


def test_refuses_to_overwrite_inputs(ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img = smooth(17, 23, 3, np.uint8)
    (src / "a.png").write_bytes(encode_png(img))
    (src / "b.png").write_bytes(encode_png(img))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(ValueError, match="refusing to overwrite input file .*a.png"):
        denoise_paths(ckpt, [src], src)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        denoise_paths(ckpt, [src / "b.png"], src / "b.png")  # one file onto itself
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        denoise_paths(ckpt, [src / "a.png"], link)  # the same folder under another name
    with pytest.raises(ValueError, match="refusing to overwrite"):
        main_denoise(str(ckpt), [str(src / "a.png"), str(src / "b.png")], str(src))
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    # two inputs with one output name are refused too
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.png").write_bytes(encode_png(img))
    with pytest.raises(ValueError, match="would both be written"):
        denoise_paths(ckpt, [src / "a.png", other / "a.png"], tmp_path / "out")
    # a single file to a named output file is fine
    done, failed = denoise_paths(ckpt, [src / "a.png"], tmp_path / "clean.png", progress=False)
    assert failed == [] and done[0][1] == tmp_path / "clean.png" and read_image(tmp_path / "clean.png").shape == (17, 23, 3)


def test_bad_model_and_options_fail_before_any_work(ckpt, tmp_path):
    (tmp_path / "a.png").write_bytes(encode_png(smooth(9, 9, 3, np.uint8)))
    with pytest.raises(FileNotFoundError, match="no_such_ckpt"):
        denoise_paths(tmp_path / "no_such_ckpt", [tmp_path / "a.png"], tmp_path / "out")
    with pytest.raises(ValueError, match="overlap"):
        denoise_paths(ckpt, [tmp_path / "a.png"], tmp_path / "out", tile=64, overlap=64)
    assert not (tmp_path / "out").exists()


def test_grey_model_on_rgb_and_16_bit_bmp_refused(tmp_path):
    grey_ckpt = fine_tuned_checkpoint(tmp_path / "grey", in_channels=1)
    net = load_checkpoint(grey_ckpt)[0].eval()
    img = smooth(19, 21, 3, np.uint8, 3)
    y = restore_array(net, to_float(img), tile=64, overlap=16)
    per_channel = [restore_array(net, to_float(img[..., k : k + 1]), tile=64, overlap=16)[..., 0] for k in range(3)]
    assert y.shape == (19, 21, 3) and np.allclose(y, np.stack(per_channel, axis=-1), atol=1e-6)
    with pytest.raises(ValueError, match="8-bit"):
        write_image(tmp_path / "x.bmp", np.zeros((4, 4, 3), np.uint16))


def test_cli_on_device(ckpt, net, device, tmp_path):
    """The command on each device (cpu, and cuda where present) against the CPU reference: bit depth and
    size kept; values equal on the CPU, within TF32 convolution rounding on a GPU."""
    imgs = {"o8.png": smooth(37, 45, 3, np.uint8, 1), "o16.png": smooth(33, 51, 3, np.uint16, 2),
            "big16.png": smooth(260, 300, 3, np.uint16, 3)}  # fmt: skip
    for name, img in imgs.items():
        (tmp_path / name).write_bytes(encode_png(img))
    done, failed = denoise_paths(ckpt, [tmp_path / n for n in imgs], tmp_path / "out", tile=128, overlap=32,
                                 progress=False, device=str(device))  # fmt: skip
    assert failed == [] and len(done) == 3
    for name, img in imgs.items():
        got = read_image(tmp_path / "out" / name)
        assert got.dtype == img.dtype and got.shape == img.shape
        want = expected(net, img, tile=128, overlap=32)
        diff = np.abs(to_float(got).astype(np.float64) - to_float(want))
        print(f"{device} {name}: max |{device} - cpu| = {diff.max():.3g}, mean {diff.mean():.3g}")
        if device.type == "cpu":
            assert np.array_equal(got, want)
        else:
            assert diff.max() < 1e-2 and diff.mean() < 1e-3  # TF32 convolutions (cuDNN's default on Ampere+)
