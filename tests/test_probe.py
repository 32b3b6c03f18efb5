"""The probe (rcl_dist.train.probe): a fresh last layer fitted on a frozen body in closed form, then
refined towards L1; checked against exact heads, a literal brute-force solve, chunking, two gloo
ranks, and a small trained Oracle whose own last layer lies in the probe's hypothesis class."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from rcl_dist.models import Restorer, make_head
from rcl_dist.train.probe import ProbeOptions, cache_features, fit_head, head_design


class _Features(nn.Module):
    """A fixed, well-conditioned feature map that contains the input linearly: [x, sin(5x), x^2, cos(3x)]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.sin(5 * x), x * x, torch.cos(3 * x)], 1)


class Toy(Restorer):
    """A Restorer with the fixed body above (12 feature channels for RGB input)."""

    def __init__(self, kind: str = "rgb", kernel_size: int = 1, bias: bool = True, global_residual: bool = False,
                 predicts_noise: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.body = _Features()
        self.feature_channels = 12
        self.in_channels = 3
        self.global_residual = global_residual
        self.predicts_noise = predicts_noise
        kind, _, skip = kind.partition("+")  # "sr2+bicubic": an SR head over the bicubic upsampling
        kw = {"kernel_size": kernel_size, "bias": bias, **({"skip": skip} if skip else {})}
        self.head = make_head(kind, 12, 3, **kw)

    def input_skip(self, x_shape, head_shape) -> bool:
        return self.global_residual and tuple(x_shape) == tuple(head_shape)


def _true_head(model: Toy, seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    head = make_head(
        "sr2" if model.head.scale == 2 else "rgb", 12, 3, kernel_size=model.head.conv.kernel_size[0],
        bias=model.head.conv.bias is not None,
    )  # fmt: skip
    return head.double()


def _labels(model: Toy, true_head: nn.Module, n: int = 6, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the targets that ``true_head`` on the body gives through ``restore``'s affine rule."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g)
    with torch.no_grad():
        h = true_head(model.body(x).double()).float()
        sign, offset = model.restore_affine(x, tuple(h.shape))
        y = sign * h + (0 if offset is None else offset)
    return x, y


@pytest.mark.parametrize(
    "kind,k,bias,gr,noise",
    [("rgb", 1, True, False, False), ("rgb", 1, True, True, False), ("rgb", 3, False, False, True),
     ("rgb", 3, True, False, False), ("sr2", 3, True, False, False), ("sr2+bicubic", 3, True, False, False)],
)  # fmt: skip
@pytest.mark.parametrize("fit", ["lstsq", "lstsq+l1"])
def test_exact_head_is_recovered(kind, k, bias, gr, noise, fit):
    """Targets made by a known head on the body's features: the probe finds that head (1e-4)."""
    model = Toy(kind, k, bias, gr, noise)
    true = _true_head(model)
    x, y = _labels(model, true)
    trace = fit_head(model, x, y, ProbeOptions(fit=fit, ridge=1e-12))
    torch.testing.assert_close(model.head.conv.weight.double(), true.conv.weight, atol=1e-4, rtol=0)
    if bias:
        torch.testing.assert_close(model.head.conv.bias.double(), true.conv.bias, atol=1e-4, rtol=0)
    assert trace.label_l1 < 1e-5 and trace.lstsq_l1 < 1e-5 and trace.converged
    with torch.no_grad():
        torch.testing.assert_close(model.restore(x), y, atol=1e-4, rtol=0)


def _brute_force_theta(feats: np.ndarray, target: np.ndarray, k: int, scale: int, bias: bool) -> np.ndarray:
    """Least squares written out literally: one row per (image, output pixel) and output channel's
    sub-pixel phase, one column per (feature channel, kernel offset), zero padding by hand."""
    n, c, h, w = feats.shape
    out_ch = target.shape[1]
    r = k // 2
    rows, ys = [], []
    for b in range(n):
        for i in range(h):
            for j in range(w):
                row = []
                for ch in range(c):
                    for u in range(k):
                        for v in range(k):
                            ii, jj = i + u - r, j + v - r
                            row.append(feats[b, ch, ii, jj] if 0 <= ii < h and 0 <= jj < w else 0.0)
                if bias:
                    row.append(1.0)
                rows.append(row)
                # PixelShuffle: conv channel o*s^2 + a*s + p lands at output (o, s*i + a, s*j + p)
                ys.append([target[b, o, scale * i + a, scale * j + p]
                           for o in range(out_ch) for a in range(scale) for p in range(scale)])  # fmt: skip
    theta, *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
    return theta  # [C k^2 (+1), O s^2]


@pytest.mark.parametrize("kind,k", [("rgb", 3), ("sr2", 3), ("rgb", 1)])
def test_unfold_solve_equals_brute_force(kind, k):
    model = Toy(kind, k, True)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 8, 7, generator=g)  # 224 rows > 109 unknowns of a 3x3 head on 12 channels
    y = torch.rand(4, 3, 8 * model.head.scale, 7 * model.head.scale, generator=g)  # arbitrary targets
    fit_head(model, x, y, ProbeOptions(fit="lstsq", ridge=1e-13))
    with torch.no_grad():
        feats = model.body(x).double().numpy()
    theta = _brute_force_theta(feats, y.double().numpy(), k, model.head.scale, True)
    conv, _ = head_design(model.head)
    got_w = conv.weight.detach().double().reshape(conv.out_channels, -1).t().numpy()
    np.testing.assert_allclose(got_w, theta[:-1], atol=2e-4)
    np.testing.assert_allclose(conv.bias.detach().double().numpy(), theta[-1], atol=2e-4)


def test_chunked_normal_equations_equal_unchunked():
    model = Toy("sr2", 3, True)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(5, 3, 8, 8, generator=g), torch.rand(5, 3, 16, 16, generator=g)
    feats = cache_features(model, x, y, chunk=2)
    whole = cache_features(model, x, y, chunk=100)
    torch.testing.assert_close(feats.feats, whole.feats)
    weights = {}
    for name, elements in (("tiny", 1), ("mid", 8 * 8 * 109 * 2), ("all", 1 << 30)):
        model.replace_head(make_head("sr2", 12, 3))
        trace = fit_head(model, options=ProbeOptions(fit="lstsq+l1", chunk_elements=elements), features=feats)
        weights[name] = (model.head.conv.weight.detach().clone(), trace.label_l1)
    for name in ("tiny", "mid"):
        torch.testing.assert_close(weights[name][0], weights["all"][0], atol=1e-6, rtol=0)
        assert math.isclose(weights[name][1], weights["all"][1], rel_tol=1e-9)


def test_refinement_lowers_l1_and_stops_by_its_tolerance():
    model = Toy("rgb", 1, True)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(8, 3, 16, 16, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g).pow(3)).clamp(0, 1)  # heavy-tailed errors: L1 != L2
    trace = fit_head(model, x, y, ProbeOptions(fit="lstsq+l1", tol=1e-6, window=3, max_iters=200))
    assert trace.label_l1 < trace.lstsq_l1 < trace.label_l1_initial
    assert trace.converged and 3 < trace.iterations < 200 and len(trace.history) >= 3
    capped = Toy("rgb", 1, True)
    t2 = fit_head(capped, x, y, ProbeOptions(fit="lstsq+l1", tol=1e-12, max_iters=2))
    assert not t2.converged and t2.iterations == 2 and t2.label_l1 <= t2.lstsq_l1


def test_sr_probe_over_bicubic_never_ends_below_bicubic_on_its_labels():
    """With skip="bicubic" the zero head is the bicubic baseline and lies in the ridge problem's search
    space: the least-squares head's label MSE is at most bicubic's, however poor the features. Without
    the skip the same features must rebuild the whole image (the SR rows below bicubic)."""
    g = torch.Generator().manual_seed(5)
    hr = F.avg_pool2d(torch.rand(6, 3, 48, 48, generator=g), 3, 1, 1)  # smooth HR crops
    x = F.interpolate(hr, size=(24, 24), mode="bicubic", antialias=True, align_corners=False)  # the task's LR input
    bicubic = F.interpolate(x, size=(48, 48), mode="bicubic", align_corners=False)
    mse_bicubic = float(((bicubic - hr) ** 2).mean())
    skip, plain = Toy("sr2+bicubic", 3, True), Toy("sr2", 3, True)
    for model in (skip, plain):
        fit_head(model, x, hr, ProbeOptions(fit="lstsq", ridge=1e-6))
    with torch.no_grad():
        mse_skip = float(((skip.restore(x) - hr) ** 2).mean())
        mse_plain = float(((plain.restore(x) - hr) ** 2).mean())
    assert mse_skip <= mse_bicubic * (1 + 1e-6), (mse_skip, mse_bicubic)
    assert mse_skip < mse_plain, (mse_skip, mse_plain)


def test_fitting_never_changes_the_body():
    from rcl_dist.models import UNet

    torch.manual_seed(0)
    model = UNet(width=4, depth=2)
    body = {k: v.clone() for k, v in model.body.state_dict().items()}
    x, y = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    model.train()
    for fit in ("lstsq", "lstsq+l1", "adam"):
        model.replace_head(model.new_head("rgb", 3))
        fit_head(model, x, y, ProbeOptions(fit=fit, steps=5))
        for k, v in model.body.state_dict().items():
            assert torch.equal(v, body[k]), f"fit {fit} changed body weight {k}"
    assert model.training  # the caller's mode is restored


def test_adam_option_is_the_old_procedure_and_far_from_the_solve():
    model = Toy("rgb", 1, True)
    true = _true_head(model)
    x, y = _labels(model, true)
    trace = fit_head(model, x, y, ProbeOptions(fit="adam", steps=30, lr=1e-3, batch_size=2))
    assert trace.lstsq_l1 is None and trace.iterations == 30 and not trace.converged
    assert trace.label_l1 < trace.label_l1_initial and trace.label_l1 > 1e-3  # 30 steps: nowhere near exact


def _dist_worker(r: int, init_file: str, world: int, out: dict) -> None:
    from rcl_dist.dist import all_reduce_sum

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=world)
    try:
        model = Toy("sr2", 3, True)
        g = torch.Generator().manual_seed(7)
        x, y = torch.rand(6, 3, 6, 6, generator=g), torch.rand(6, 3, 12, 12, generator=g)
        trace = fit_head(model, x[r::world], y[r::world], ProbeOptions(fit="lstsq+l1"), reduce=all_reduce_sum, rank=r)
        out[r] = (model.head.conv.weight.detach().clone(), trace.label_l1, trace.labels)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_fit_the_head_of_the_whole_label_set(tmp_path):
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), 2, out), nprocs=2, join=True)
    model = Toy("sr2", 3, True)
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(6, 3, 6, 6, generator=g), torch.rand(6, 3, 12, 12, generator=g)
    trace = fit_head(model, x, y, ProbeOptions(fit="lstsq+l1"))
    for r in (0, 1):
        w, l1, n = out[r]
        assert n == 6
        torch.testing.assert_close(w, model.head.conv.weight.detach(), atol=1e-5, rtol=0)
        assert math.isclose(l1, trace.label_l1, rel_tol=1e-6)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / F.mse_loss(a.clamp(0, 1), b)))


