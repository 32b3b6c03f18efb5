"""Issue 16, defect 9 (tracebacks instead of messages): a full disk while writing weights (ENOSPC) and a
full SQLite MLflow store ("database or disk is full"). Each probe runs the real command inside a
private mount namespace (``unshare -m``) on a small tmpfs filled to the last block, so nothing outside
the test sees the mount; skipped where mounting is not allowed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not _can_mount(), reason="needs unshare -m and tmpfs mounts (root in a namespace)")


def _on_full_disk(tmp_path: Path, before_filling: str, command: list[str]) -> tuple[int, str, Path]:
    """Run ``command`` with a 64 KiB tmpfs at tmp_path/full, after ``before_filling`` (shell) and after
    filling it; returns (exit status, stderr, the state of the folder as a listing file)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    err, listing = tmp_path / "stderr.txt", tmp_path / "listing.txt"
    env = {**os.environ, "RCL_DIST_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    script = "\n".join([
        f"mount -t tmpfs -o size=64k tmpfs {mnt}",
        before_filling,
        f"dd if=/dev/zero of={mnt}/filler bs=1k 2>/dev/null; true",
        f"cd {tmp_path}",
        " ".join(f"'{c}'" for c in command) + f" 2> {err}",
        "rc=$?",
        f"(cd {mnt} && ls -A && md5sum * 2>/dev/null) > {listing}",
        "exit $rc",
    ])  # fmt: skip
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, err.read_text(), listing


def test_local_pretrain_save_on_full_disk_keeps_the_existing_file(tmp_path):
    mnt = tmp_path / "full"
    rc, err, listing = _on_full_disk(
        tmp_path, f"printf 'earlier weights' > {mnt}/w.pt",
        [sys.executable, "-m", "rcl_dist.cli", "pretrain", "--local", "model.width=16", "model.depth=3", "train.steps=1",
         "train.batch_size=2", "data.crop=32", "loss.encoder=null", "--save", str(mnt / "w.pt")],
    )  # fmt: skip
    assert rc == 1, err[-3000:]
    assert f"rcl-dist: error: the disk is full (writing {mnt / 'w.pt'})" in err and "Traceback" not in err
    names = listing.read_text()
    assert "w.pt" in names and ".tmp" not in names  # no half-written temporary file left behind
    import hashlib

    assert hashlib.md5(b"earlier weights").hexdigest() in names  # the earlier file, byte for byte


def test_register_on_full_sqlite_store_is_a_message(tmp_path):
    mnt = tmp_path / "full"
    rc, err, _ = _on_full_disk(
        tmp_path, "true",
        [sys.executable, "-m", "rcl_dist.cli", "register", "--run", "0123abcd", "--name", "m",
         "--tracking-uri", f"sqlite:///{mnt / 'mlflow.db'}"],
    )  # fmt: skip
    assert rc == 1, err[-3000:]
    assert "rcl-dist: error: the disk is full (SQLite: database or disk is full" in err and "Traceback" not in err
