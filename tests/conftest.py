"""Shared fixtures: a seeded generator, the devices to test on (cpu, and cuda when present), and a real
`mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from servers import free_port, mlflow_command, stop_group, wait_until_answers

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


SERVER_START_TIMEOUT_S = 180  # generous: a loaded 2-core machine starts it in 5-60 s


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` subprocess on 127.0.0.1:<free port>; yields its http:// URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job runners: faster start, fewer processes
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    cmd = mlflow_command() + [
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
        wait_until_answers(url + "/health", proc, log_path, SERVER_START_TIMEOUT_S, "mlflow server")
        yield url
    finally:
        stop_group(proc)


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
