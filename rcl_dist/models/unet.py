"""U-Net backbone (Ronneberger et al. 2015), the f_theta of Dong et al. (IJCAI 2022, Sec. 4 "Implementation").

The network predicts the restored image directly (no global input skip), so the residual is
Eq. 2, n_hat(x) = x - f(x); for RAW inputs it is App. B.2's x - mosaic(f(x)) (see
:class:`rcl_dist.models.base.Restorer`). No batch norm: per-worker batches are small under DDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Restorer, check_backbone, check_raw

__all__ = ["UNet", "UNetBody"]

UP_MODES: tuple[str, ...] = ("bilinear", "transpose")


def _double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """(3x3 conv + LeakyReLU(0.2)) x 2: [B, in_ch, h, w] -> [B, out_ch, h, w]."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
    )


class _Up(nn.Module):
    """Decoder level: 2x upsample (in_ch -> in_ch/2), concatenate the skip (in_ch/2), double conv -> in_ch/2."""

    def __init__(self, in_ch: int, mode: str) -> None:
        super().__init__()
        out_ch = in_ch // 2
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_ch, out_ch, kernel_size=1),
            )
        self.conv = _double_conv(2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # [B, C, h, w] -> [B, C/2, 2h, 2w]
        x = torch.cat([skip, x], dim=1)  # -> [B, C, 2h, 2w]
        return self.conv(x)  # -> [B, C/2, 2h, 2w]


class UNetBody(nn.Module):
    """U-Net encoder-decoder without its last layer: [B, C_in, H, W] -> features [B, width, H, W].

    Inputs of any size are reflect-padded (bottom/right) to a multiple of ``2**depth`` and the
    features are cropped back to H x W, so the head sees features aligned with the input pixels
    and an SR head's output is exactly ``scale`` x the input size.
    """

    def __init__(self, in_channels: int, width: int, depth: int, up_mode: str) -> None:
        super().__init__()
        self.depth = depth
        self.inc = _double_conv(in_channels, width)
        self.downs = nn.ModuleList(
            _double_conv(width * 2**i, width * 2 ** (i + 1)) for i in range(depth)
        )  # level i+1: [B, w*2^i, h, w] -> maxpool -> [B, w*2^(i+1), h/2, w/2]
        self.ups = nn.ModuleList(_Up(width * 2 ** (i + 1), up_mode) for i in reversed(range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            # Reflect padding needs pad < size; fall back to replicate for tiny inputs.
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)  # -> [B, C_in, H + pad_h, W + pad_w]
        x = self.inc(x)  # -> [B, width, H', W']
        skips = [x]
        for down in self.downs:
            x = down(F.max_pool2d(x, 2))  # [B, C, h, w] -> [B, 2C, h/2, w/2]
            skips.append(x)
        skips.pop()  # the bottleneck is not a skip
        for up in self.ups:
            x = up(x, skips.pop())  # [B, C, h, w] -> [B, C/2, 2h, 2w]
        return x[..., :h, :w]  # [B, width, H', W'] -> [B, width, H, W]


class UNet(Restorer):
    """Configurable U-Net restorer.

    Args:
        in_channels: input channels (3 for RGB; 1 for ``raw="mosaic"``, 4 for ``raw="packed"``).
        out_channels: output channels of the head (3 for RGB; must be 3 for RAW inputs).
        width: channels at the top level; doubled at each of the ``depth`` downsamplings.
        depth: number of 2x downsamplings (>= 1).
        head: kind of last layer, one of ``"rgb"`` (1x1 conv), ``"sr2"``, ``"raw2rgb"``.
        raw: ``None``, ``"mosaic"`` or ``"packed"`` (App. B.2); ``"packed"`` needs an upsampling head.
        up_mode: ``"bilinear"`` (upsample + 1x1 conv) or ``"transpose"`` (2x2 transposed conv).
        global_residual: if True, f(x) = x + head(body(x)) wherever the head's output has the input's
            shape (RGB/grey denoising heads: the network learns a correction); SR and RAW -> RGB
            heads still predict the image directly. False (the paper's U-Net, App. D.3) predicts
            the image directly everywhere. f(x) is an image either way, so the residual stays Eq. 2
            (= -head(body(x)) with the skip).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        width: int = 32,
        depth: int = 4,
        head: str = "rgb",
        raw: str | None = None,
        up_mode: str = "bilinear",
        global_residual: bool = False,
    ) -> None:
        super().__init__()
        check_backbone(in_channels, out_channels, head, {"width": (width, 1), "depth": (depth, 1)})
        if up_mode not in UP_MODES:
            raise ValueError(f"up_mode must be one of {UP_MODES}, got {up_mode!r}")
        check_raw(raw, in_channels, out_channels)
        if raw == "mosaic" and head != "rgb":
            raise ValueError(f"raw='mosaic' features are at full resolution, so head must be 'rgb', got {head!r}")
        if raw == "packed" and head == "rgb":
            raise ValueError("raw='packed' features are at half resolution: use head='raw2rgb' to output full-res RGB")
        self.raw = raw
        self.predicts_noise = False
        self.global_residual = bool(global_residual)
        self.in_channels = in_channels
        self.width = width
        self.depth = depth
        self.feature_channels = width
        self.body = UNetBody(in_channels, width, depth, up_mode)
        self.head = self.new_head(head, out_channels)

    def input_skip(self, x_shape: tuple[int, ...], head_shape: tuple[int, ...]) -> bool:
        return self.global_residual and tuple(x_shape) == tuple(head_shape)

    # forward (Restorer's): [B, C_in, H, W] -> body [B, width, H, W] -> head [B, C_out, s*H, s*W], plus
    # the input (global residual: f(x) = x + head(body(x))) or its bicubic upsampling (SR skip)
