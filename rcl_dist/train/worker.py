"""A Ray Train worker's set-up, shared by pre-training and fine-tuning: its rank, world size and
device (subnormal floats flushed: they stall CPU convolutions), Ray Train's routine logging quieted,
the model's placement and memory format, and the DDP wrapper that keeps the inner model's
residual/restore rules."""

from __future__ import annotations

import torch
import torch.nn as nn


class DDPRestorer(nn.Module):
    """Calls go through the DDP wrapper (gradient sync); residual/restore use the inner model's rules."""

    def __init__(self, ddp: nn.Module, inner: nn.Module) -> None:
        super().__init__()
        self.ddp, self.inner = ddp, inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ddp(x)

    def residual(self, x: torch.Tensor, output: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.residual(x, self(x) if output is None else output)

    def restore(self, x: torch.Tensor, output: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.restore(x, self(x) if output is None else output)


def place_model(model: nn.Module, channels_last: bool, device: torch.device) -> nn.Module:
    """``model`` on ``device``, with channels_last weights when ``channels_last`` (``dist.channels_last``).

    NHWC convolutions are faster on GPUs (cuDNN) and, measured, on CPUs too (oneDNN): the default
    U-Net's forward + backward at 64x64 ran 1.4x faster on one core (benchmarks/results/
    step_profile_cpu.md). Inputs may stay NCHW: a convolution with channels_last weights works in
    NHWC and so does everything after it. The values are those of the usual layout up to float rounding.
    """
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def worker_setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker, with subnormal floats flushed to zero
    (see train/local.py: subnormals stall CPU convolutions). Pre-training and fine-tuning workers."""
    import ray.train
    import ray.train.torch

    from rcl_dist.console import quiet_train_worker

    quiet_train_worker()
    ctx = ray.train.get_context()
    torch.set_flush_denormal(True)
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
