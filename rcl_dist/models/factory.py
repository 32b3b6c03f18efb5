"""The network a configuration describes: one builder for every trainer, checkpoint loader and test."""

from __future__ import annotations

from rcl_dist.config import Config, global_residual_of
from rcl_dist.models import Restorer, build_model

__all__ = ["build_model_from_config"]


def build_model_from_config(cfg: Config) -> Restorer:
    m = cfg.model
    if m.name == "unet":
        in_ch = {None: m.in_channels, "mosaic": 1, "packed": 4}[m.raw]
        out_ch = 3 if m.raw else m.in_channels
        head = "raw2rgb" if m.raw == "packed" else "rgb"
        return build_model(
            "unet", in_channels=in_ch, out_channels=out_ch, width=m.width, depth=m.depth, head=head, raw=m.raw,
            global_residual=global_residual_of(cfg),
        )  # fmt: skip
    return build_model("dncnn", in_channels=m.in_channels, out_channels=m.in_channels, width=m.width, depth=m.depth)
