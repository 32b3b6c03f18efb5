"""Issue 16, defect 1: during a 2-worker local run the rank-0 Ray Train worker listened on ``*:PORT``
(torch's TCPStore for the process group: its server binds every interface whatever host it is given).

A real 2-worker ``TorchTrainer`` from the project's one builder (``make_torch_trainer``) on a local Ray
runs a worker function that, with the process group up, lists the TCP sockets its own process listens
on (from ``/proc``) and checks that the group works (an all-reduce); every listening address must be
loopback. The TCPStore's behaviour itself is pinned too, so that if torch ever binds to the host it
is given, the file rendezvous can be reconsidered.
"""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path

import pytest

from servers import is_loopback_listen, listening_addresses

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")


def test_proc_reader_sees_a_wildcard_and_a_loopback_socket():
    with socket.socket() as a, socket.socket() as b:
        a.bind(("0.0.0.0", 0))
        a.listen()
        b.bind(("127.0.0.1", 0))
        b.listen()
        wide, narrow = f"0.0.0.0:{a.getsockname()[1]}", f"127.0.0.1:{b.getsockname()[1]}"
        seen = listening_addresses()
    assert wide in seen and narrow in seen
    assert not is_loopback_listen(wide) and is_loopback_listen(narrow)


def test_torch_tcpstore_listens_beyond_the_host_it_is_given():
    """Why the file rendezvous exists: TCPStore("127.0.0.1", ...) still listens on every interface."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=10))
    mine = [a for a in listening_addresses() if a.endswith(f":{store.port}")]
    assert mine and not any(is_loopback_listen(a) for a in mine), mine


def _report_sockets(config):
    import torch
    import torch.distributed as dist
    from ray import train

    assert dist.is_initialized()
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    rank = train.get_context().get_world_rank()
    record = {"rank": rank, "world": dist.get_world_size(), "sum": float(t), "listening": listening_addresses()}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))


def test_two_worker_local_run_listens_on_loopback_only(local_ray, tmp_path):
    import tempfile

    import ray

    import servers
    from rcl_dist.train.trainer import make_torch_trainer

    ray.cloudpickle.register_pickle_by_value(servers)  # the workers' function reads /proc through it

    out = tmp_path / "ranks"
    out.mkdir()
    before = set(Path(tempfile.gettempdir()).glob("rcl-dist-pg-*"))
    trainer = make_torch_trainer(
        _report_sockets, {"out": str(out)}, workers=2, use_gpu=False, cpus_per_worker=1, name="sockets",
        storage_path=str(tmp_path / "storage"), num_to_keep=1, max_failures=0,
    )  # fmt: skip
    trainer.fit()
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rec in records:
        assert rec["world"] == 2 and rec["sum"] == 3.0  # the process group works
        wide = [a for a in rec["listening"] if not is_loopback_listen(a)]
        assert not wide, f"rank {rec['rank']} listens beyond loopback: {wide}"
    assert set(Path(tempfile.gettempdir()).glob("rcl-dist-pg-*")) <= before  # the rendezvous file is removed
