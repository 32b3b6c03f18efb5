"""Replaceable last layers ("heads") of the restoration backbones.

The proxy evaluation protocol of Dong et al. (IJCAI 2022, Sec. 4) freezes every weight of the
pre-trained network except those of the last layer, and replaces that last layer with a
*randomly initialised*, task-dependent one (denoising, demosaicing, super-resolution).
The heads here are those last layers; each is freshly initialised when constructed.

* :class:`RGBHead`      features [B, F, h, w] -> image [B, C_out, h, w]   (1x1 conv for U-Net as in
  Ronneberger et al. 2015; 3x3 conv for DnCNN, Zhang et al. 2017)
* :class:`SRHead`       features [B, F, h, w] -> image [B, C_out, s*h, s*w]  (conv + PixelShuffle(s));
  with ``skip="bicubic"`` the network adds the bicubic upsampling of its input to this output
  (:meth:`rcl_dist.models.base.Restorer.forward`), so the head predicts the HR detail only
* :class:`RawToRGBHead` packed-RAW features [B, F, H/2, W/2] -> full-resolution RGB [B, 3, H, W]
  (App. B.2: f(x) is an RGB image while x is RAW)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["RGBHead", "SRHead", "RawToRGBHead", "make_head", "HEAD_KINDS", "SR_SKIPS"]

HEAD_KINDS: tuple[str, ...] = ("rgb", "sr2", "raw2rgb")
# what an SR head's output is added to: "bicubic" (the input's bicubic upsampling, as VDSR-style SR
# networks learn the residual over interpolation) or "none" (the head predicts the HR image itself)
SR_SKIPS: tuple[str, ...] = ("bicubic", "none")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_kernel(kernel_size: int) -> None:
    _check_positive("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd so that the output keeps the input size, got {kernel_size}")


class RGBHead(nn.Module):
    """Same-resolution output layer: a single ``kernel_size`` x ``kernel_size`` convolution.

    [B, in_ch, h, w] -> [B, out_ch, h, w].
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, bias: bool = True) -> None:
        super().__init__()
        _check_positive("in_ch", in_ch)
        _check_positive("out_ch", out_ch)
        _check_kernel(kernel_size)
        self.in_channels = in_ch
        self.out_channels = out_ch
        self.scale = 1
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias)

    def reset_parameters(self) -> None:
        """Re-draw the weights (PyTorch's default Kaiming-uniform initialisation)."""
        self.conv.reset_parameters()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(feats)  # [B, F, h, w] -> [B, C_out, h, w]


class SRHead(nn.Module):
    """Sub-pixel upsampling output layer (Shi et al. 2016).

    A conv to ``out_ch * scale**2`` channels followed by ``PixelShuffle(scale)``:
    [B, in_ch, h, w] -> [B, out_ch * scale**2, h, w] -> [B, out_ch, scale*h, scale*w].

    ``skip`` (one of :data:`SR_SKIPS`) is read by the network, which holds the input: with
    ``"bicubic"`` the restored image is ``bicubic_up(x) + head(body(x))``, so a zero head gives the
    bicubic baseline exactly. Without it a small frozen body must carry the whole low-frequency
    image through one linear layer, and every proxy sat below bicubic
    (``benchmarks/results/fidelity_cpu_matrix.md``).
    """

    def __init__(
        self, in_ch: int, out_ch: int, scale: int = 2, kernel_size: int = 3, bias: bool = True, skip: str = "none"
    ) -> None:
        super().__init__()
        _check_positive("in_ch", in_ch)
        _check_positive("out_ch", out_ch)
        _check_kernel(kernel_size)
        if not isinstance(scale, int) or isinstance(scale, bool) or scale < 2:
            raise ValueError(f"scale must be an integer >= 2, got {scale!r}")
        if skip not in SR_SKIPS:
            raise ValueError(f"SR head skip must be one of {', '.join(SR_SKIPS)}, got {skip!r}")
        self.in_channels = in_ch
        self.out_channels = out_ch
        self.scale = scale
        self.skip = skip
        self.conv = nn.Conv2d(in_ch, out_ch * scale**2, kernel_size, padding=kernel_size // 2, bias=bias)
        self.shuffle = nn.PixelShuffle(scale)

    def reset_parameters(self) -> None:
        """Re-draw the weights (PyTorch's default Kaiming-uniform initialisation)."""
        self.conv.reset_parameters()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        y = self.conv(feats)  # [B, F, h, w] -> [B, C_out * s^2, h, w]
        return self.shuffle(y)  # -> [B, C_out, s*h, s*w]


class RawToRGBHead(SRHead):
    """Packed-RAW -> full-resolution RGB (App. B.2, joint demosaicing).

    For ``raw="packed"`` inputs [B, 4, H/2, W/2] the backbone's features live at H/2 x W/2; this
    head maps them to the RGB image f(x) of shape [B, 3, H, W] so that the RAW residual
    x - pack(mosaic(f(x))) is defined. Implemented as a conv to 12 channels + PixelShuffle(2).
    (For ``raw="mosaic"`` inputs the features are already at H x W and :class:`RGBHead` with
    ``out_ch=3`` is used instead.)
    """

    def __init__(self, in_ch: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__(in_ch, 3, scale=2, kernel_size=kernel_size, bias=bias)  # no skip: RAW in, RGB out


def make_head(kind: str, in_ch: int, out_ch: int, **kw: Any) -> nn.Module:
    """Build a fresh, randomly initialised head.

    ``kind``: ``"rgb"`` -> :class:`RGBHead`, ``"sr2"`` -> :class:`SRHead` with scale 2,
    ``"raw2rgb"`` -> :class:`RawToRGBHead` (``out_ch`` must be 3). Extra keyword arguments
    (``kernel_size``, ``bias``; ``skip`` for ``"sr2"``) are passed to the head's constructor.
    """
    if kind == "rgb":
        return RGBHead(in_ch, out_ch, **kw)
    if kind == "sr2":
        if "scale" in kw and kw["scale"] != 2:
            raise ValueError(f"head 'sr2' has scale 2, got scale={kw['scale']!r}; use SRHead directly for other scales")
        kw.pop("scale", None)
        return SRHead(in_ch, out_ch, scale=2, **kw)
    if kind == "raw2rgb":
        if out_ch != 3:
            raise ValueError(f"head 'raw2rgb' outputs RGB, so out_ch must be 3, got {out_ch}")
        return RawToRGBHead(in_ch, **kw)
    raise ValueError(f"unknown head kind {kind!r}; allowed kinds: {', '.join(HEAD_KINDS)}")
