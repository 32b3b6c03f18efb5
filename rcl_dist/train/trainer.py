"""The one builder of Ray Train's ``TorchTrainer`` for every job (pre-training, fine-tuning, sweep trials).

Each job differs only in its worker function, its loop config, and a few run settings; the scaling
(``workers`` x ``cpus_per_worker``, one GPU each with ``use_gpu``), the process-group backend (NCCL on
GPUs, gloo on CPUs), the storage layout and the logging level are the same for all, so they are set
here once. The process group's rendezvous opens no socket on a local Ray
(:mod:`rcl_dist.train.rendezvous`).
"""

from __future__ import annotations

from typing import Any, Callable

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
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from rcl_dist.train.rendezvous import LocalTorchConfig

    return TorchTrainer(
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
            worker_runtime_env={"env_vars": env} if env else None,
            callbacks=callbacks or None,
            logging_config=LoggingConfig(log_level="WARNING"),  # progress comes from rank 0's own lines
        ),
    )
