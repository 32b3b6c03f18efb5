"""The cluster's MLflow (cluster/mlflow_server.sh) for real: a PostgreSQL started by the script, an
`mlflow server` on loopback in front of it, and the writers a cluster puts on it at once: a sweep
with two concurrent trials and a pre-training run in another process. Every metric step arrives
once, no run is left open, no lock or database error appears, and registration and promotion work
against the same server. Skipped where PostgreSQL or psycopg2 is not installed (`.ci/run`
installs both)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from servers import free_port, is_loopback_listen, listening_addresses

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "mlflow_server.sh"
PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or ([Path(p)] if (p := shutil.which("initdb")) else [])
ERRORS = ("database is locked", "deadlock", "could not obtain lock", "OperationalError", "Traceback")


def _missing() -> str | None:
    if not PG_BIN:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does it)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[test]')"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` user to run the database as"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _script_env(state: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(
        RCL_DIST_HOME=str(state / "home"),
        RCL_DIST_MLFLOW_PORT=str(port),
        RCL_DIST_MLFLOW_SOCKET_DIR=str(state / "s"),  # short: a socket path has at most 107 characters
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # this venv's mlflow
    )
    return env


@pytest.fixture(scope="module")
def pg_mlflow():
    # not pytest's tmp_path: its folders are closed to other users, and the database runs as `postgres`
    # when the tests run as root
    state = Path(tempfile.mkdtemp(prefix="rclpg", dir="/tmp"))
    state.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    env = _script_env(state, free_port())
    try:
        out = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stdout + out.stderr
        env_file = state / "home" / "mlflow_server" / "mlflow.env"
        uri = env_file.read_text().strip().removeprefix("export MLFLOW_TRACKING_URI=")
        assert uri == f"http://127.0.0.1:{env['RCL_DIST_MLFLOW_PORT']}" and "postgresql" in out.stdout
        yield {"uri": uri, "state": state, "env": env}
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def test_server_listens_on_loopback_only_and_the_database_on_no_port(pg_mlflow):
    pid = int((pg_mlflow["state"] / "home" / "mlflow_server" / "mlflow.pid").read_text())
    pids = {pid} | {int(p) for p in subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()}
    pg = subprocess.run(["pgrep", "-f", f"postgres.*{pg_mlflow['state']}"], capture_output=True, text=True).stdout.split()
    assert pg, "no PostgreSQL process of the script's"
    server = listening_addresses(pids)
    assert server and all(is_loopback_listen(a) for a in server), server
    assert listening_addresses({int(p) for p in pg}) == []  # Unix socket only: no TCP listener at all


@pytest.mark.slow
def test_concurrent_sweep_and_pretraining_log_everything(pg_mlflow, tmp_path, local_ray):
    """A 2-trial sweep (both trials at once) in this process and a pre-training run in another, all
    logging to the one server: every run finishes, each logged step arrives exactly once, and the
    server's log holds no lock or database error."""
    from mlflow import MlflowClient

    from rcl_dist.tune import run_sweep
    from rcl_dist.tune_space import load_space
    from test_tune import TINY_FIXED, TINY_OBJECTIVE, _space, _tiny_data

    uri = pg_mlflow["uri"]
    manifest = _tiny_data(tmp_path / "data")
    steps = 12
    pre_env = {**os.environ, "RCL_DIST_HOME": str(tmp_path / "pre_home"), "PYTHONPATH": str(ROOT)}
    pre_env.pop("RAY_ADDRESS", None)
    pretrain = subprocess.Popen(
        [sys.executable, "-m", "rcl_dist.cli", "pretrain", "--tracking-uri", uri, "model.width=4", "model.depth=1",
         "data.crop=16", "data.threads=1", "train.batch_size=4", f"train.steps={steps}", "train.log_every=1",
         "loss.encoder=null", "dist.checkpoint_every=4", "dist.run_name=pg-pretrain",
         "tracking.experiment=pg-pretrain"],
        env=pre_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        space = load_space(
            _space(tmp_path, trials=2, concurrency=2, fixed=dict(TINY_FIXED), experiment="pg-sweep",
                   scheduler={"type": "fifo"},  # every trial runs all its rounds: all of its steps are logged
                   points=[{"loss.alpha": 0.1, "loss.temperature": 0.05}]),
            [f"data.manifest={manifest}"],
        )  # fmt: skip
        result = run_sweep(space, tracking_uri=uri, storage=tmp_path / "sweeps", log=lambda _m: None)
        out, _ = pretrain.communicate(timeout=600)
    finally:
        if pretrain.poll() is None:
            pretrain.kill()
    assert pretrain.returncode == 0, out[-3000:]
    assert result.summary["trials"] == 2 and result.summary["failed"] == 0

    client = MlflowClient(uri)
    (pre,) = client.search_runs([client.get_experiment_by_name("pg-pretrain").experiment_id])
    assert pre.info.status == "FINISHED"
    for key in ("loss", "samples_per_s"):
        assert [m.step for m in client.get_metric_history(pre.info.run_id, key)] == list(range(1, steps + 1)), key
    runs = client.search_runs([client.get_experiment_by_name("pg-sweep").experiment_id])
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(runs) == 3 and len(nested) == 2
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    rounds, per_round = TINY_OBJECTIVE["rounds"], TINY_OBJECTIVE["steps_per_round"]
    for r in nested:
        history = client.get_metric_history(r.info.run_id, "val_psnr")
        assert [m.step for m in history] == [per_round * (k + 1) for k in range(rounds)]
        assert all(np.isfinite(m.value) for m in history)
    log = (pg_mlflow["state"] / "home" / "mlflow_server" / "mlflow.log").read_text()
    assert not [e for e in ERRORS if e in log], log[-3000:]


def test_registration_and_promotion_on_postgresql(pg_mlflow, tmp_path):
    """Two fine-tuned denoisers registered as versions 1 and 2 with their evaluations; the better one
    takes @champion, the worse one cannot take it back."""
    from mlflow import MlflowClient

    from rcl_dist.data.codec import encode_png
    from rcl_dist.registry import promote, register
    from test_denoise import fine_tuned_checkpoint, smooth
    from test_registry import finetune_run

    uri = pg_mlflow["uri"]
    evald = tmp_path / "eval"
    evald.mkdir()
    for i, (h, w) in enumerate([(40, 48), (37, 45)]):
        (evald / f"e{i}.png").write_bytes(encode_png(smooth(h, w, 3, np.uint8, 10 + i)))
    pre, manifest = tmp_path / "pre", tmp_path / "labels.parquet"
    manifest.write_bytes(b"labels")
    versions = []
    for seed in (0, 1):
        ckpt = fine_tuned_checkpoint(tmp_path / f"ft{seed}", seed=seed, pretrain=str(pre))
        run_id = finetune_run(uri, ckpt, str(pre), manifest, f"pg-ft-{seed}")
        versions.append(register(run_id, "pg-denoiser", tracking_uri=uri, eval_data=evald))
    assert [int(v.version) for v in versions] == [1, 2]
    first = promote("pg-denoiser", 1, eval_data=evald, tracking_uri=uri)
    second = promote("pg-denoiser", 2, eval_data=evald, tracking_uri=uri)
    assert first["decision"] == "no-holder" and first["promoted"]
    champion = int(MlflowClient(uri).get_model_version_by_alias("pg-denoiser", "champion").version)
    assert champion == (2 if second["promoted"] else 1)
    assert second["decision"] in ("promoted", "rejected")
    tags = json.loads(MlflowClient(uri).get_registered_model("pg-denoiser").tags["promotion.champion.last"])
    assert int(tags["candidate_version"]) == 2 and tags["decision"] == second["decision"]
