"""`ray up` → `ray submit` → `ray job submit` → `ray down` for real, with Ray's cluster launcher and
cluster/loopback.yaml on this machine.

The "head node" is a set of Linux namespaces of the test's own (PID, network, mount): a network with
loopback only, so nothing the head opens (Ray's GCS and raylet listen on every interface) can be
reached from outside; its own /tmp/ray; its own process table, so `ray stop` on the head cannot touch
any other Ray on the machine, and ending the namespace's init ends everything left. The launcher
reaches it over SSH: `ssh_proxy_command` runs a real sshd in inetd mode inside the namespaces, with a
key made here; sshd's ForceCommand gives the login a home of the test's (the node's ~/.bashrc puts
the node's venv on PATH, as `ray submit`'s login shell needs).

The node has no network, so it cannot download packages: its venv is prepared here as an image would
be (this project's environment plus Ray's dashboard extras), and the setup commands install the
synced checkout into it (offline, editable), so the head runs the code `ray up` synced. The head's
MLflow is cluster/mlflow_server.sh (PostgreSQL); runs, metrics and checkpoints are checked there.

Skipped where sshd, rsync, nsenter/unshare or root are missing (`.ci/run` installs them)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
TINY = ["model.width=4", "model.depth=1", "data.crop=16", "data.threads=1", "train.batch_size=4", "train.steps=6",
        "train.log_every=1", "loss.encoder=null", "dist.checkpoint_every=3"]  # fmt: skip
REAPER = "import os, time\nwhile True:\n    try:\n        os.wait()\n    except ChildProcessError:\n        time.sleep(0.2)\n"


def _missing() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs Linux and root (the head runs in namespaces of the test's own)"
    for tool in ("/usr/sbin/sshd", shutil.which("rsync"), shutil.which("unshare"), shutil.which("nsenter"),
                 shutil.which("ssh-keygen"), shutil.which("ip")):  # fmt: skip
        if not tool or not Path(tool).exists():
            return "needs openssh-server, rsync, util-linux and iproute2 (.ci/run installs them)"
    if not sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return "needs PostgreSQL for the head's MLflow (.ci/run installs it)"
    probe = subprocess.run(["unshare", "--pid", "--net", "--mount", "--fork", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.decode(errors='replace').strip()}"
    return None


pytestmark = [pytest.mark.skipif(_missing() is not None, reason=_missing() or ""), pytest.mark.slow]


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    print(f"[cluster test] {' '.join(cmd)[:200]}", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def _node_venv(node: Path) -> None:
    """The node's image: a venv on this project's environment (a site dir processed as one) plus Ray's
    dashboard extras, with the launch commands bound to it."""
    py = Path(os.path.realpath(sys.executable))
    subprocess.run([str(py), "-m", "venv", str(node / "venv")], check=True, timeout=120)
    site = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (node / "venv/lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / "zz_project_env.pth").write_text(
        f"import site; site.addsitedir({site!r})\n"
    )
    _run([str(node / "venv/bin/pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), "ray[default]"], 600)
    for name in ("ray", "mlflow", "rcl-dist"):
        script = (VENV_BIN / name).read_text().splitlines()
        (node / "venv/bin" / name).write_text("\n".join([f"#!{node / 'venv/bin/python'}", *script[1:]]) + "\n")
        (node / "venv/bin" / name).chmod(0o755)


@pytest.fixture(scope="module")
def head():
    """A namespace 'machine' with sshd reachable through a proxy command; yields its folders and config."""
    t = Path(tempfile.mkdtemp(prefix="rclc", dir="/tmp"))  # short paths; readable by the database user
    t.chmod(0o755)
    node = t / "node"
    node.mkdir()
    init = None
    name = f"rcl-test-{os.getpid()}"
    try:
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(t / key)], check=True)
        shutil.copy(t / "user_key.pub", t / "authorized_keys")
        (t / "login.sh").write_text(
            f'#!/bin/bash\nexport HOME={node}\ncd "$HOME"\n'
            '[ -n "${SSH_ORIGINAL_COMMAND:-}" ] || exec /bin/bash -l\nexec /bin/bash -c "$SSH_ORIGINAL_COMMAND"\n'
        )
        (t / "login.sh").chmod(0o755)
        (t / "sshd_config").write_text(
            f"HostKey {t / 'host_key'}\nAuthorizedKeysFile {t / 'authorized_keys'}\nUsePAM no\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"StrictModes no\nForceCommand {t / 'login.sh'}\nPidFile none\nLogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        pip_env = " ".join(f"{k}={v!r}" for k, v in os.environ.items() if k.startswith("PIP_"))
        user_pip = next((p for p in (Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf") if p.exists()), None)
        (node / ".bashrc").write_text(
            f"export PATH={node / 'venv/bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            f"export RCL_DIST_HOME={node / '.rcl_dist'} RAY_USAGE_STATS_ENABLED=0\n"
            + (f"export {pip_env}\n" if pip_env else "")
            + (f"export PIP_CONFIG_FILE={user_pip}\n" if user_pip else "")
        )
        (node / ".profile").write_text(". ~/.bashrc\n")
        _node_venv(node)

        init = subprocess.Popen(
            ["unshare", "--pid", "--net", "--mount", "--fork", "--mount-proc", "--propagation", "private", "bash", "-c",
             f"ip link set lo up && mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray && touch {t / 'ready'} "
             f"&& exec {sys.executable} -c {shlex.quote(REAPER)}"],
            start_new_session=True,
        )  # fmt: skip
        for _ in range(100):
            children = Path(f"/proc/{init.pid}/task/{init.pid}/children").read_text().split()
            if (t / "ready").exists() and children:
                break
            time.sleep(0.1)
        ns_pid = int(children[0])  # the namespace's PID 1 (the reaper), seen from here

        cfg = yaml.safe_load((ROOT / "cluster" / "loopback.yaml").read_text())
        cfg["cluster_name"] = name
        cfg["auth"] = {
            "ssh_user": "root",
            "ssh_private_key": str(t / "user_key"),
            "ssh_proxy_command": f"nsenter -t {ns_pid} -p -n -m /usr/sbin/sshd -i -f {t / 'sshd_config'}",
        }
        # offline node: install the synced checkout into the prepared venv instead of downloading
        assert cfg["setup_commands"][0].startswith("test -x ~/venv/bin/python")
        cfg["setup_commands"] = [
            "~/venv/bin/pip install -q --no-index --no-deps --no-build-isolation -e ~/rcl-dist",
            *[c for c in cfg["setup_commands"] if "pip install" not in c and "python3 -m venv" not in c],
        ]
        (t / "cluster.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        yield {"t": t, "node": node, "config": str(t / "cluster.yaml"), "ns_pid": ns_pid, "name": name}
    finally:
        if init is not None:
            os.killpg(init.pid, signal.SIGKILL)  # the namespace's init: everything in it ends
            init.wait(timeout=30)
        for suffix in ("state", "lock"):
            Path(f"/tmp/ray/cluster-{name}.{suffix}").unlink(missing_ok=True)
        shutil.rmtree(t, ignore_errors=True)


def _in_netns(head, code: str) -> str:
    """Run Python code in the head's network namespace (as through a tunnel to its loopback)."""
    out = _run(["nsenter", "-t", str(head["ns_pid"]), "-n", sys.executable, "-c", code], 120)
    return out.stdout


