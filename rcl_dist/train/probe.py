"""Fitting a fresh last layer on a frozen body: the proxy evaluation of Sec. 4, solved instead of guessed.

Proxy evaluation freezes every weight of the pre-trained network but the last layer and fits a fresh
task layer on a few labels (Sec. 4: L1). This module is the one place that fits such a layer;
``rcl-dist finetune --mode proxy``, the sweep's validator, the fidelity harness and the demo all call
:func:`fit_head`. Every head is a ``k x k`` convolution (then a pixel shuffle), so its output is linear
in its weights and the restored image affine in the head's output: the label fit is a least-squares
problem on the body's cached features, solved in closed form (``lstsq``) and refined towards the
paper's L1 by iteratively reweighted least squares (``lstsq+l1``, the default). Adam from a random
start needs thousands of steps to get there (``adam``, kept for comparison). Distributed, every sum
goes through ``reduce``, so every rank installs the same head. The derivation and the fits:
``docs/probe.md``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PROBE_FITS", "ProbeOptions", "ProbeFeatures", "ProbeTrace", "cache_features", "fit_head", "head_design"]

PROBE_FITS: tuple[str, ...] = ("lstsq", "lstsq+l1", "adam")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-7  # Sec. 4

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ProbeOptions:
    """How a fresh last layer is fitted (see ``docs/probe.md``); validated on construction."""

    fit: str = "lstsq+l1"  # "lstsq" | "lstsq+l1" | "adam"
    ridge: float = 1e-6  # lambda = ridge * mean(diag(X^T X)) (and at least ridge)
    tol: float = 1e-4  # lstsq+l1: stop when the best label L1 improved by less than this (relative) ...
    window: int = 3  # ... over this many IRLS iterations
    max_iters: int = 30  # lstsq+l1: IRLS iteration cap
    delta: float = 1e-3  # lstsq+l1: IRLS weights 1 / max(|r|, delta) (residuals on the [0, 1] scale)
    steps: int = 300  # adam: optimiser steps
    lr: float = 1e-3  # adam: Sec. 4
    batch_size: int = 16  # adam: label crops per step (per rank)
    seed: int = 0  # adam: minibatch order
    chunk_elements: int = 1 << 22  # unfolded float64 values per chunk (bounds the solve's memory)

    def __post_init__(self) -> None:
        if self.fit not in PROBE_FITS:
            raise ValueError(f"fit must be one of {list(PROBE_FITS)}, got {self.fit!r}")
        for name in ("window", "max_iters", "steps", "batch_size", "chunk_elements"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("ridge", "tol", "delta", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and v < float("inf")):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


@dataclass
class ProbeFeatures:
    """The frozen body's features on the labelled inputs and the head-space targets (``docs/probe.md``).

    ``feats`` [n, C, h, w]; ``target`` [n, O s^2, h, w] with O the head's output channels and s its
    pixel-shuffle factor.
    """

    feats: torch.Tensor
    target: torch.Tensor
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.feats.shape[0])


@dataclass
class ProbeTrace:
    """What a fit did: label L1 of the fresh head, of the closed form and at the end; iterations."""

    fit: str
    labels: int  # labelled crops (all ranks)
    unknowns: int  # weights of the head (rows of Theta) per output
    label_l1_initial: float  # the fresh head, before fitting
    lstsq_l1: float | None  # the closed-form solution (None for fit="adam")
    label_l1: float  # the installed head
    iterations: int  # IRLS iterations (lstsq+l1) or Adam steps (adam); 0 for lstsq
    converged: bool  # lstsq: True; lstsq+l1: the tolerance was met; adam: False (fixed steps)
    history: list[float] = field(default_factory=list)  # label L1 after each iteration (lstsq+l1), or every 10 steps (adam)
    feature_seconds: float = 0.0
    solve_seconds: float = 0.0  # closed form
    refine_seconds: float = 0.0  # IRLS or Adam

    @property
    def seconds(self) -> float:
        return self.feature_seconds + self.solve_seconds + self.refine_seconds

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow and result files (``probe_*``; ``label_l1`` and ``label_l1_initial``)."""
        out = {
            "label_l1": self.label_l1,
            "label_l1_initial": self.label_l1_initial,
            "probe_iterations": float(self.iterations),
            "probe_converged": float(self.converged),
            "probe_seconds": self.seconds,
            "probe_feature_seconds": self.feature_seconds,
            "probe_solve_seconds": self.solve_seconds,
            "probe_refine_seconds": self.refine_seconds,
        }
        if self.lstsq_l1 is not None:
            out["probe_lstsq_l1"] = self.lstsq_l1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seconds": self.seconds}


