"""Whole-image evaluation (rcl_dist.evaluate): tiled inference, fixed test inputs, folder evaluation,
summaries and result files, checkpoint/CLI entry point. Tiny random U-Nets and small generated images;
a 2-image subset of shared/data/test/Kodak24 when that folder exists."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rcl_dist.config import Config
from rcl_dist.data.spec import derived_seed, fixed_noisy_image
from rcl_dist.evaluate import (
    RESULT_COLUMNS,
    baseline_prediction,
    evaluate_checkpoint,
    evaluate_folder,
    main_evaluate,
    make_test_pair,
    skipped_files,
    summarise,
    write_results,
)
from rcl_dist.infer import tiled_restore
from rcl_dist.models import build_model
from rcl_dist.models.io import save_checkpoint
from rcl_dist.models.factory import build_model_from_config

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "test" / "Kodak24"

# The tolerance stated in tiled_restore's docstring (measured worst case over 20 random U-Nets:
# max abs 1.6e-4, PSNR 93 dB at tile=64, overlap=16).
TILED_MAX_ABS = 1e-3
TILED_MIN_PSNR = 80.0


def _unet(head: str = "rgb", in_channels: int = 3, raw: str | None = None, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    out = 3 if raw or in_channels == 3 else in_channels
    return build_model("unet", in_channels=in_channels, out_channels=out, width=4, depth=2, head=head, raw=raw, **kw)


def _identity(in_channels: int = 3) -> torch.nn.Module:
    """A real U-Net whose restore(x) is exactly x: global residual, head weights and bias zero."""
    m = _unet(in_channels=in_channels, global_residual=True)
    with torch.no_grad():
        m.head.conv.weight.zero_()
        m.head.conv.bias.zero_()
    return m


def _smooth_image(rng: np.random.Generator, h: int, w: int, c: int = 3, lo: float = 0.25, hi: float = 0.75) -> np.ndarray:
    """uint8 HxWxC image with values in [lo, hi] (no clipping of sigma=25 noise in practice)."""
    base = rng.random((h // 8 + 2, w // 8 + 2, c))
    small = Image.fromarray((base * 255).astype(np.uint8))
    img = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float64) / 255
    img = img.reshape(h, w, c)
    return np.round((lo + (hi - lo) * img) * 255).astype(np.uint8)


def _write(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr.squeeze()).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 64), (65, 47), (64, 72)]):
        _write(d / f"img{i}.png", _smooth_image(rng, h, w))
    return d


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------ tiled_restore
@pytest.mark.parametrize(
    "head,in_channels,raw,shape,scale",
    [
        ("rgb", 3, None, (150, 97), 1),
        ("sr2", 3, None, (150, 97), 2),
        ("sr2+bicubic", 3, None, (150, 97), 2),  # the skip's interpolation runs per tile: seams stay in tolerance
        ("raw2rgb", 4, "packed", (150, 97), 2),  # a packed RAW input of 150x97 -> RGB 300x194
        ("rgb", 1, "mosaic", (150, 98), 1),
        ("rgb", 1, None, (97, 150), 1),
    ],
)
def test_tiled_equals_untiled_within_stated_tolerance(head, in_channels, raw, shape, scale):
    head, _, skip = head.partition("+")
    model = _unet(head, in_channels, raw, seed=3)
    if skip:
        model.replace_head(model.new_head(head, 3, skip=skip))
    model.train()
    x = torch.rand(1, in_channels, *shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model.eval().restore(x)
    model.train()
    tiled = tiled_restore(model, x, tile=64, overlap=16, scale=scale)
    assert model.training  # mode restored
    assert tiled.shape == full.shape == (1, 3 if raw or in_channels == 3 else 1, scale * shape[0], scale * shape[1])
    diff = (tiled - full).abs().max().item()
    assert diff < TILED_MAX_ABS, diff
    assert _psnr(tiled, full) > TILED_MIN_PSNR
    assert diff > 0  # several tiles really were used (not one piece)


def test_tiled_one_piece_for_small_images_and_identity_exact():
    model = _unet()
    x = torch.rand(2, 3, 50, 33, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tiled_restore(model, x, tile=64, overlap=16), model.restore(x))
    ident = _identity()
    y = torch.rand(1, 3, 131, 77, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(tiled_restore(ident, y, tile=32, overlap=8), y, atol=1e-6, rtol=0)


def test_tiled_wrong_scale_and_bad_arguments():
    x = torch.rand(1, 3, 80, 80)
    with pytest.raises(ValueError, match="scale"):
        tiled_restore(_unet("sr2"), x, tile=64, overlap=16, scale=1)
    assert tiled_restore(_unet("sr2"), x, tile=64, overlap=16, scale=None).shape == (1, 3, 160, 160)
    with pytest.raises(ValueError, match="overlap"):
        tiled_restore(_unet(), x, tile=16, overlap=16)
    with pytest.raises(ValueError, match="B, C, H, W"):
        tiled_restore(_unet(), x[0])


# ------------------------------------------------------------------------------------------ test inputs
def test_test_pairs_fixed_per_image_id():
    clean = np.random.default_rng(0).random((3, 33, 41)).astype(np.float32)
    cases = [("denoise", {}), ("gaussian", {"sigma": 25.0}), ("jdensr", {}), ("jdd", {}), ("jdd", {"raw": "mosaic"})]
    for task, kw in cases:
        a1, t1 = make_test_pair(clean, task, image_id="abc", **kw)
        a2, t2 = make_test_pair(clean, task, image_id="abc", **kw)
        b, _ = make_test_pair(clean, task, image_id="abd", **kw)
        c, _ = make_test_pair(clean, task, image_id="abc", seed=1, **kw)
        assert torch.equal(a1, a2) and torch.equal(t1, t2), task
        assert not torch.equal(a1, b) and not torch.equal(a1, c), task
    # denoise: Eq. 8 with the documented seeds
    x, t = make_test_pair(clean, "denoise", image_id="abc")
    g = torch.Generator().manual_seed(derived_seed(0, "abc", "eval-nlf"))
    from rcl_dist.noise import sample_nlf

    p = sample_nlf("uniform", 1, generator=g, sigma_min=0.0, sigma_max=20 / 255)
    expected = fixed_noisy_image(clean, float(p.shot[0]), float(p.read[0]), derived_seed(0, "abc", "eval-noise"))
    assert np.array_equal(x.numpy(), expected) and np.array_equal(t.numpy(), clean)


def test_test_pair_shapes_and_noise_level():
    clean = np.full((3, 65, 47), 0.5, np.float32)
    lr, hr = make_test_pair(clean, "sr", image_id="i")
    assert lr.shape == (3, 32, 23) and hr.shape == (3, 64, 46)
    assert torch.allclose(lr, torch.full_like(lr, 0.5), atol=1e-5)  # bicubic of a constant
    x, hr = make_test_pair(clean, "jdensr", image_id="i")
    assert x.shape == (3, 32, 23) and hr.shape == (3, 64, 46)
    x, rgb = make_test_pair(clean, "jdd", image_id="i")
    assert x.shape == (4, 32, 23) and rgb.shape == (3, 64, 46)
    x, rgb = make_test_pair(clean, "jdd", image_id="i", raw="mosaic")
    assert x.shape == (1, 64, 46)
    big = np.full((1, 256, 256), 0.5, np.float32)
    x, _ = make_test_pair(big, "gaussian", image_id="i", sigma=25)
    assert abs(float((x - 0.5).std()) - 25 / 255) < 0.02 * 25 / 255
    noisy = clean + 0.01
    assert torch.equal(make_test_pair(clean, "real", image_id="i", noisy=noisy)[0], torch.from_numpy(noisy))
    with pytest.raises(ValueError, match="sigma"):
        make_test_pair(clean, "gaussian", image_id="i")
    with pytest.raises(ValueError, match="sigma"):
        make_test_pair(clean, "sr", image_id="i", sigma=25)
    with pytest.raises(ValueError, match="task"):
        make_test_pair(clean, "pretrain", image_id="i")


def test_baselines():
    clean = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    lr, hr = make_test_pair(clean.numpy(), "sr", image_id="i")
    assert baseline_prediction(lr, hr, "sr").shape == hr.shape
    raw, rgb = make_test_pair(clean.numpy(), "jdd", image_id="i", sigma=0.0)
    from rcl_dist.noise import demosaic_bilinear, mosaic

    torch.testing.assert_close(baseline_prediction(raw, rgb, "jdd"), demosaic_bilinear(mosaic(rgb[None]))[0])


# ------------------------------------------------------------------------------------------ evaluate_folder
def test_identity_model_psnr_equals_input_psnr_and_sigma25_closed_form(folder):
    table = evaluate_folder(_identity(), folder, "gaussian", sigma=25, tile=32, overlap=8, progress=None)
    assert table.column_names == list(RESULT_COLUMNS)
    rows = table.to_pylist()
    assert [r["image"] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    closed_form = 20 * math.log10(255 / 25)  # 20.17 dB
    for r in rows:
        assert r["psnr"] == pytest.approx(r["psnr_input"], abs=1e-4)
        assert r["ssim"] == pytest.approx(r["ssim_input"], abs=1e-5)
        assert abs(r["psnr_input"] - closed_form) < 0.3, r
        assert r["task"] == "gaussian" and r["dataset"] == "tiny" and r["sigma"] == 25.0
        assert r["shot"] == 0.0 and r["read"] == pytest.approx((25 / 255) ** 2)
    assert (rows[1]["height"], rows[1]["width"]) == (65, 47)
    # "denoise" with a sigma is the gaussian task
    same = evaluate_folder(_identity(), folder, "denoise", sigma=25, progress=None).to_pylist()
    assert [r["psnr_input"] for r in same] == [r["psnr_input"] for r in rows]


def test_same_inputs_across_calls_and_names(folder, tmp_path):
    model = _unet(seed=5)
    a = evaluate_folder(model, folder, "denoise", progress=None).to_pylist()
    b = evaluate_folder(model, folder, "denoise", progress=None).to_pylist()
    assert a == b
    assert len({r["psnr_input"] for r in a}) == 3  # each image its own noise
    for r in a:
        assert 0 <= r["shot"] <= (20 / 255) ** 2 / 2 and 0 <= r["read"] <= (20 / 255) ** 2 / 2
    # the noise belongs to the image content, not the file name or folder
    other = tmp_path / "renamed"
    other.mkdir()
    shutil.copy(folder / "img1.png", other / "zzz.png")
    (c,) = evaluate_folder(model, other, "denoise", progress=None).to_pylist()
    assert (c["psnr_input"], c["psnr"], c["shot"]) == (a[1]["psnr_input"], a[1]["psnr"], a[1]["shot"])
    seed1 = evaluate_folder(model, folder, "denoise", seed=1, progress=None).to_pylist()
    assert seed1[0]["psnr_input"] != a[0]["psnr_input"]
    assert len(evaluate_folder(model, folder, "denoise", limit=2, progress=None)) == 2


def test_unreadable_file_skipped_and_rest_evaluated(folder):
    (folder / "broken.png").write_bytes(b"not a png at all")
    lines: list[str] = []
    with pytest.warns(UserWarning, match="broken.png"):
        table = evaluate_folder(_unet(), folder, "denoise", progress=lines.append)
    assert len(table) == 3 and "broken.png" not in table.column("image").to_pylist()
    (skip,) = skipped_files(table)
    assert skip["path"].endswith("broken.png") and "cannot read" in skip["reason"]
    assert summarise(table)["skipped"] == 1
    assert any("broken.png" in line for line in lines)


def test_sr_jdensr_jdd_gray_tasks(folder):
    sr = evaluate_folder(_unet("sr2"), folder, "sr", tile=32, overlap=8, progress=None).to_pylist()
    assert (sr[1]["height"], sr[1]["width"]) == (64, 46)  # 65x47 cropped to even
    assert all(r["psnr_input"] > 30 for r in sr)  # bicubic of a smooth image
    assert sr[0]["shot"] is None and sr[0]["sigma"] is None
    jdensr = evaluate_folder(_unet("sr2"), folder, "jdensr", sigma=15, progress=None).to_pylist()
    assert all(r["psnr_input"] < sr_r["psnr_input"] for r, sr_r in zip(jdensr, sr))
    jdd = evaluate_folder(_unet("raw2rgb", 4, "packed"), folder, "jdd", tile=32, overlap=8, progress=None).to_pylist()
    assert len(jdd) == 3 and all(math.isfinite(r["psnr"]) for r in jdd)
    mosaic_rows = evaluate_folder(_unet("rgb", 1, "mosaic"), folder, "jdd", progress=None).to_pylist()
    assert [r["psnr_input"] for r in mosaic_rows] == pytest.approx([r["psnr_input"] for r in jdd], abs=1e-9)
    gray = evaluate_folder(_identity(1), folder, "gaussian", sigma=25, progress=None).to_pylist()
    assert all(r["psnr"] == pytest.approx(r["psnr_input"], abs=1e-6) for r in gray)
    with pytest.raises(ValueError, match="SR"):
        evaluate_folder(_unet(), folder, "sr", progress=None)
    with pytest.raises(ValueError, match="same-size"):
        evaluate_folder(_unet("sr2"), folder, "denoise", progress=None)
    with pytest.raises(ValueError, match="RAW"):
        evaluate_folder(_unet(), folder, "jdd", progress=None)


def test_real_pairs(tmp_path):
    d = tmp_path / "realset"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        mean = _smooth_image(rng, 40, 52)
        real = np.clip(mean.astype(int) + rng.integers(-12, 13, mean.shape), 0, 255).astype(np.uint8)
        _write(d / f"{name}_real.png", real)
        _write(d / f"{name}_mean.png", mean)
    _write(d / "c_real.png", _smooth_image(rng, 40, 52))  # no partner
    with pytest.warns(UserWarning, match="c_mean.png"):
        table = evaluate_folder(_identity(), d, "real", progress=None)
    rows = table.to_pylist()
    assert [r["image"] for r in rows] == ["a_real.png", "b_real.png"]
    for r in rows:
        assert r["psnr"] == pytest.approx(r["psnr_input"], abs=1e-6) and r["shot"] is None
    assert summarise(table)["skipped"] == 1
    with pytest.raises(ValueError, match="sigma"):
        evaluate_folder(_identity(), d, "real", sigma=25, progress=None)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        evaluate_folder(_unet(), tmp_path / "nowhere", "denoise", progress=None)
    with pytest.raises(ValueError, match="no images"):
        evaluate_folder(_unet(), tmp_path, "denoise", progress=None)


# ------------------------------------------------------------------------------------------ results
def test_summarise_and_write_results(folder, tmp_path):
    table = evaluate_folder(_unet(), folder, "denoise", progress=None)
    s = summarise(table)
    psnr = np.array(table.column("psnr").to_pylist())
    assert s["n"] == 3 and s["task"] == "denoise" and s["dataset"] == "tiny" and s["skipped"] == 0
    assert s["psnr_mean"] == pytest.approx(psnr.mean()) and s["psnr_std"] == pytest.approx(psnr.std())
    assert s["ssim_mean"] == pytest.approx(np.mean(table.column("ssim").to_pylist()))
    for k in ("psnr_input_mean", "ssim_input_mean"):
        assert math.isfinite(s[k])

    rows = table.to_pylist()
    paths = write_results(rows, tmp_path / "out" / "res")
    assert {p.name for p in paths.values()} == {"res.parquet", "res.json", "res.md"}
    back = pq.read_table(paths["parquet"])
    assert back.column_names == list(RESULT_COLUMNS) and back.to_pylist() == rows
    js = json.loads(paths["json"].read_text())
    assert isinstance(js, list) and len(js) == 3 and list(js[0]) == list(RESULT_COLUMNS)
    md = paths["md"].read_text().splitlines()
    assert md[0] == "| " + " | ".join(RESULT_COLUMNS) + " |" and len(md) == 2 + 3
    assert f"{rows[0]['psnr']:.2f}" in md[2]
    # non-finite values (an exact restoration has infinite PSNR) stay valid JSON
    paths = write_results([{"psnr": math.inf, "image": "x"}], tmp_path / "inf")
    assert json.loads(paths["json"].read_text()) == [{"psnr": None, "image": "x"}]


def test_checkpoint_and_main_evaluate(folder, tmp_path, capsys):
    cfg = Config.from_dict({"model": {"width": 4, "depth": 2}})
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, cfg)
    table = evaluate_checkpoint(ckpt.parent, folder, "gaussian", sigma=25, progress=None)
    direct = evaluate_folder(model, folder, "gaussian", sigma=25, progress=None)
    assert table.to_pylist() == direct.to_pylist()

    out = tmp_path / "results" / "tiny_g25"
    rc = main_evaluate(str(ckpt.parent), str(folder), "denoise", str(out), 0, 2, 25.0)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| image | task | dataset | psnr |" in printed and "psnr_mean" in printed
    for suffix in (".parquet", ".json", ".md", "_summary.parquet", "_summary.json", "_summary.md"):
        assert (out.parent / (out.name + suffix)).is_file(), suffix
    assert len(json.loads((out.parent / "tiny_g25.json").read_text())) == 2
    (summary,) = json.loads((out.parent / "tiny_g25_summary.json").read_text())
    assert summary["task"] == "gaussian" and summary["n"] == 2

    with pytest.raises(FileNotFoundError, match="no_such_ckpt"):
        main_evaluate(str(tmp_path / "no_such_ckpt"), str(folder), "denoise", None, 0, None, None)
    with pytest.raises(FileNotFoundError, match="no_such_data"):
        main_evaluate(str(ckpt.parent), str(tmp_path / "no_such_data"), "denoise", None, 0, None, None)
    with pytest.raises(ValueError, match="task"):
        main_evaluate(str(ckpt.parent), str(folder), "nope", None, 0, None, None)


# ------------------------------------------------------------------------------------------ real images
@pytest.mark.skipif(not KODAK.is_dir(), reason=f"{KODAK} not present (shared data sets are optional)")
def test_kodak_subset(tmp_path):
    d = tmp_path / "Kodak24"
    d.mkdir()
    for name in sorted(p.name for p in KODAK.glob("*.png"))[:2]:
        shutil.copy(KODAK / name, d / name)
    rows = evaluate_folder(_identity(), d, "gaussian", sigma=25, progress=None).to_pylist()
    assert len(rows) == 2
    for r in rows:
        assert r["dataset"] == "Kodak24" and (r["height"], r["width"]) == (500, 500)
        assert r["psnr"] == pytest.approx(r["psnr_input"], abs=1e-4)
        assert 20.0 < r["psnr_input"] < 21.0  # 20.17 dB closed form; clipping at 0/1 can only raise it
    # a random U-Net, tiled (tile 256, overlap 32, 4 tiles) versus in one piece, on a real photograph
    model = _unet(seed=2)
    clean = np.asarray(Image.open(d / rows[0]["image"]), np.float32).transpose(2, 0, 1) / 255
    x, _ = make_test_pair(clean, "denoise", image_id="k")
    with torch.no_grad():
        full = model.restore(x[None])
    tiled = tiled_restore(model, x[None], tile=256, overlap=32)
    assert (tiled - full).abs().max().item() < TILED_MAX_ABS and _psnr(tiled, full) > TILED_MIN_PSNR