@pytest.mark.timeout(1800)
def test_ray_up_submit_job_submit_down(head, tmp_path):
    from test_tune import TINY_FIXED, TINY_OBJECTIVE, _tiny_data

    cfg, node, timings = head["config"], head["node"], {}
    t0 = time.perf_counter()
    _run([RAY, "up", "-y", "--no-config-cache", cfg], 600)
    timings["up"] = time.perf_counter() - t0
    addrs = _in_netns(head, "import socket; print(socket.if_nameindex())")
    assert "'lo'" in addrs and addrs.count("(") == 1, addrs  # the head has loopback and nothing else

    # the pre-training job, its runs in the head's MLflow, its checkpoints on the head
    t1 = time.perf_counter()
    out = _run([RAY, "submit", cfg, "pipelines/pretrain.py", "--", *TINY, "dist.run_name=cluster-pretrain",
                "tracking.experiment=cluster-pretrain"], 600)  # fmt: skip
    timings["submit_pretrain"] = time.perf_counter() - t1
    assert "in http://127.0.0.1:5000" in out.stdout + out.stderr
    ckpts = sorted((node / ".rcl_dist/ray_results/cluster-pretrain").glob("checkpoint_*/state.pt"))
    assert ckpts, "no checkpoint on the head"

    # a sweep of 2 concurrent trials, its space file put on the head with `ray rsync-up`
    data = _tiny_data(tmp_path / "data")
    space = {"name": "cluster-sweep", "fixed": dict(TINY_FIXED), "search": {"loss.alpha": {"loguniform": [1e-4, 1.0]}},
             "trials": 2, "concurrency": 2, "scheduler": {"type": "fifo"}, "search_alg": {"type": "random", "seed": 0},
             "objective": dict(TINY_OBJECTIVE), "experiment": "cluster-sweep"}  # fmt: skip
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    _run([RAY, "rsync-up", cfg, str(tmp_path / "space.yaml"), "~/space.yaml"], 120)
    t2 = time.perf_counter()
    _run([RAY, "submit", cfg, "pipelines/sweep.py", "--", "~/space.yaml", f"data.manifest={data}"], 600)
    timings["submit_sweep"] = time.perf_counter() - t2

    # the Jobs API through `ray dashboard`'s SSH tunnel to the head's loopback
    port = free_port()
    tunnel = subprocess.Popen([RAY, "dashboard", "-p", str(port), cfg], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        t3 = time.perf_counter()
        for _ in range(60):
            job = subprocess.run([RAY, "job", "submit", "--address", f"http://127.0.0.1:{port}", "--", "python",
                                  str(node / "rcl-dist/pipelines/pretrain.py"), *TINY, "dist.run_name=job-pretrain",
                                  "tracking.experiment=cluster-pretrain"],
                                 capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
            if "Connection refused" not in job.stdout + job.stderr and "Failed to connect" not in job.stdout + job.stderr:
                break
            time.sleep(1)  # the tunnel is not up yet
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, job.stdout[-3000:] + job.stderr[-3000:]
        timings["job_submit"] = time.perf_counter() - t3
    finally:
        os.killpg(tunnel.pid, signal.SIGTERM)
        tunnel.wait(timeout=30)

    # what the head's MLflow (PostgreSQL) holds: both pre-training runs and the sweep, every step once
    report = json.loads(_in_netns(head, f"""
import json
from mlflow import MlflowClient
c = MlflowClient("http://127.0.0.1:5000")
out = {{}}
for name in ("cluster-pretrain", "cluster-sweep"):
    runs = c.search_runs([c.get_experiment_by_name(name).experiment_id])
    out[name] = [{{"name": r.info.run_name, "status": r.info.status, "parent": r.data.tags.get("mlflow.parentRunId"),
                  "loss": [m.step for m in c.get_metric_history(r.info.run_id, "loss")],
                  "val": [m.step for m in c.get_metric_history(r.info.run_id, "val_psnr")]}} for r in runs]
print(json.dumps(out))
"""))  # fmt: skip
    pre = {r["name"]: r for r in report["cluster-pretrain"]}
    assert set(pre) == {"cluster-pretrain", "job-pretrain"}
    assert all(r["status"] == "FINISHED" and r["loss"] == [1, 2, 3, 4, 5, 6] for r in pre.values()), pre
    sweep = report["cluster-sweep"]
    nested = [r for r in sweep if r["parent"]]
    assert len(sweep) == 3 and len(nested) == 2 and all(r["status"] == "FINISHED" for r in sweep), sweep
    per_round = TINY_OBJECTIVE["steps_per_round"]
    assert all(r["val"] == [per_round * (k + 1) for k in range(TINY_OBJECTIVE["rounds"])] for r in nested), nested
    store = (node / ".rcl_dist/mlflow_server/mlflow.log").read_text()
    assert "Traceback" not in store and "database is locked" not in store

    # down: the head's MLflow and PostgreSQL stopped, then Ray; nothing but the namespace's init is left
    t4 = time.perf_counter()
    _run([RAY, "exec", cfg, "~/rcl-dist/cluster/mlflow_server.sh stop"], 120)
    _run([RAY, "down", "-y", cfg], 300)
    timings["down"] = time.perf_counter() - t4
    left = []
    for _ in range(30):
        ps = subprocess.run(["nsenter", "-t", str(head["ns_pid"]), "-p", "-m", "ps", "-eo", "pid=,stat=,comm="],
                            capture_output=True, text=True).stdout.split("\n")  # fmt: skip
        left = [line for line in ps if line.strip() and not line.split()[1].startswith("Z")
                and line.split()[0] != "1" and line.split()[-1] != "ps"]  # fmt: skip
        if not left:
            break
        time.sleep(1)
    assert not left, left
    print("cluster launcher timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
