"""benchmarks/step_profile.py cuts the trainer's step of Eq. 6 at the U-Net's output to time its
phases; its figures mean something only if the cut step computes the product's gradient and its FLOP
count covers what runs. Checked here on a small network, one process (no Ray, no DALI)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sp():
    sys.path.insert(0, str(REPO / "benchmarks"))  # its sibling _provenance, as when run as a script
    try:
        spec = importlib.util.spec_from_file_location("step_profile_bench", REPO / "benchmarks" / "step_profile.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _cfg(sp, extra=()):
    return sp.product_config(16, 1, ["model.width=8", "model.depth=2", "train.batch_size=4", *extra])


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_staged_step_is_the_product_step(sp, channels_last):
    torch.manual_seed(0)
    s = sp._Setup(_cfg(sp, [f"dist.channels_last={str(channels_last).lower()}"]), 0, 1)
    batch = {k: torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i, k in enumerate("qk")}
    assert sp.check_staged(s, batch) < 1e-5
    laps = []
    before = [p.detach().clone() for p in s.inner.parameters()]
    sp.staged_step(s, batch, laps.append)
    assert laps[:4] == ["unet_fwd", "loss_fwd", "encoder_fwd", "optimiser"]
    assert laps[4:] == ["loss_bwd", "encoder_bwd", "unet_bwd", "optimiser"]
    assert any(not torch.equal(a, b) for a, b in zip(before, s.inner.parameters()))  # Adam stepped
    assert len(s.encoder_calls) == 2  # phi(g(x)) and phi(g(f(x))), timed by the hooks


def test_flops_cover_the_networks_of_every_phase(sp):
    f = sp.count_flops(_cfg(sp), 4)
    for phase in ("unet_fwd", "encoder_fwd", "encoder_bwd", "unet_bwd"):
        assert f[phase] > 0, phase
    assert f["unet_bwd"] == pytest.approx(2 * f["unet_fwd"], rel=0.25)  # backward: input and weight gradients
    assert 0 < f["encoder_target_fwd"] < f["encoder_fwd"]  # the target branch is one of the encoder's two calls
    assert f["train_step"] == pytest.approx(sum(f[k] for k in sp.PHASES if k in f and k != "reporting"))
    assert f["reporting_per_log_step"] > f["unet_fwd"]  # diagnostics: one more forward and two backward passes
