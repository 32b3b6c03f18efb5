"""Eq. 6 and the baseline objectives through one interface, on real models and losses."""

from __future__ import annotations

import pytest
import torch

from rcl_dist.losses.baselines import Noise2SelfMasker
from rcl_dist.losses.consistency import ConsistencyLoss, RawConsistencyLoss, build_encoder
from rcl_dist.losses.contrastive import ResidualContrastiveLoss
from rcl_dist.losses.objectives import METHODS, RCLObjective, build_objective
from rcl_dist.models import build_model
from rcl_dist.noise import mosaic, pack_bayer


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return build_model("unet", width=8, depth=2)


@pytest.fixture
def random_consistency():
    # random weights, explicitly: these tests check the plumbing, not ImageNet features
    return ConsistencyLoss(build_encoder("efficientnet_lite0", weights=None))


def test_total_objective_is_alpha_contrast_plus_consistency(unet, random_consistency, rng):
    batch = {"q": torch.rand(4, 3, 16, 16, generator=rng), "k": torch.rand(4, 3, 16, 16, generator=rng)}
    contrastive = ResidualContrastiveLoss("emd", temperature=0.1)
    out = RCLObjective(contrastive, random_consistency, alpha=0.01)(unet, batch)
    with torch.no_grad():
        res_q, res_k = unet.residual(batch["q"]), unet.residual(batch["k"])
        expected_c = contrastive(res_q, res_k)
        x = torch.cat([batch["q"], batch["k"]])
        expected_cons = random_consistency(x, unet(x))
    assert out["contrast"].item() == pytest.approx(expected_c.item(), rel=1e-5)
    assert out["consistency"].item() == pytest.approx(expected_cons.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.01 * expected_c.item() + expected_cons.item(), rel=1e-5)
    assert out["dist_neg"] > 0 and out["sketch_k"].shape[0] == 4
    out["loss"].backward()
    assert all(p.grad is not None for p in unet.parameters())


def test_key_gather_hook_and_extra_negatives(unet, rng):
    batch = {"q": torch.rand(3, 3, 16, 16, generator=rng), "k": torch.rand(3, 3, 16, 16, generator=rng)}
    obj = RCLObjective(ResidualContrastiveLoss(temperature=0.2), None, alpha=1.0)
    plain = obj(unet, batch)["loss"]
    # a gather that returns the local keys unchanged with the identity positives gives the same loss
    same = obj(unet, batch, key_gather=lambda s: (s, torch.arange(s.shape[0])))["loss"]
    assert same.item() == pytest.approx(plain.item(), rel=1e-6)
    extra = obj(unet, batch, extra_negatives=torch.randn(5, 3, 256))["loss"]
    assert extra.item() > plain.item()  # more negatives in the denominator


def test_raw_model_uses_raw_residual_and_eq11(rng):
    model = build_model("unet", in_channels=4, out_channels=3, width=8, depth=2, head="raw2rgb", raw="packed")
    rgb = torch.rand(4, 3, 32, 32, generator=rng)
    x = pack_bayer(mosaic(rgb))
    obj = RCLObjective(ResidualContrastiveLoss(), RawConsistencyLoss(), alpha=1e-3)
    out = obj(model, {"q": x, "k": x.roll(1, 0)})
    assert torch.isfinite(out["loss"]) and out["consistency"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_through_one_interface(method, unet, random_consistency, rng):
    obj = build_objective(method, consistency=random_consistency, generator=torch.Generator().manual_seed(0))
    clean = torch.rand(4, 3, 16, 16, generator=rng)
    noisy = clean + 0.05 * torch.randn(4, 3, 16, 16, generator=rng)
    pool = {"q": noisy, "k": noisy.flip(-1), "noisy": noisy, "noisy2": clean + 0.05 * torch.randn_like(clean), "input": noisy, "target": clean}
    batch = {k: pool[k] for k in obj.required_keys}
    out = obj(unet, batch)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert sum(p.grad.abs().sum() for p in unet.parameters() if p.grad is not None) > 0


def test_build_objective_errors(random_consistency):
    with pytest.raises(ValueError, match="unknown method"):
        build_objective("simclr")
    with pytest.raises(ValueError, match="consistency"):
        build_objective("consistency")
    with pytest.raises(ValueError, match="alpha"):
        RCLObjective(ResidualContrastiveLoss(), None, alpha=-1)


def test_noise2self_mask_is_j_invariant(rng):
    """The masked input at hidden pixels does not depend on those pixels' own values."""
    masker = Noise2SelfMasker(grid=3)
    x = torch.rand(1, 2, 9, 9, generator=rng)
    for phase in range(masker.phases):
        xm, m = masker.apply(x, phase)
        x2 = x + 10.0 * m  # change only the hidden pixels
        xm2, _ = masker.apply(x2, phase)
        assert torch.allclose(xm * m, xm2 * m)  # hidden positions unchanged by their own values
        assert torch.equal(xm * (1 - m), x * (1 - m))  # visible pixels untouched
    assert sum(masker.mask(x.shape, p, x.device, x.dtype) for p in range(9)).eq(1).all()  # phases tile the image
