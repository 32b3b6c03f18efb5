"""PSNR/SSIM function and image sources."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from rcl_dist.data.images import bundled_images, load_image, tile
from rcl_dist.metrics import image_metrics


def test_psnr_closed_form():
    clean = torch.full((3, 16, 16), 0.5)
    noisy = clean + 0.1  # MSE 0.01 -> PSNR 20 dB
    assert image_metrics(noisy, clean)["psnr"] == pytest.approx(20.0)
    assert image_metrics(clean, clean)["ssim"] == pytest.approx(1.0)


def test_matches_skimage_and_batches(rng):
    clean = torch.rand(2, 3, 20, 24, generator=rng)
    noisy = (clean + 0.05 * torch.randn(2, 3, 20, 24, generator=rng)).clamp(0, 1)
    got = image_metrics(noisy, clean)
    ref_p = np.mean([peak_signal_noise_ratio(c.numpy(), n.numpy(), data_range=1.0) for c, n in zip(clean, noisy)])
    ref_s = np.mean(
        [structural_similarity(c.numpy(), n.numpy(), data_range=1.0, channel_axis=0) for c, n in zip(clean, noisy)]
    )
    assert got["psnr"] == pytest.approx(ref_p, rel=1e-6) and got["ssim"] == pytest.approx(ref_s, rel=1e-6)
    # numpy, [H, W] and a different data range work the same
    assert image_metrics(noisy[0, 0].numpy() * 255, clean[0, 0].numpy() * 255, data_range=255)["psnr"] == pytest.approx(
        image_metrics(noisy[0, 0], clean[0, 0])["psnr"], rel=1e-6
    )


def test_prediction_clipped_and_shape_checked():
    clean = torch.ones(1, 8, 8)
    assert math.isinf(image_metrics(clean + 0.5, clean)["psnr"])  # clipped to 1.0 == clean
    with pytest.raises(ValueError, match="differ in shape"):
        image_metrics(torch.zeros(1, 8, 8), torch.zeros(1, 8, 9))


def test_bundled_images_and_tiles():
    rgb = bundled_images()
    assert len(rgb) >= 5 and all(im.shape[0] == 3 and im.dtype == np.float32 for im in rgb)
    assert all(0.0 <= im.min() and im.max() <= 1.0 for im in rgb)
    gray = bundled_images(gray=True)
    assert all(im.shape[0] == 1 for im in gray)
    tiles = tile(rgb[:1], 128)
    assert len(tiles) == (512 // 128) ** 2 and tiles[0].shape == (3, 128, 128)


def test_load_image_bit_depths_and_errors(tmp_path):
    from skimage import io

    img16 = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 20).astype(np.uint16)
    io.imsave(tmp_path / "a.png", img16, check_contrast=False)
    got = load_image(tmp_path / "a.png")
    assert got.shape == (1, 64, 48) and got.max() == pytest.approx(img16.max() / 65535)
    assert load_image(tmp_path / "a.png", gray=False).shape == (3, 64, 48)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png")
