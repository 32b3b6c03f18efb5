"""Restoration backbones f_theta for RCL (Dong et al., IJCAI 2022): U-Net (Sec. 4) and DnCNN (App. D.3).

Every model is a :class:`Restorer`: ``forward(x) = head(body(x))`` with a replaceable last layer
(proxy evaluation, Sec. 4) and ``residual(x)`` implementing Eq. 2 / App. B.2 / App. D.3.
"""

from __future__ import annotations

from typing import Any

from .base import RAW_MODES, Restorer
from .dncnn import DnCNN
from .heads import HEAD_KINDS, RawToRGBHead, RGBHead, SRHead, make_head
from .unet import UNet

__all__ = [
    "Restorer",
    "UNet",
    "DnCNN",
    "RGBHead",
    "SRHead",
    "RawToRGBHead",
    "make_head",
    "build_model",
    "HEAD_KINDS",
    "MODEL_NAMES",
    "RAW_MODES",
]

_MODELS: dict[str, type[Restorer]] = {"unet": UNet, "dncnn": DnCNN}
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def build_model(name: str, **kwargs: Any) -> Restorer:
    """Build a backbone by name (``"unet"`` or ``"dncnn"``); ``kwargs`` go to its constructor."""
    try:
        cls = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; allowed names: {', '.join(MODEL_NAMES)}") from None
    return cls(**kwargs)
