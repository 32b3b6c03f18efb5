"""Where the workers' process group meets: a file on a local Ray, TCP on a cluster.

Ray Train's ``TorchConfig`` rendezvouses through torch's TCPStore on the rank-0 worker, and the
TCPStore server listens on every interface whatever host it is given (checked with torch 2.13, both
the libuv and the classic server). On a local Ray (rank 0 on a loopback node, so every worker on this
machine) :class:`LocalTorchConfig` meets through a fresh file instead (``init_method="file://..."``,
torch's FileStore): no listening socket at all. gloo's own connections are kept on loopback by
``GLOO_SOCKET_IFNAME=lo`` (and NCCL's bootstrap by ``NCCL_SOCKET_IFNAME=lo``), set by
``rcl_dist.train.launch.ensure_ray``. On a cluster, whose nodes must reach rank 0, Ray's own TCP
rendezvous is kept. This module imports Ray; import it only where a trainer is built.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import uuid
from dataclasses import dataclass

import ray
from ray.train._internal.utils import get_address_and_port
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

__all__ = ["LocalTorchConfig", "is_loopback"]


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP literal or ``localhost``) is a loopback address."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class _FileRendezvousBackend(_TorchBackend):
    """Ray's torch backend, with the process group set up through a file when rank 0 is on loopback."""

    def on_start(self, worker_group, backend_config) -> None:
        address, _ = worker_group.execute_single(0, get_address_and_port)
        if not is_loopback(address):
            return super().on_start(worker_group, backend_config)
        # one file per worker group: a group restarted after a failure meets in a new one
        self._store_file = os.path.join(tempfile.gettempdir(), f"rcl-dist-pg-{uuid.uuid4().hex}")
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        n = len(worker_group)
        ray.get([
            worker_group.execute_single_async(
                i, _setup_torch_process_group, backend=backend_config.backend, world_rank=i, world_size=n,
                init_method="file://" + self._store_file, timeout_s=backend_config.timeout_s,
            )
            for i in range(n)
        ])  # fmt: skip

    def on_shutdown(self, worker_group, backend_config) -> None:
        super().on_shutdown(worker_group, backend_config)
        store_file = getattr(self, "_store_file", None)
        if store_file and os.path.exists(store_file):
            os.remove(store_file)


@dataclass
class LocalTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group meets through a file on a local (loopback) Ray."""

    @property
    def backend_cls(self):
        return _FileRendezvousBackend
