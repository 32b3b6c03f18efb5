"""Classical baselines (rcl_dist.classical): noise estimated from the image, each method beats its noisy
input, and they run through the same evaluation as the trained networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data, img_as_float

from rcl_dist.classical import ClassicalDenoiser, classical_denoise, estimate_noise_sigma, parse_classical
from rcl_dist.evaluate import evaluate_folder, main_evaluate
from rcl_dist.metrics import image_metrics


def _noisy(sigma: float = 0.05, seed: int = 0):
    clean = img_as_float(data.astronaut()[100:196, 100:196]).astype(np.float32)  # [96, 96, 3]
    noisy = clean + sigma * np.random.default_rng(seed).standard_normal(clean.shape).astype(np.float32)
    return clean, noisy


def test_noise_level_is_estimated_from_the_image():
    flat = np.full((128, 128, 3), 0.5) + 0.05 * np.random.default_rng(0).standard_normal((128, 128, 3))
    assert estimate_noise_sigma(flat) == pytest.approx(0.05, rel=0.05)
    assert estimate_noise_sigma(np.full((64, 64, 3), 0.3)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["nlm", "wavelet", "bm3d"])
def test_each_method_beats_its_noisy_input(method):
    if method == "bm3d":
        pytest.importorskip("bm3d", reason="bm3d (non-commercial licence) is an optional extra: pip install -e '.[bm3d]'")
    clean, noisy = _noisy()
    out = classical_denoise(method, noisy)
    assert out.shape == noisy.shape and out.dtype == np.float32
    chw = lambda a: torch.from_numpy(a.transpose(2, 0, 1).copy())  # noqa: E731
    gain = image_metrics(chw(np.clip(out, 0, 1)), chw(clean))["psnr"] - image_metrics(chw(np.clip(noisy, 0, 1)), chw(clean))["psnr"]
    assert gain > 2.0, gain  # measured: nlm ~+6, wavelet ~+4, bm3d ~+8 dB at sigma 0.05
    assert np.array_equal(classical_denoise(method, clean * 0 + 0.3), np.full_like(clean, 0.3))  # nothing to remove


def test_denoiser_module_runs_through_the_evaluation_and_the_cli(tmp_path, capsys):
    clean, _ = _noisy()
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(2):
        Image.fromarray((np.roll(clean, 7 * i, axis=1) * 255).round().astype(np.uint8)).save(folder / f"im{i}.png")
    net = parse_classical("classical:nlm")
    assert isinstance(net, ClassicalDenoiser) and parse_classical("runs/x/state.pt") is None
    rows = evaluate_folder(net, folder, "denoise", sigma=25.0, tile=1 << 16, progress=None).to_pylist()
    assert len(rows) == 2 and all(r["psnr"] > r["psnr_input"] + 2 for r in rows)
    assert main_evaluate("classical:wavelet", str(folder), "denoise", out=str(tmp_path / "res"), sigma=25.0) == 0
    assert (tmp_path / "res.md").is_file() and "psnr" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown classical denoiser"):
        parse_classical("classical:tv")
    with pytest.raises(ValueError, match="sigma"):
        ClassicalDenoiser("nlm", sigma=float("nan"))
