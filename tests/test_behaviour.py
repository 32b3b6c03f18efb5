"""Behaviour: a few dozen RCL steps on small noisy crops of bundled images do what the paper says.

The quantity of the paper's Fig. 2 is the gap mean EMD(negative) - mean EMD(positive); RCL must widen
it and lower the contrastive loss. Both are measured on a fixed evaluation set of pairs (same crops,
same noise) before and after training, so the comparison is not at the mercy of one training batch.
"""

from __future__ import annotations

import pytest
import torch

from rcl_dist.config import load_config
from rcl_dist.data.sampler import PairSampler
from rcl_dist.losses.contrastive import ResidualContrastiveLoss, pair_distance_stats
from rcl_dist.models.factory import build_model_from_config
from rcl_dist.train.local import load_images, train_local

SMALL = ["model.width=16", "model.depth=3", "data.crop=32", "data.tile=64", "train.batch_size=16", "train.log_every=5"]


@torch.no_grad()
def _evaluate(model, batch, loss: ResidualContrastiveLoss) -> dict[str, float]:
    model.eval()
    s_q, s_k = loss.sketch(model.residual(batch["q"])), loss.sketch(model.residual(batch["k"]))
    dist = loss.distance_matrix(s_q, s_k)
    model.train()
    return {"loss": loss.info_nce(dist).item(), **pair_distance_stats(dist)}


@pytest.mark.slow
# (distance trained with, max ratio of loss after/before, min ratio of gap after/before); measured on
# this machine: EMD 0.43 and 6.7x, BD 0.73 and 1.67x. The paper's U-Net (App. D.3) predicts the image
# directly, so x - f(x) starts as image content (also the product's auto rule for RCL); with the global
# input skip f starts near the identity, a stationary point of Eq. 3 (BD there: loss ratio 0.87 after
# 40 steps), which is not this test's premise.
@pytest.mark.parametrize("distance, loss_ratio, gap_ratio", [("emd", 0.6, 3.0), ("bd", 0.85, 1.3)])
def test_rcl_steps_lower_contrastive_loss_and_widen_emd_gap(distance, loss_ratio, gap_ratio):
    cfg = load_config(None, [*SMALL, "train.steps=40", "loss.encoder=null", "loss.alpha=1", f"loss.distance={distance}",
                            "model.global_residual=false"])  # fmt: skip
    images = load_images(cfg)
    eval_batch = PairSampler(images, crop=32, generator=torch.Generator().manual_seed(99)).sample(32)
    emd = ResidualContrastiveLoss("emd", temperature=cfg.loss.temperature)  # Fig. 2 is measured in EMD
    torch.manual_seed(cfg.train.seed)
    model = build_model_from_config(cfg)
    before = _evaluate(model, eval_batch, emd)
    model, history = train_local(cfg, images=images, model=model, log=None)
    after = _evaluate(model, eval_batch, emd)
    assert after["loss"] < loss_ratio * before["loss"], (before, after)
    assert after["dist_gap"] > gap_ratio * before["dist_gap"], (before, after)
    assert len(history.step) >= 8


@pytest.mark.slow
def test_full_objective_eq6_with_imagenet_encoder_lowers_total_loss():
    cfg = load_config(None, [*SMALL, "train.steps=30"])  # paper defaults: alpha 1e-3, lite0 ImageNet encoder
    _, history = train_local(cfg, log=None)
    total = history.metrics["loss"]
    assert total[-1] < 0.7 * total[0]
    assert set(history.metrics) >= {"contrast", "consistency", "dist_pos", "dist_neg", "dist_gap"}
