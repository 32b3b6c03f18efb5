"""data.noise=none: a folder of real noisy photographs used as it is (nothing simulated).

The pipelines (DALI on the CPU, the reference DataLoader, the single-process sampler) must return the
files' own pixels; both crops of an RCL pair come from the one photograph and agree on their overlap;
methods that need what real data lacks (N2N's second realisation, a supervised target) refuse with an
error naming the setting; the manifest records which kind a folder is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcl_dist.config import ConfigError, load_config
from rcl_dist.data.index import index_images, rejects_path
from rcl_dist.data.manifest import manifest_noise, read_manifest
from rcl_dist.data.reference import ManifestPairs
from rcl_dist.data.sampler import PairSampler
from rcl_dist.data.spec import PairSpec, crop_geometry


def _photos(folder: Path, n: int = 4, side: int = 40, pairs: bool = False) -> dict[str, np.ndarray]:
    """8-bit RGB 'noisy photographs' (random pixels); with ``pairs`` also a *_mean partner each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for i in range(n):
        arr = rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8)
        name = f"img{i}_real.png" if pairs else f"img{i}.png"
        Image.fromarray(arr).save(folder / name)
        out[str((folder / name).resolve())] = arr.transpose(2, 0, 1).astype(np.float32) / 255.0
        if pairs:
            Image.fromarray((arr // 2).astype(np.uint8)).save(folder / f"img{i}_mean.png")
    return out


def _locate(ref: np.ndarray, crop: np.ndarray) -> tuple[int, int, float]:
    c = crop.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(ref, (c, c), axis=(1, 2))  # [C, H-c+1, W-c+1, c, c]
    err = ((win - crop[:, None, None]) ** 2).mean(axis=(0, 3, 4))
    y, x = np.unravel_index(np.argmin(err), err.shape)
    return int(y), int(x), float(err[y, x])


def _check_pretrain_batch(q: np.ndarray, k: np.ndarray, images: list[np.ndarray], crop: int, overlap: float) -> None:
    max_shift, _ = crop_geometry(crop, overlap)
    for qi, ki in zip(q, k):
        # both crops are exact windows of one photograph (no noise added) ...
        found = [(j, _locate(img, qi), _locate(img, ki)) for j, img in enumerate(images)]
        j, (qy, qx, qe), (ky, kx, ke) = min(found, key=lambda t: t[1][2] + t[2][2])
        # (DALI scales by 1/255 in another order: float rounding only; one grey level off is >= 1e-8)
        assert qe < 1e-12 and ke < 1e-12, "a crop is not the file's own pixels"
        # ... close enough to share at least `overlap` of their side, and equal on the shared part
        assert abs(qy - ky) <= max_shift and abs(qx - kx) <= max_shift
        oy, ox = max(qy, ky), max(qx, kx)
        ey, ex = min(qy, ky) + crop, min(qx, kx) + crop
        assert np.allclose(qi[:, oy - qy : ey - qy, ox - qx : ex - qx], ki[:, oy - ky : ey - ky, ox - kx : ex - kx], atol=1e-6)


@pytest.fixture
def real_folder(tmp_path):
    images = _photos(tmp_path / "photos", pairs=True)
    out = tmp_path / "real.parquet"
    index_images([str(tmp_path / "photos")], out, val_fraction=0.0, noise="none", log=lambda *_: None)
    return out, images


def test_index_records_real_noise_and_leaves_out_the_clean_references(real_folder, tmp_path):
    out, images = real_folder
    rows = read_manifest(out).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(images)  # only the *_real halves
    assert manifest_noise(out) == "none"
    import pyarrow.parquet as pq

    rej = pq.read_table(rejects_path(out)).to_pylist()  # the rejects table names each *_mean and why
    assert len(rej) == 4 and all(r["reason"].startswith("clean reference") and r["path"].endswith("_mean.png") for r in rej)
    # a simulated-noise manifest says so; one written before the setting existed reads as simulated
    sim = tmp_path / "sim.parquet"
    index_images([str(tmp_path / "photos")], sim, log=lambda *_: None)
    assert manifest_noise(sim) == "simulated" and len(read_manifest(sim)) == 8


def test_reference_pipeline_returns_the_files_pixels(real_folder):
    out, images = real_folder
    crop, overlap = 16, 0.5
    ds = ManifestPairs(out, PairSpec(task="pretrain", crop=crop, overlap=overlap, batch_size=4, noise="none"))
    batch = [ds[(0, i)] for i in range(4)]
    _check_pretrain_batch(np.stack([b["q"].numpy() for b in batch]), np.stack([b["k"].numpy() for b in batch]),
                          list(images.values()), crop, overlap)  # fmt: skip
    den = ManifestPairs(out, PairSpec(task="denoise", crop=crop, batch_size=4, noise="none"))[(0, 1)]
    assert torch.equal(den["input"], den["target"])  # nothing added: the input is the photograph's crop
    assert any(_locate(img, den["input"].numpy())[2] < 1e-12 for img in images.values())


def test_dali_cpu_pipeline_returns_the_files_pixels(real_folder):
    pytest.importorskip("nvidia.dali")
    from rcl_dist.data.dali import DALILoader

    out, images = real_folder
    crop, overlap = 16, 0.5
    loader = DALILoader(out, PairSpec(task="pretrain", crop=crop, overlap=overlap, batch_size=4, noise="none"),
                        device_id=None, num_threads=1)  # fmt: skip
    batch = next(iter(loader))
    _check_pretrain_batch(batch["q"].numpy(), batch["k"].numpy(), list(images.values()), crop, overlap)
    noisy = next(iter(DALILoader(out, PairSpec(task="pretrain", crop=crop, overlap=overlap, batch_size=4), device_id=None, num_threads=1)))
    with pytest.raises(AssertionError, match="own pixels"):  # the check sees simulated noise where it is added
        _check_pretrain_batch(noisy["q"].numpy(), noisy["k"].numpy(), list(images.values()), crop, overlap)
    den = next(iter(DALILoader(out, PairSpec(task="denoise", crop=crop, batch_size=4, noise="none"), device_id=None, num_threads=1)))
    assert torch.equal(den["input"], den["target"])


def test_local_sampler_adds_nothing():
    img = np.random.default_rng(1).random((3, 48, 48)).astype(np.float32)
    s = PairSampler([img, img * 0.5], crop=16, overlap=0.5, noise="none", generator=torch.Generator().manual_seed(0))
    b = s.sample(2, "rcl")
    _check_pretrain_batch(b["q"].numpy(), b["k"].numpy(), [img, img * 0.5], 16, 0.5)
    with pytest.raises(ValueError, match="second noisy realisation"):
        s.sample(2, "n2n")


def test_methods_that_need_what_real_data_lacks_refuse():
    for method, what in (("n2n", "second noisy realisation"), ("supervised", "clean target")):
        with pytest.raises(ConfigError, match=f"data.noise=none.*|{what}") as e:
            load_config(None, [f"loss.method={method}", "data.noise=none"])
        assert "data.noise=none" in str(e.value) and what in str(e.value)
    for method in ("rcl", "consistency", "n2s", "nb2nb", "b2u"):
        assert load_config(None, [f"loss.method={method}", "data.noise=none"]).data.noise == "none"
    with pytest.raises(ConfigError, match="data.realisation"):
        load_config(None, ["data.noise=none", "data.realisation=fixed"])
    with pytest.raises(ConfigError, match="model.raw"):
        load_config(None, ["data.noise=none", "model.raw=packed"])
    for task in ("n2n", "jdd", "jdensr"):
        with pytest.raises(ValueError, match="noise='none'"):
            PairSpec(task=task, noise="none", raw="packed" if task == "jdd" else None)
    with pytest.raises(ValueError, match="noise must be"):
        PairSpec(noise="real")


def test_a_manifest_of_the_other_kind_is_refused(real_folder, tmp_path):
    from rcl_dist.train.launch import ensure_manifest

    out, _ = real_folder
    with pytest.raises(ConfigError, match="data.noise=none"):
        ensure_manifest(load_config(None, [f"data.manifest={out}"]))
    assert ensure_manifest(load_config(None, [f"data.manifest={out}", "data.noise=none"])) == out.resolve()


def test_local_pretraining_on_a_folder_of_noisy_photographs(tmp_path):
    from rcl_dist.train.local import load_images, train_local

    _photos(tmp_path / "photos", n=3, side=48, pairs=True)
    cfg = load_config(None, [f"data.source={tmp_path / 'photos'}", "data.noise=none", "data.tile=0", "data.crop=16",
                             "model.width=4", "model.depth=2", "train.batch_size=2", "train.steps=3",
                             "train.log_every=1", "loss.method=nb2nb"])  # fmt: skip
    assert len(load_images(cfg)) == 3  # the *_mean references are not training images
    _, history = train_local(cfg, log=None)
    assert "noise_distance" not in history.metrics  # the true noise of a real photograph is unknown
    assert len(history.metrics["loss"]) == 3
    with pytest.raises(ValueError, match="bundled images are clean"):
        load_images(load_config(None, ["data.noise=none"]))
