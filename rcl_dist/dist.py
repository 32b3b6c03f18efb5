"""Distributed helpers that also work in one process (no ``torch.distributed`` initialised).

The negatives of the contrastive loss (Eq. 3) come from every worker: each worker sketches its own
key crops, then :func:`gather_with_grad` concatenates the sketches of all workers. A plain
``all_gather`` returns tensors without autograd history, so the gradient of a worker's loss with
respect to *another* worker's keys would be silently dropped; here the backward pass all-reduces
(sums) the gradient of the gathered tensor over workers and hands each worker its own slice, which
is exactly the gradient of the global objective with respect to that worker's keys.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "gather_with_grad", "all_reduce_mean", "make_key_gather"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the incoming gradients over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ws = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.ws = dist.get_rank(), ws
        return torch.cat(parts)  # [ws * B, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        # every rank's loss may depend on every rank's slice: sum those contributions
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(ctx.ws)[ctx.rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank (rank order) -> [world_size * B, ...], with gradients.

    All ranks must pass the same shape (the pipelines drop partial batches so that they do).
    In one process this is ``x`` itself.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def make_key_gather():
    """The ``key_gather`` hook of :class:`rcl_dist.losses.objectives.RCLObjective`.

    Local key sketches [B, ...] -> (keys of all ranks [W*B, ...], index of each local query's positive
    among them: rank * B + j).
    """

    def key_gather(s_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = gather_with_grad(s_k)
        b = s_k.shape[0]
        return keys, torch.arange(b, device=s_k.device) + rank() * b

    return key_gather


@torch.no_grad()
def all_reduce_mean(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Mean over ranks of scalar metrics (identity in one process)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over every rank (a new tensor; ``t`` itself when not distributed)."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    torch.distributed.all_reduce(out)
    return out