@pytest.mark.parametrize("global_residual", [False, True])
def test_proxy_of_a_trained_oracle_matches_its_own_head(global_residual):
    """A supervised U-Net's own last layer lies in the probe's class: a fresh head fitted on the
    labelled set restores that set no more than 0.1 dB worse than the network's own head."""
    from rcl_dist.config import load_config
    from rcl_dist.data.images import bundled_images
    from rcl_dist.data.sampler import PairSampler
    from rcl_dist.train.local import train_local

    cfg = load_config(None, [
        "model.width=8", "model.depth=2", f"model.global_residual={str(global_residual).lower()}", "data.crop=32",
        "data.tile=0", "loss.method=supervised", "loss.encoder=null", "train.steps=60", "train.batch_size=4",
        "train.log_every=60", "tracking.enabled=false",
    ])  # fmt: skip
    images = bundled_images()[:4]
    model, _ = train_local(cfg, images=images, log=None)
    sampler = PairSampler(images, crop=32, sampler_options={"sigma_min": 0.0, "sigma_max": 20 / 255},
                          generator=torch.Generator().manual_seed(11))  # fmt: skip
    batches = [sampler.sample(4, "clean") for _ in range(6)]  # 24 labelled crops of the 4 images
    x, y = torch.cat([b["input"] for b in batches]), torch.cat([b["target"] for b in batches])
    model.eval()
    with torch.no_grad():
        own = _psnr(model.restore(x), y)
    model.replace_head(model.new_head("rgb", 3))
    model.freeze_all_but_head()
    trace = fit_head(model, x, y)
    with torch.no_grad():
        probe = _psnr(model.restore(x), y)
    assert probe >= own - 0.1, (own, probe, trace)
    if global_residual:  # a zero head (the identity) is in the class: the fit cannot be below the input
        assert probe > _psnr(x, y)
