"""Issue 16, defect 5: resume and checkpoints.

Probes: a truncated ``state.pt`` (a full disk) as the newest checkpoint of a run folder; a write that
fails half-way; ``rcl-dist pretrain --resume dist.run_name=NAME`` exactly as the README writes it (no
--config: the run's own stored config must be used, and the FINISHED MLflow run must stay FINISHED
whatever fails before training); a worker crash before the first new checkpoint of a resume; Ctrl-C
(SIGINT) of a running driver, then a resume that must start from the newest valid checkpoint on disk.
Real engines: a local Ray (127.0.0.1) and a SQLite MLflow store.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcl_dist.cli import main
from rcl_dist.config import Config, ConfigError, load_config
from rcl_dist.models.factory import build_model_from_config
from rcl_dist.models.io import newest_valid_checkpoint, read_state, save_checkpoint, write_state

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.width=8", "model.depth=2", "data.crop=32", "data.tile=64", "data.threads=1", "data.engine=torch",
    "train.batch_size=8", "train.log_every=1", "loss.encoder=null", "loss.alpha=1", "dist.checkpoint_every=2",
]  # fmt: skip


def _tiny_state(step: int) -> dict:
    cfg = Config.from_dict({"model": {"width": 4, "depth": 2}})
    torch.manual_seed(step)
    return {"model": build_model_from_config(cfg).state_dict(), "config": cfg.to_dict(), "step": step}


def _run_folder(root: Path, steps=(2, 4)) -> Path:
    """A run folder as Ray leaves it: checkpoint_<time>/state.pt, named in write order."""
    for i, step in enumerate(steps):
        write_state(root / f"checkpoint_2026-01-01_00-00-0{i}.000000" / "state.pt", _tiny_state(step))
    return root


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # what a full disk leaves: the first part only


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "test_images"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(d / f"img{i}.png")
    return d


@pytest.mark.parametrize("digest", [True, False], ids=["with_digest", "older_checkpoint_without_digest"])
def test_truncated_newest_checkpoint_skipped_evaluate_falls_back(tmp_path, images, digest, capsys):
    run = _run_folder(tmp_path / "run")
    newest = sorted(run.glob("checkpoint_*"))[-1] / "state.pt"
    if not digest:
        for f in run.glob("checkpoint_*/state.pt.sha256"):
            f.unlink()
    _truncate(newest)
    f, state = newest_valid_checkpoint(run)
    assert state["step"] == 2 and f != newest
    with pytest.raises(ValueError, match=re.escape(str(newest))):
        read_state(newest)
    rc = main(["evaluate", "--model", str(run), "--data", str(images), "--task", "gaussian", "--sigma", "25"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "skipping a damaged checkpoint" in err and str(newest) in err


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path, images, capsys):
    run = _run_folder(tmp_path / "run")
    for f in run.glob("checkpoint_*/state.pt"):
        _truncate(f)
    rc = main(["evaluate", "--model", str(run), "--data", str(images), "--task", "gaussian", "--sigma", "25"])
    assert rc == 2 and "no valid checkpoint" in capsys.readouterr().err


def test_changed_byte_fails_digest(tmp_path):
    f = write_state(tmp_path / "state.pt", _tiny_state(1))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        read_state(f)


def test_write_failing_halfway_keeps_previous_checkpoint(tmp_path):
    f = save_checkpoint(tmp_path / "ckpt", build_model_from_config(Config.from_dict({"model": {"width": 4, "depth": 2}})),
                        Config.from_dict({"model": {"width": 4, "depth": 2}}), step=1)  # fmt: skip
    before = f.read_bytes()
    with pytest.raises(Exception):  # torch.save cannot pickle a lambda: it fails after writing part of the zip
        write_state(f, {**_tiny_state(2), "bad": lambda: None})
    assert f.read_bytes() == before and read_state(f)["step"] == 1
    assert sorted(p.name for p in f.parent.iterdir()) == ["state.pt", "state.pt.sha256"]  # no temp file left


# ------------------------------------------------------------------ a real driver, Ctrl-C, resume


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rcl_dist.cli", *args]


def _status(uri: str, run_name: str, storage: Path) -> str:
    import json

    from mlflow import MlflowClient

    run_id = json.loads((storage / run_name / "rcl_dist_run.json").read_text())["mlflow_run_id"]
    return MlflowClient(uri).get_run(run_id).info.status


def test_sigint_says_where_and_resume_starts_from_newest_valid_checkpoint(tmp_path):
    """Ctrl-C of a running driver: exit 130 with 'interrupted at step N ... resume with ...', the MLflow
    run KILLED; the resume (as the README writes it, plus a new train.steps) starts at N, the newest
    valid checkpoint on disk, whether or not Ray had registered it (before: exit 1, no message, and a
    restart from an older step)."""
    home = tmp_path / "home"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RCL_DIST_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    args = ["pretrain", *TINY, "train.steps=100000", "dist.run_name=sig", "--tracking-uri", uri]
    proc = subprocess.Popen(_cli(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "[rcl-dist] step 7/" in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(300), "".join(lines)[-3000:]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    err = "".join(lines)
    assert rc == 130, err[-3000:]
    m = re.search(r"rcl-dist: run sig interrupted at step (\d+) .*resume with: rcl-dist pretrain --resume dist.run_name=sig", err)
    assert m, err[-3000:]
    storage = home / "ray_results"
    n = int(m.group(1))
    assert n >= 6 and newest_valid_checkpoint(storage / "sig")[1]["step"] == n
    assert _status(uri, "sig", storage) == "KILLED"

    r = subprocess.run(_cli(["pretrain", "--resume", "dist.run_name=sig", f"train.steps={n + 2}"]), env=env,
                       capture_output=True, text=True, timeout=400)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step {n} " in r.stderr
    assert f"step {n + 1}/{n + 2}" in r.stderr and f"step {n - 1}/" not in r.stderr
    assert _status(uri, "sig", storage) == "FINISHED"


def test_resume_as_readme_writes_it_keeps_finished_run(local_ray, tmp_path, capsys):
    """``--resume dist.run_name=NAME`` with no --config: the run's stored (tiny) config, not the
    defaults; a resume that cannot start, or fails before its first new checkpoint, leaves the
    FINISHED run FINISHED (before: the defaults failed and the run was flipped to FAILED)."""
    from rcl_dist.train.launch import run_pretrain

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = local_ray / "ray_results"
    first = run_pretrain(load_config(None, [*TINY, "train.steps=4", "dist.run_name=r5"]), tracking_uri=uri)
    assert first.metrics["step"] == 4 and _status(uri, "r5", storage) == "FINISHED"

    assert main(["pretrain", "--resume", "dist.run_name=r5"]) == 0  # complete: nothing to do, nothing touched
    assert "is complete: its newest checkpoint is at step 4" in capsys.readouterr().out
    assert _status(uri, "r5", storage) == "FINISHED"

    assert main(["pretrain", "--resume", "dist.run_name=r5", "model.width=32"]) == 2
    err = capsys.readouterr().err
    assert "model.width: run 'r5' was trained with 8" in err and "32" in err
    assert _status(uri, "r5", storage) == "FINISHED"

    # a worker crash at the first step of the resume, before any new checkpoint: the record is unchanged
    from rcl_dist.config import config_layer
    from rcl_dist.train.launch import resume_config

    cfg = resume_config(config_layer(None, ["dist.run_name=r5", "train.steps=6"]))
    assert cfg.model.width == 8 and cfg.train.steps == 6
    with pytest.raises(Exception):
        run_pretrain(cfg, resume=True, env={"RCL_DIST_FAULT": f"0:5:{tmp_path / 'fault'}"})
    assert (tmp_path / "fault").is_file()
    assert _status(uri, "r5", storage) == "FINISHED"

    assert main(["pretrain", "--resume", "dist.run_name=r5", "train.steps=6"]) == 0  # tiny model: defaults would not load
    assert "step 6" in capsys.readouterr().out
    assert _status(uri, "r5", storage) == "FINISHED"


def test_resume_of_unknown_run_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no run 'nope'"):
        from rcl_dist.train.launch import resume_config

        resume_config({"dist": {"run_name": "nope", "storage_path": str(tmp_path)}})
