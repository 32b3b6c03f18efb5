"""Gathered negatives: 2 gloo processes with an autograd gather give the same loss and the same
parameter update as 1 process on the concatenated batch; a plain all_gather would not."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from rcl_dist.dist import all_reduce_mean, gather_with_grad, make_key_gather, rank, world_size
from rcl_dist.losses.contrastive import ResidualContrastiveLoss
from rcl_dist.losses.objectives import RCLObjective
from rcl_dist.models import build_model

B_LOCAL, WS = 3, 2


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    scale = torch.linspace(0.05, 0.3, B_LOCAL * WS).view(-1, 1, 1, 1)
    q = 0.5 + scale * torch.randn(B_LOCAL * WS, 3, 16, 16, generator=g)
    k = 0.5 + scale * torch.randn(B_LOCAL * WS, 3, 16, 16, generator=g)
    return {"q": q, "k": k}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("unet", width=4, depth=2)


def _objective(reduction: str) -> RCLObjective:
    return RCLObjective(ResidualContrastiveLoss("emd", temperature=0.05, reduction=reduction), None, alpha=1.0)


def _step(model, params, obj, batch, **kw):
    out = obj(model, batch, **kw)
    out["loss"].backward()
    grads = [p.grad.detach().clone() for p in params]
    # SGD: the update is the gradient itself. (Adam's first step is lr * sign(g) for tiny g, which
    # turns float32 summation-order noise in near-zero gradients into full-size differences.)
    opt = torch.optim.SGD(params, lr=0.1)
    opt.step()
    return out, grads, [p.detach().clone() for p in params]


def _worker(r: int, init_file: str, reduction: str, result: dict) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WS)
    try:
        assert rank() == r and world_size() == WS
        model = _model()
        ddp = DDP(model)
        batch = {k: v[r * B_LOCAL : (r + 1) * B_LOCAL] for k, v in _batch().items()}

        class Wrapped(torch.nn.Module):  # the objective calls model(x) and model.residual(x, out)
            def forward(self, x):
                return ddp(x)

            def residual(self, x, out):
                return model.residual(x, out)

        out, grads, params = _step(
            Wrapped(), list(model.parameters()), _objective(reduction), batch,
            key_gather=make_key_gather(), world_size=WS,
        )
        contrast = out["contrast"].detach().clone()
        dist.all_reduce(contrast)  # the global objective: sum of the ranks' terms (sum reduction)
        if reduction == "mean":
            contrast /= WS
        means = all_reduce_mean({"x": float(r)})
        if r == 0:
            result.update(contrast=contrast.item(), grads=grads, params=params, mean=means["x"])
    finally:
        # every rank done communicating before any tears down: a peer closing its sockets while the
        # other still reads makes gloo abort the process
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_two_ranks_equal_one_rank_on_concatenated_batch(tmp_path, reduction):
    model = _model()
    ref_out, ref_grads, ref_params = _step(model, list(model.parameters()), _objective(reduction), _batch())
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), reduction, result), nprocs=WS, join=True)
        result = dict(result)
    assert result["contrast"] == pytest.approx(ref_out["contrast"].item(), rel=1e-5)
    gmax = max(g.abs().max().item() for g in ref_grads)
    for g, rg in zip(result["grads"], ref_grads):
        # float32: conv kernels differ with batch size, so near-tied residual values can sort in
        # another order and route a tiny gradient to a neighbouring pixel (and the head bias gradient is
        # analytically ~0: EMD is shift-invariant, so it is pure rounding); the update below is the spec
        assert torch.allclose(g, rg, rtol=1e-3, atol=5e-4 * gmax)
    for p, rp in zip(result["params"], ref_params):
        assert torch.allclose(p, rp, rtol=0, atol=1e-5)
    assert result["mean"] == pytest.approx(0.5)


def _plain_gather_worker(r: int, init_file: str, result: dict) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WS)
    try:
        x = torch.full((2, 3), float(r + 1), requires_grad=True)
        # with gradients: d/dx_r of sum_over_ranks(sum(w * gathered)) = sum of the ranks' weights
        w = torch.arange(WS * 2, dtype=torch.float32).view(-1, 1) * (r + 1)
        (gather_with_grad(x) * w).sum().backward()
        ok_grad = x.grad.clone()
        # a plain all_gather has no autograd history: the remote contributions are lost
        parts = [torch.empty_like(x) for _ in range(WS)]
        dist.all_gather(parts, x.detach())
        parts[r] = x  # the usual "swap the local slot back" pattern
        x.grad = None
        (torch.cat(parts) * w).sum().backward()
        result[r] = (ok_grad, x.grad.clone())
    finally:
        # every rank done communicating before any tears down: a peer closing its sockets while the
        # other still reads makes gloo abort the process
        dist.barrier()
        dist.destroy_process_group()


def test_gather_backward_sums_remote_gradients(tmp_path):
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_plain_gather_worker, args=(str(tmp_path / "init"), result), nprocs=WS, join=True)
        result = dict(result)
    for r in range(WS):
        ok_grad, plain_grad = result[r]
        rows = torch.arange(r * 2, r * 2 + 2, dtype=torch.float32).view(-1, 1)
        expected = rows * sum(q + 1 for q in range(WS))  # every rank's weight on this rank's rows
        assert torch.allclose(ok_grad, expected.expand(2, 3))
        assert not torch.allclose(plain_grad, expected.expand(2, 3))  # local-only gradient


def test_single_process_helpers_are_identity():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x and rank() == 0 and world_size() == 1
    keys, pos = make_key_gather()(x)
    assert keys is x and pos.tolist() == [0, 1, 2]
    assert all_reduce_mean({"a": 2.0}) == {"a": 2.0}
