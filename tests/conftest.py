"""Shared fixtures: a seeded generator, the devices to test on (cpu, and cuda when present), and a real
`mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


SERVER_START_TIMEOUT_S = 180  # generous: a loaded 2-core machine starts it in 5-60 s


def _mlflow_command() -> list[str]:
    exe = Path(sys.executable).parent / "mlflow"  # the venv's console script, next to python
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mlflow")
    return [found] if found else [sys.executable, "-m", "mlflow"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (it was started in its own session), then kill."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (job runner children)
    except ProcessLookupError:
        pass
    proc.wait(timeout=5)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` subprocess on 127.0.0.1:<free port>; yields its http:// URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job runners: faster start, fewer processes
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    cmd = _mlflow_command() + [
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{(root / 'db.sqlite').as_posix()}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                tail = log_path.read_text()[-3000:]
                pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S}s:\n{tail}")
            time.sleep(0.25)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def local_ray(request, tmp_path_factory):
    """A local Ray (all servers on 127.0.0.1) for one test module, with RCL_DIST_HOME in a temporary
    folder; the module's own functions travel to Ray workers by value (tests/ is not importable there)."""
    ray = pytest.importorskip("ray")
    home = tmp_path_factory.mktemp("rcl_home")
    old = os.environ.get("RCL_DIST_HOME")
    os.environ["RCL_DIST_HOME"] = str(home)
    from rcl_dist.train.launch import ensure_ray

    ensure_ray(num_cpus=4)
    assert ray.is_initialized()
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}  # loopback only
    ray.cloudpickle.register_pickle_by_value(request.module)
    yield home
    ray.shutdown()
    if old is None:
        os.environ.pop("RCL_DIST_HOME", None)
    else:
        os.environ["RCL_DIST_HOME"] = old
