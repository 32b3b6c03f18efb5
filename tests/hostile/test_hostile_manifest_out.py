"""Issue 16, defect 9: two ``data index`` runs on the same ``--out`` with different folders: the last
writer won silently (the first folder's rows were dropped). Now refused before anything is written,
unless ``--replace``; and the manifests ``pretrain`` indexes for ``data.source`` are named by the
folder's full path, so two folders of the same name never share one."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from rcl_dist.cli import main
from rcl_dist.config import load_config
from rcl_dist.data.manifest import read_manifest
from rcl_dist.train.launch import ensure_manifest

from hostile_inputs import noisy_rgb


def _folder(root: Path, name: str, n: int, seed: int) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(noisy_rgb(40, 48, seed=seed + i)).save(d / f"{name.replace('/', '_')}_{i}.png")
    return d


def _paths(m: Path) -> set[str]:
    return set(read_manifest(m).column("path").to_pylist())


def test_second_index_of_other_folder_to_same_out_refused_manifest_kept(tmp_path, capsys):
    a, b, out = _folder(tmp_path, "a", 2, 0), _folder(tmp_path, "b", 3, 10), tmp_path / "m.parquet"
    assert main(["data", "index", str(a), "--out", str(out)]) == 0
    before = out.read_bytes()
    assert main(["data", "index", str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: already indexes 2 file(s) outside" in err and str(a) in err and "--replace" in err
    assert out.read_bytes() == before  # nothing written

    assert main(["data", "index", str(b), "--out", str(out), "--replace"]) == 0
    assert {Path(p).resolve().parent for p in _paths(out)} == {b.resolve()}


def test_reindex_of_the_same_folder_still_incremental(tmp_path):
    a, out = _folder(tmp_path, "a", 2, 0), tmp_path / "m.parquet"
    assert main(["data", "index", str(a), "--out", str(out)]) == 0
    Image.fromarray(noisy_rgb(40, 48, seed=99)).save(a / "new.png")
    assert main(["data", "index", str(a), "--out", str(out)]) == 0
    assert len(_paths(out)) == 3
    assert main(["data", "index", str(a), str(_folder(tmp_path, "extra", 1, 50)), "--out", str(out)]) == 0  # a superset
    assert len(_paths(out)) == 4


def test_pretrain_sources_with_the_same_folder_name_get_their_own_manifests(tmp_path, monkeypatch):
    monkeypatch.setenv("RCL_DIST_HOME", str(tmp_path / "home"))
    x, y = _folder(tmp_path, "x/photos", 2, 0), _folder(tmp_path, "y/photos", 2, 20)
    mx = ensure_manifest(load_config(None, [f"data.source={x}"]), log=lambda s: None)
    my = ensure_manifest(load_config(None, [f"data.source={y}"]), log=lambda s: None)
    assert mx != my and mx.parent == my.parent
    assert all(p.startswith(str(x)) for p in _paths(mx)) and all(p.startswith(str(y)) for p in _paths(my))
