"""Issue 16, defect 9 (the smaller ones about pre-training inputs): ``pretrain --local`` ignoring
``data.manifest``; a crop larger than every image reported only inside a Ray worker after the MLflow
run and the run folder existed; ``dist.run_name=../../escape`` writing outside the results folder.
(Ray's auth token under the user's home: tests/hostile/test_hostile_ray.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcl_dist.cli import main
from rcl_dist.config import ConfigError, load_config
from rcl_dist.train.local import load_images

from hostile_inputs import noisy_rgb

TINY = ["model.width=4", "model.depth=2", "train.batch_size=2", "train.steps=2", "train.log_every=1", "data.tile=0",
        "loss.encoder=null", "loss.alpha=1", "data.threads=1"]  # fmt: skip


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "rcl_home"
    monkeypatch.setenv("RCL_DIST_HOME", str(h))
    return h


def _manifest(tmp_path: Path, sizes: list[tuple[int, int]], name: str = "imgs") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(noisy_rgb(h, w, seed=i)).save(folder / f"p{i}.png")
    out = tmp_path / f"{name}.parquet"
    assert main(["data", "index", f"{folder}:train", "--out", str(out)]) == 0
    return out


def test_local_pretrain_reads_the_manifest_images(tmp_path, home, capsys):
    m = _manifest(tmp_path, [(70, 90), (72, 80)])
    images = load_images(load_config(None, [*TINY, f"data.manifest={m}"]))
    assert sorted(im.shape for im in images) == [(3, 70, 90), (3, 72, 80)]  # not the bundled photographs
    assert main(["pretrain", "--local", *TINY, f"data.manifest={m}", "data.crop=32"]) == 0
    assert f"on manifest {m} images" in capsys.readouterr().out


def test_local_pretrain_refuses_manifest_of_other_noise_kind(tmp_path, home, capsys):
    m = _manifest(tmp_path, [(70, 90)])
    assert main(["pretrain", "--local", *TINY, f"data.manifest={m}", "data.noise=none"]) == 2
    err = capsys.readouterr().err
    assert "data.manifest" in err and str(m) in err and "data.noise" in err


def test_local_pretrain_missing_manifest_is_named(tmp_path, home, capsys):
    assert main(["pretrain", "--local", *TINY, f"data.manifest={tmp_path / 'nope.parquet'}"]) == 2
    assert "nope.parquet does not exist" in capsys.readouterr().err


def test_crop_larger_than_every_image_refused_before_run_or_folder(tmp_path, home, capsys):
    m = _manifest(tmp_path, [(40, 40), (36, 44)])
    db = tmp_path / "mlflow.db"
    rc = main(["pretrain", *TINY, f"data.manifest={m}", "data.crop=64", "dist.run_name=big", "--tracking-uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "data.crop=64: no image of the split 'train'" in err and "the largest is" in err and str(m) in err
    assert not (home / "ray_results" / "big").exists() and not db.exists()  # no run folder, no MLflow run


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "/abs", "x\\y"])
def test_run_name_with_path_parts_refused(tmp_path, home, name, capsys):
    assert main(["pretrain", *TINY, f"dist.run_name={name}"]) == 2
    assert "dist.run_name" in capsys.readouterr().err
    assert not (home.parent / "escape").exists() and not home.exists()  # nothing written anywhere
    with pytest.raises(ConfigError, match="plain folder name"):
        load_config(None, [f"dist.run_name={name}"])


def test_ordinary_run_names_still_accepted():
    for name in ("pretrain-20260101-000000", "run.v2", "..hidden-ish", "r_1"):
        assert load_config(None, [f"dist.run_name={name}"]).dist.run_name == name


@pytest.mark.parametrize("kind", ["folder", "fifo", "dev_zero", "binary", "huge"])
def test_config_path_not_a_yaml_file_is_named(tmp_path, kind, capsys):
    """`--config DIR` was a raw IsADirectoryError traceback; a FIFO would hang, /dev/zero never end."""
    import os

    path = {"folder": tmp_path, "dev_zero": Path("/dev/zero")}.get(kind, tmp_path / f"{kind}.yaml")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
    elif kind == "huge":
        path.write_text("# " + "x" * (2 << 20) + "\n")
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert {"folder": "is a folder", "fifo": "not a regular file", "dev_zero": "not a regular file",
            "binary": "not UTF-8", "huge": "byte limit"}[kind] in err  # fmt: skip