# ------------------------------------------------------------------------------------------ the design


def head_design(head: nn.Module) -> tuple[nn.Conv2d, int]:
    """(the head's convolution, its pixel-shuffle factor): every head of :mod:`rcl_dist.models.heads`."""
    conv = getattr(head, "conv", None)
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.stride != (1, 1) or conv.dilation != (1, 1):
        raise TypeError(f"{type(head).__name__}: a probe needs a head made of one plain conv (+ PixelShuffle)")
    k = conv.kernel_size
    if k[0] != k[1] or k[0] % 2 == 0 or conv.padding != (k[0] // 2, k[1] // 2):
        raise TypeError(f"{type(head).__name__}: a probe needs an odd square 'same' kernel, got {k}, padding {conv.padding}")
    return conv, int(getattr(head, "scale", 1))


def _theta_of(conv: nn.Conv2d) -> torch.Tensor:
    """The conv's weights as Theta [D, O'] (D = C k^2 (+1 for the bias), O' = output channels)."""
    w = conv.weight.detach().reshape(conv.out_channels, -1).t()  # [C k^2, O'] in unfold's (c, u, v) order
    if conv.bias is not None:
        w = torch.cat([w, conv.bias.detach()[None]], 0)
    return w.double()


@torch.no_grad()
def _install(conv: nn.Conv2d, theta: torch.Tensor) -> None:
    d = conv.weight[0].numel()
    conv.weight.copy_(theta[:d].t().reshape_as(conv.weight).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.copy_(theta[d].to(conv.bias.dtype))


def _rows(feats: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Unfolded design rows of a chunk of features: [b, C, h, w] -> [b h w, C k^2 (+1)] float64."""
    k = conv.kernel_size[0]
    b, c, h, w = feats.shape
    x = feats if k == 1 else F.unfold(feats, k, padding=k // 2)  # [b, C k^2, h w]
    x = x.reshape(b, -1, h * w).transpose(1, 2).reshape(b * h * w, -1).double()
    if conv.bias is not None:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
    return x


def _target_rows(target: torch.Tensor) -> torch.Tensor:
    return target.permute(0, 2, 3, 1).reshape(-1, target.shape[1]).double()  # [b, O', h, w] -> [b h w, O']


def _chunks(data: ProbeFeatures, conv: nn.Conv2d, chunk_elements: int):
    n, c, h, w = data.feats.shape
    d = conv.weight[0].numel() + (conv.bias is not None)
    per = max(1, chunk_elements // max(1, h * w * d))
    for s in range(0, n, per):
        yield _rows(data.feats[s : s + per], conv), _target_rows(data.target[s : s + per])


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# ------------------------------------------------------------------------------------------ features


@torch.no_grad()
def cache_features(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int = 16,
    device: torch.device | str | None = None,
) -> ProbeFeatures:
    """The body's features on ``inputs`` and the head-space targets of ``targets`` for the installed head.

    ``model``: a :class:`rcl_dist.models.Restorer` whose head is the one to fit (its kind and shape
    define the targets). The body runs in eval mode under ``no_grad`` in chunks of ``chunk`` inputs;
    the model's train/eval mode is restored afterwards.
    """
    t0 = time.perf_counter()
    conv, scale = head_design(model.head)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, tgts = [], []
    try:
        for s in range(0, inputs.shape[0], max(1, chunk)):
            x = inputs[s : s + chunk].to(device)
            y = targets[s : s + chunk].to(device)
            f = model.body(x)  # [b, C, h, w]
            sign, offset = model.restore_affine(x, tuple(y.shape))  # restore = sign * head + offset
            t = y if offset is None else y - offset
            t = -t if sign < 0 else t
            if scale > 1:
                t = F.pixel_unshuffle(t, scale)  # [b, O, s h, s w] -> [b, O s^2, h, w]
            if t.shape[-2:] != f.shape[-2:] or t.shape[1] != conv.out_channels:
                raise ValueError(
                    f"labels do not fit the head: features {tuple(f.shape)}, head-space targets {tuple(t.shape)} "
                    f"(head {type(model.head).__name__} with {conv.out_channels} outputs, scale {scale})"
                )
            feats.append(f.float())
            tgts.append(t.float())
    finally:
        model.train(was_training)
    return ProbeFeatures(torch.cat(feats), torch.cat(tgts), time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ fitting


def _label_l1(data: ProbeFeatures, conv: nn.Conv2d, theta: torch.Tensor, opts: ProbeOptions, reduce: Reduce) -> float:
    total = torch.zeros(2, dtype=torch.float64, device=data.feats.device)
    for x, t in _chunks(data, conv, opts.chunk_elements):
        r = x @ theta - t
        total += torch.stack([r.abs().sum(), torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device)])
    total = reduce(total)
    return float(total[0] / total[1].clamp(min=1.0))


def _solve(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    """(A + lambda I)^-1 B, lambda = ridge * mean(diag(A)) (at least ``ridge``), in float64."""
    lam = max(float(torch.diagonal(a).mean()) * ridge, ridge)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    try:
        return torch.linalg.solve(a + lam * eye, b)
    except RuntimeError:  # numerically singular even with the ridge: the minimum-norm solution
        return torch.linalg.lstsq(a + lam * eye, b).solution


def _lstsq(data: ProbeFeatures, conv: nn.Conv2d, opts: ProbeOptions, reduce: Reduce) -> torch.Tensor:
    d = conv.weight[0].numel() + (conv.bias is not None)
    a = torch.zeros(d, d, dtype=torch.float64, device=data.feats.device)
    b = torch.zeros(d, conv.out_channels, dtype=torch.float64, device=data.feats.device)
    for x, t in _chunks(data, conv, opts.chunk_elements):
        a += x.t() @ x
        b += x.t() @ t
    return _solve(reduce(a), reduce(b), opts.ridge)


def _irls_step(data: ProbeFeatures, conv: nn.Conv2d, theta: torch.Tensor, opts: ProbeOptions, reduce: Reduce) -> tuple[torch.Tensor, float]:
    """One IRLS iteration: (the new Theta, the label L1 of the *current* Theta)."""
    d, o = theta.shape
    a = torch.zeros(o, d, d, dtype=torch.float64, device=theta.device)
    b = torch.zeros(d, o, dtype=torch.float64, device=theta.device)
    total = torch.zeros(2, dtype=torch.float64, device=theta.device)
    for x, t in _chunks(data, conv, opts.chunk_elements):
        r = x @ theta - t  # [rows, O']
        total += torch.stack([r.abs().sum(), torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device)])
        wts = 1.0 / r.abs().clamp(min=opts.delta)  # [rows, O']
        for j in range(o):
            xw = x * wts[:, j : j + 1]
            a[j] += xw.t() @ x
            b[:, j] += xw.t() @ t[:, j]
    a, b, total = reduce(a), reduce(b), reduce(total)
    new = torch.stack([_solve(a[j], b[:, j : j + 1], opts.ridge)[:, 0] for j in range(o)], 1)
    return new, float(total[0] / total[1].clamp(min=1.0))


def _adam(data: ProbeFeatures, conv: nn.Conv2d, opts: ProbeOptions, reduce: Reduce, world: int, rank: int) -> list[float]:
    """Adam on the cached features (the replaced procedure); returns the minibatch L1 every 10 steps."""
    from rcl_dist.data.spec import derived_seed

    n = len(data)
    batch = min(opts.batch_size, n)
    g = torch.Generator().manual_seed(derived_seed(opts.seed, "probe-adam", str(rank)) % (1 << 62))
    params = [p for p in conv.parameters()]
    opt = torch.optim.Adam(params, lr=opts.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    order: list[int] = []
    history = []
    with torch.enable_grad():
        for step in range(1, opts.steps + 1):
            if len(order) < batch:
                order = torch.randperm(n, generator=g).tolist()
            idx, order = torch.tensor(order[:batch], device=data.feats.device), order[batch:]
            loss = F.l1_loss(conv(data.feats[idx]), data.target[idx])
            if not torch.isfinite(loss.detach()):
                raise RuntimeError(f"non-finite L1 loss at Adam step {step} of the probe: lower lr (now {opts.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for p in params:
                    p.grad = reduce(p.grad) / world
            opt.step()
            if step % 10 == 0 or step == opts.steps:
                history.append(float(loss.detach()))
    return history


def fit_head(
    model: nn.Module,
    inputs: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    options: ProbeOptions | None = None,
    *,
    features: ProbeFeatures | None = None,
    reduce: Reduce | None = None,
    rank: int = 0,
    device: torch.device | str | None = None,
    chunk: int = 16,
) -> ProbeTrace:
    """Fit ``model.head`` (already the fresh task layer) on labelled (input, target) crops; in place.

    ``inputs`` [n, C_in, h, w] and ``targets`` (the clean crops, [n, C_out, s h, s w]) are this
    rank's labels; or pass ``features`` from :func:`cache_features` to reuse them. ``reduce``: a
    sum over ranks (``None``: one process). Only the head's weights are written; the body's stay as
    they are. Returns the :class:`ProbeTrace`.
    """
    opts = options or ProbeOptions()
    reduce = reduce or _identity
    conv, _ = head_design(model.head)
    if features is None:
        if inputs is None or targets is None:
            raise ValueError("fit_head needs (inputs, targets) or features")
        features = cache_features(model, inputs, targets, chunk=chunk, device=device)
    n_labels = int(reduce(torch.tensor([float(len(features))], dtype=torch.float64, device=features.feats.device))[0])
    world = int(reduce(torch.ones(1, dtype=torch.float64, device=features.feats.device))[0])
    d = conv.weight[0].numel() + (conv.bias is not None)
    initial = _label_l1(features, conv, _theta_of(conv), opts, reduce)
    trace = ProbeTrace(opts.fit, n_labels, d, initial, None, initial, 0, False, feature_seconds=features.seconds)

    if opts.fit == "adam":
        t0 = time.perf_counter()
        trace.history = _adam(features, conv, opts, reduce, world, rank)
        trace.iterations = opts.steps
        trace.label_l1 = _label_l1(features, conv, _theta_of(conv), opts, reduce)
        trace.refine_seconds = time.perf_counter() - t0
        return trace

    t0 = time.perf_counter()
    theta = _lstsq(features, conv, opts, reduce)
    trace.lstsq_l1 = _label_l1(features, conv, theta, opts, reduce)
    trace.solve_seconds = time.perf_counter() - t0
    best, best_l1 = theta, trace.lstsq_l1
    trace.converged = opts.fit == "lstsq"
    if opts.fit == "lstsq+l1":
        t0 = time.perf_counter()
        bests = [best_l1]  # best label L1 after 0, 1, ... iterations
        current = theta
        for it in range(1, opts.max_iters + 1):
            new, current_l1 = _irls_step(features, conv, current, opts, reduce)
            if it > 1:  # current_l1 is the L1 of the previous iterate
                trace.history.append(current_l1)
                if current_l1 < best_l1:
                    best, best_l1 = current, current_l1
                bests.append(best_l1)
            current = new
            if len(bests) > opts.window and bests[-1 - opts.window] - bests[-1] <= opts.tol * bests[-1 - opts.window]:
                trace.converged = True
                break
        trace.iterations = it
        if not trace.converged:  # the last iterate has not been measured yet
            last_l1 = _label_l1(features, conv, current, opts, reduce)
            trace.history.append(last_l1)
            if last_l1 < best_l1:
                best, best_l1 = current, last_l1
        trace.refine_seconds = time.perf_counter() - t0
    _install(conv, best)
    trace.label_l1 = best_l1
    return trace
