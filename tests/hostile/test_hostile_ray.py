"""Issue 16, defect 10: a stale Ray cluster address (a head that died uncleanly leaves Ray's
``ray_current_cluster`` file behind) must not make every command try to join a dead cluster.

The decision is tested on real sockets (one listening on 127.0.0.1, one port nothing listens on), and
one real local Ray is started in a subprocess whose Ray temp folder (``RAY_TMPDIR``) holds the stale file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rcl_dist.config import ConfigError
from rcl_dist.train.launch import choose_ray

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def listening():
    """``127.0.0.1:PORT`` of a real socket that accepts connections (stands for a live head)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def dead():
    """``127.0.0.1:PORT`` that nothing listens on any more (a head that died)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def test_stale_address_file_starts_local_ray(dead):
    address, why = choose_ray(None, dead)
    assert address is None
    assert "local Ray" in why and "stale" in why and dead in why


def test_address_file_of_live_cluster_node_is_joined(listening):
    address, why = choose_ray(None, listening)
    assert address == listening and "joining" in why


def test_nothing_recorded_starts_local_ray():
    assert choose_ray(None, None)[0] is None


def test_requested_live_address_is_joined(listening, dead):
    assert choose_ray(listening, dead)[0] == listening
    assert choose_ray(f"ray://{listening}", None)[0] == f"ray://{listening}"


def test_requested_dead_address_is_a_clear_error(dead):
    with pytest.raises(ConfigError, match=f"RAY_ADDRESS={dead}: no Ray cluster answers"):
        choose_ray(dead, None)


def test_ray_address_local_ignores_a_live_recorded_cluster(listening):
    assert choose_ray("local", listening)[0] is None


def test_ray_address_auto_with_stale_file_is_a_clear_error(dead):
    with pytest.raises(ConfigError, match="does not answer"):
        choose_ray("auto", dead)


def test_real_local_start_beside_stale_address_file_token_under_rcl_home(tmp_path):
    """The probe itself: before the fix ``ensure_ray(num_cpus=...)`` raised "When connecting to an
    existing cluster, num_cpus and num_gpus must not be provided". A short temp folder: Ray's unix
    sockets live under it (path length limit 107)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    dead_port = _dead_port()
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead_port}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    user_home = tmp_path / "user_home"
    user_home.mkdir()
    env.update(RAY_TMPDIR=str(ray_tmp), RCL_DIST_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), HOME=str(user_home))
    code = (
        "import ray\n"
        "from rcl_dist.train.launch import ensure_ray\n"
        "ensure_ray(num_cpus=1, log=lambda s: print('LOG', s))\n"
        "print('NODES', sorted({n['NodeManagerAddress'] for n in ray.nodes()}))\n"
        "print('CPUS', ray.cluster_resources().get('CPU'))\n"
        "ray.shutdown()\n"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "num_cpus and num_gpus must not be provided" not in r.stderr
    assert f"LOG Ray: starting a local Ray on 127.0.0.1 (ignored a stale cluster address 127.0.0.1:{dead_port}" in r.stdout
    assert "NODES ['127.0.0.1']" in r.stdout and "CPUS 1.0" in r.stdout
    # defect 9: Ray's auth token under RCL_DIST_HOME (private), nothing under the user's home
    token = tmp_path / "home" / "ray" / "auth_token"
    assert token.is_file() and len(token.read_text()) == 64 and token.stat().st_mode & 0o077 == 0
    assert not (user_home / ".ray").exists(), sorted(str(p) for p in user_home.rglob("*"))


def _dead_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
