"""Diagnostics of the RCL objective and the median temperature scale, against literal references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from rcl_dist.config import ConfigError, load_config
from rcl_dist.losses.contrastive import ResidualContrastiveLoss
from rcl_dist.losses.diagnostics import gradient_norms, logit_stats, residual_noise_distance
from rcl_dist.losses.distances import get_distance
from rcl_dist.losses.objectives import RCLObjective
from rcl_dist.models import build_model


def _literal_gap(dist: torch.Tensor, tau: float) -> float:
    b, k = dist.shape
    gaps = []
    for j in range(b):
        negs = [float(dist[j, i]) for i in range(k) if i != j]
        gaps.append((sum(negs) / len(negs) - float(dist[j, j])) / tau)
    return sum(gaps) / len(gaps)


def test_logit_gap_and_uniform_loss_match_literal_definitions():
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(5, 9, generator=g)
    st = logit_stats(dist, 0.1, reduction="sum")
    assert st["logit_gap"] == pytest.approx(_literal_gap(dist, 0.1), rel=1e-9)
    assert st["contrast_uniform"] == pytest.approx(5 * math.log(9))
    assert logit_stats(dist, 0.1, reduction="mean")["contrast_uniform"] == pytest.approx(math.log(9))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("scale", ["fixed", "median"])
def test_equal_distances_give_exactly_the_uniform_guess(reduction, scale):
    loss = ResidualContrastiveLoss("emd", 0.1, reduction, temperature_scale=scale)
    dist = torch.full((4, 7), 0.3)
    st = logit_stats(dist, float(loss.effective_temperature(dist)), reduction=reduction)
    assert float(loss.info_nce(dist)) == pytest.approx(st["contrast_uniform"], rel=1e-6)
    assert st["logit_gap"] == 0.0


def test_median_scale_is_the_median_negative_distance_and_makes_the_loss_scale_free():
    g = torch.Generator().manual_seed(1)
    dist = torch.rand(4, 6, generator=g) * 1e-3
    loss = ResidualContrastiveLoss("emd", 0.5, "sum", temperature_scale="median")
    negs = sorted(float(dist[j, i]) for j in range(4) for i in range(6) if i != j)
    lower_median = negs[(len(negs) - 1) // 2]  # torch.median returns the lower of the two middle values
    assert float(loss.effective_temperature(dist)) == pytest.approx(0.5 * lower_median, rel=1e-6)
    assert float(loss.info_nce(dist * 1000)) == pytest.approx(float(loss.info_nce(dist)), rel=1e-5)
    fixed = ResidualContrastiveLoss("emd", 0.5, "sum")
    assert float(fixed.info_nce(dist * 1000)) != pytest.approx(float(fixed.info_nce(dist)), rel=1e-3)


def test_median_scale_is_detached():
    dist = (torch.rand(3, 5) + 0.1).requires_grad_()
    loss = ResidualContrastiveLoss("emd", 0.2, "sum", temperature_scale="median")
    tau = loss.effective_temperature(dist).item()
    loss.info_nce(dist).backward()
    ref = dist.detach().clone().requires_grad_()
    nn.functional.cross_entropy(-ref / tau, torch.arange(3), reduction="sum").backward()
    assert torch.allclose(dist.grad, ref.grad, atol=1e-6)


def test_unknown_temperature_scale_is_rejected_by_the_loss_and_the_config():
    with pytest.raises(ValueError, match="temperature_scale"):
        ResidualContrastiveLoss("emd", 0.1, "sum", temperature_scale="mean")
    with pytest.raises(ConfigError, match="loss.temperature_scale"):
        load_config(None, ["loss.temperature_scale=mean"])


def test_gradient_norms_equal_backward_and_leave_grad_untouched():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x = torch.randn(8, 3)
    y = lin(x)
    terms = {"a": y.pow(2).sum(), "b": 3 * y.sum()}
    norms = gradient_norms(terms, lin.parameters())
    assert all(p.grad is None for p in lin.parameters())
    for name, term in terms.items():
        lin.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        ref = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in lin.parameters()))
        assert norms[name] == pytest.approx(ref, rel=1e-6)


class _MeanSquare(nn.Module):
    """A stand-in for Eq. 5 with the same call (input, restored) -> scalar."""

    def forward(self, x, restored):
        return (x - restored).pow(2).mean()


def test_rcl_gradient_diagnostics_scale_with_alpha_and_touch_no_gradients():
    torch.manual_seed(0)
    model = build_model("unet", width=8, depth=2, global_residual=False)
    batch = {"q": torch.rand(4, 3, 16, 16), "k": torch.rand(4, 3, 16, 16)}
    contrastive = ResidualContrastiveLoss("emd", 0.1, "sum", quantiles=16)
    d1 = RCLObjective(contrastive, _MeanSquare(), alpha=1e-3).gradient_diagnostics(model, batch)
    d2 = RCLObjective(contrastive, _MeanSquare(), alpha=2e-3).gradient_diagnostics(model, batch)
    assert d2["grad_contrast"] == pytest.approx(2 * d1["grad_contrast"], rel=1e-5)
    assert d2["grad_consistency"] == pytest.approx(d1["grad_consistency"], rel=1e-6)
    assert d1["grad_ratio"] == pytest.approx(d1["grad_contrast"] / d1["grad_consistency"], rel=1e-9)
    assert d1["grad_contrast"] > 0 and d1["grad_consistency"] > 0
    assert all(p.grad is None for p in model.parameters())


def test_objective_reports_logit_gap_uniform_loss_and_effective_tau():
    torch.manual_seed(0)
    model = build_model("unet", width=8, depth=2)
    batch = {"q": torch.rand(4, 3, 16, 16), "k": torch.rand(4, 3, 16, 16)}
    out = RCLObjective(ResidualContrastiveLoss("bd", 0.1, "sum"), None, alpha=1.0)(model, batch)
    assert float(out["contrast_uniform"]) == pytest.approx(4 * math.log(4))
    assert float(out["tau_effective"]) == pytest.approx(0.1)
    gap = (float(out["dist_neg"]) - float(out["dist_pos"])) / 0.1
    assert float(out["logit_gap"]) == pytest.approx(gap, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", ["emd", "bd", "mmd"])
def test_residual_equal_to_the_noise_is_at_distance_zero(name):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 3, 16, 16, generator=g) * 0.05
    d = get_distance(name)
    st = residual_noise_distance(noise, noise, d)
    assert st["noise_rmse"] == 0.0
    assert st["noise_distance"] == pytest.approx(0.0, abs=1e-6)


def test_shifted_residual_is_at_emd_and_rmse_equal_to_the_shift():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 16, 16, generator=g) * 0.05
    st = residual_noise_distance(noise + 0.02, noise, get_distance("emd", quantiles=None))
    assert st["noise_rmse"] == pytest.approx(0.02, rel=1e-5)
    assert st["noise_distance"] == pytest.approx(0.02, rel=1e-4)
    with pytest.raises(ValueError, match="shape"):
        residual_noise_distance(noise, noise[:1], get_distance("emd"))


def test_local_trainer_records_the_diagnostics_at_its_log_steps():
    from rcl_dist.train.local import train_local

    small = ["model.width=8", "model.depth=2", "data.crop=32", "data.tile=64", "train.batch_size=4",
             "train.steps=2", "train.log_every=1", "loss.temperature_scale=median"]  # fmt: skip
    _, history = train_local(load_config(None, small), log=None)
    for key in ("grad_contrast", "grad_consistency", "grad_ratio", "logit_gap", "contrast_uniform", "tau_effective",
                "noise_distance", "noise_rmse"):  # fmt: skip
        assert len(history.metrics[key]) == 2 and all(math.isfinite(v) for v in history.metrics[key]), key
    _, quiet = train_local(load_config(None, [*small, "loss.diagnostics=false"]), log=None)
    assert "grad_ratio" not in quiet.metrics and "logit_gap" in quiet.metrics and "noise_distance" not in quiet.metrics


def test_noise_probe_measures_the_residual_against_the_true_noise(rng):
    """The identity f(x) = x scores the noise's own size; the probe leaves a model's train mode and
    batch-norm statistics as they were; with real noise (unknown) there is no probe."""
    from rcl_dist.models import build_model
    from rcl_dist.train.diagnostics import noise_probe

    cfg = load_config(None, ["data.crop=16", "loss.quantiles=null", "data.sigma_min=0.05", "data.sigma_max=0.08"])
    images = [torch.rand(3, 40, 40, generator=rng).numpy() for _ in range(4)]
    probe = noise_probe(cfg, images, n=4)

    class Identity(torch.nn.Module):  # f(x) = x: the residual is 0, so the distance is the noise's own size
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def residual(self, x):
            return torch.zeros_like(x)

    identity = probe(Identity())
    # RMS of the noise itself: sigma in [0.05, 0.08] per image (NLF variance within sigma_max^2)
    assert 0.02 < identity["noise_rmse"] < 0.08 and identity["noise_distance"] > 0.01
    dncnn = build_model("dncnn", width=4, depth=3)
    dncnn.train()
    before = {k: v.clone() for k, v in dncnn.state_dict().items()}
    out = probe(dncnn)
    assert math.isfinite(out["noise_distance"]) and dncnn.training
    assert all(torch.equal(before[k], v) for k, v in dncnn.state_dict().items())  # running stats untouched
    assert noise_probe(load_config(None, ["data.noise=none", "data.source=/x"]), images) is None


def test_adapt_alpha_jumps_to_the_target_or_steps_by_at_most_the_factor():
    from rcl_dist.losses.diagnostics import adapt_alpha

    assert adapt_alpha(1e-3, 1e-4, 0.1, max_factor=math.inf) == pytest.approx(1.0)  # the ratio is linear in alpha
    assert adapt_alpha(1e-3, 1e-4, 0.1) == pytest.approx(2e-3)
    assert adapt_alpha(1e-3, 10.0, 0.1) == pytest.approx(5e-4)
    assert adapt_alpha(1e-3, 0.1, 0.1) == pytest.approx(1e-3)
    assert adapt_alpha(1e-3, 0.0, 0.1) == pytest.approx(2e-3)  # no contrastive gradient: push up, bounded
    assert adapt_alpha(1e-3, float("nan"), 0.1, max_factor=math.inf) == pytest.approx(1e-3)
    assert adapt_alpha(1e5, 1e-9, 1.0, max_factor=math.inf) == 1e6  # clipped to the bounds
    with pytest.raises(ValueError):
        adapt_alpha(0.0, 1.0, 0.1)


def test_alpha_ratio_sets_alpha_from_the_measured_gradient_ratio_in_the_local_trainer():
    from rcl_dist.train.local import train_local

    small = ["model.width=8", "model.depth=2", "data.crop=32", "data.tile=64", "train.batch_size=4",
             "train.steps=3", "train.log_every=1", "train.lr=1e-5", "loss.alpha_ratio=0.1"]  # fmt: skip
    _, history = train_local(load_config(None, small), log=None)
    alphas, ratios = history.metrics["alpha"], history.metrics["grad_ratio"]
    assert alphas[0] != pytest.approx(1e-3, rel=0.01)  # moved from the configured start before step 1
    # after the jump on its own batch, the ratio on the training batches is near the target
    assert all(0.1 / 4 < r < 0.1 * 4 for r in ratios), ratios
    with pytest.raises(ValueError, match="loss.alpha_ratio"):
        train_local(load_config(None, [*small, "loss.encoder=null"]), log=None)
    with pytest.raises(ConfigError, match="loss.alpha_ratio"):
        load_config(None, [*small, "loss.method=n2n"])
