"""The one builder of Ray Train's ``TorchTrainer`` for every job (pre-training, fine-tuning, sweep trials).

Each job differs only in its worker function, its loop config, and a few run settings; the scaling
(``workers`` x ``cpus_per_worker``, one GPU each with ``use_gpu``), the process-group backend (NCCL on
GPUs, gloo on CPUs), the storage layout and the logging level are the same for all, so they are set
here once. The process group's rendezvous opens no socket on a local Ray
(:mod:`rcl_dist.train.rendezvous`). Where Ray runs no dashboard (the local Ray), Ray Train's
placement-group cleaner is left out: it polls the state API that only the dashboard serves, so
there every poll failed (a warning a second) and it could never act; ``ray.shutdown`` removes a
local run's placement groups anyway.
"""

from __future__ import annotations

from typing import Any, Callable

import ray._private.worker
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

__all__ = ["make_torch_trainer"]


def make_torch_trainer(
    train_func: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    name: str,
    storage_path: str,
    num_to_keep: int,
    max_failures: int,
    env: dict[str, str] | None = None,
    callbacks: list | None = None,
):
    """A ``TorchTrainer`` running ``train_func(loop_config)`` on ``workers`` Ray Train workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig

    from rcl_dist.console import ray_env, verbose
    from rcl_dist.train.rendezvous import LocalTorchConfig

    return _trainer_class()(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        torch_config=LocalTorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=FailureConfig(max_failures=max_failures),
            # the console settings travel with the workers too: Ray may have been started elsewhere
            worker_runtime_env={"env_vars": {**ray_env(local=False), **(env or {})}},
            callbacks=callbacks or None,
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),  # rank 0 prints progress
        ),
    )


class _NoStateApiTorchTrainer(TorchTrainer):
    """``TorchTrainer`` without the placement-group cleaner, for a Ray that serves no state API."""

    def _create_default_callbacks(self):
        return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]


def _trainer_class() -> type:
    return TorchTrainer if ray._private.worker.get_dashboard_url() else _NoStateApiTorchTrainer
