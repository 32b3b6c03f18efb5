"""Common interface of the restoration backbones f_theta: a feature extractor plus a replaceable last layer.

Residual definitions (Dong et al., IJCAI 2022):

* Eq. 2 (image-predicting models, e.g. U-Net):   n_hat(x) = x - f(x)
* App. D.3 (noise-predicting DnCNN, whose restored image is x - f(x)):
  n_hat(x) = x - (x - f(x)) = f(x)
* App. B.2 (RAW input x, RGB output f(x)):        n_hat(x) = x - mosaic(f(x))
  and, for the packed [B, 4, H/2, W/2] RAW layout, n_hat(x) = x - pack_bayer(mosaic(f(x))).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rcl_dist.noise import mosaic, pack_bayer

from .heads import HEAD_KINDS, make_head

__all__ = ["Restorer", "RAW_MODES", "bicubic_up"]

RAW_MODES: tuple[str | None, ...] = (None, "mosaic", "packed")
# Input channels implied by each RAW layout: a 1-channel RGGB mosaic, or its 4 packed planes.
_RAW_IN_CHANNELS: dict[str, int] = {"mosaic": 1, "packed": 4}


def bicubic_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling of [B, C, h, w] to [B, C, *size] (``align_corners=False``): the SR baseline the
    evaluation reports (:func:`rcl_dist.evaluate.baseline_prediction`) and an SR head's ``skip="bicubic"``."""
    return F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False)


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_backbone(in_channels: int, out_channels: int, head: str, sizes: dict[str, tuple[int, int]]) -> None:
    """The argument checks every backbone's constructor shares: channel counts >= 1, each of ``sizes``
    (name -> (value, minimum), checked in that order) and a known head kind."""
    check_positive("in_channels", in_channels)
    check_positive("out_channels", out_channels)
    for name, (value, minimum) in sizes.items():
        check_positive(name, value, minimum)
    if head not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {head!r}; allowed kinds: {', '.join(HEAD_KINDS)}")


def check_raw(raw: str | None, in_channels: int, out_channels: int) -> None:
    """Validate a RAW mode against the channel counts it implies (App. B.2)."""
    if raw not in RAW_MODES:
        raise ValueError(f"raw must be one of {RAW_MODES}, got {raw!r}")
    if raw is None:
        return
    if in_channels != _RAW_IN_CHANNELS[raw]:
        raise ValueError(f"raw={raw!r} inputs have {_RAW_IN_CHANNELS[raw]} channel(s), got in_channels={in_channels}")
    if out_channels != 3:
        raise ValueError(f"raw={raw!r} models output RGB (App. B.2), so out_channels must be 3, got {out_channels}")


class Restorer(nn.Module):
    """Base class of the backbones: ``forward(x) = head(body(x))``.

    Subclasses set, in their constructor:

    * ``body``: feature extractor, image [B, C_in, H, W] -> features [B, F, h, w] (any padding and
      cropping needed for arbitrary H, W happens inside ``body``, so ``h, w`` equal the input's
      spatial size);
    * ``head``: the last layer, features -> output (see :mod:`rcl_dist.models.heads`);
    * ``feature_channels``: F, the head's input channels;
    * ``raw``: ``None`` (RGB/grey input), ``"mosaic"`` (RGGB Bayer [B, 1, H, W]) or ``"packed"``
      ([B, 4, H/2, W/2]); for RAW inputs f(x) is a full-resolution RGB image [B, 3, H, W];
    * ``predicts_noise``: ``True`` when f(x) is the noise rather than the clean image (DnCNN).

    Proxy evaluation (Sec. 4): :meth:`freeze_all_but_head` freezes every weight except the last
    layer's; :meth:`replace_head` swaps in a fresh, randomly initialised task layer.
    """

    body: nn.Module
    head: nn.Module
    feature_channels: int
    raw: str | None
    predicts_noise: bool

    def __init__(self) -> None:
        super().__init__()
        self.raw = None
        self.predicts_noise = False
        self._body_frozen = False

    # ------------------------------------------------------------------ forward and residuals
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)  # [B, C_in, H, W] -> [B, F, h, w]
        y = self.head(feats)  # -> [B, C_out, h', w'] (h' = scale * h for SR / RAW->RGB heads)
        offset = self.skip_offset(x, tuple(y.shape))
        return y if offset is None else y + offset

    def input_skip(self, x_shape: tuple[int, ...], head_shape: tuple[int, ...]) -> bool:
        """Whether ``forward`` adds the input to the head's output (a global input skip).

        Base: never. :class:`rcl_dist.models.UNet` with ``global_residual=True``: whenever the head's
        output has the input's shape (never for SR or RAW -> RGB heads)."""
        return False

    def interpolation_skip(self, x_shape: tuple[int, ...], head_shape: tuple[int, ...]) -> bool:
        """Whether ``forward`` adds the bicubic upsampling of the input to the head's output: an SR head
        built with ``skip="bicubic"`` (:class:`rcl_dist.models.heads.SRHead`) on RGB/grey input, whose
        output has the input's channels at ``head.scale`` times its size."""
        if self.raw is not None or getattr(self.head, "skip", "none") != "bicubic":
            return False
        s = int(getattr(self.head, "scale", 1))
        n, c, h, w = x_shape
        return tuple(head_shape) == (n, c, s * h, s * w)

    def skip_offset(self, x: torch.Tensor, head_shape: tuple[int, ...]) -> torch.Tensor | None:
        """What ``forward`` adds to the head's output: the input (global input skip), its bicubic
        upsampling (SR head with ``skip="bicubic"``), or nothing (``None``)."""
        if self.input_skip(tuple(x.shape), tuple(head_shape)):
            return x
        if self.interpolation_skip(tuple(x.shape), tuple(head_shape)):
            return bicubic_up(x, tuple(head_shape[-2:]))
        return None

    def restore_affine(self, x: torch.Tensor, head_shape: tuple[int, ...]) -> tuple[float, torch.Tensor | None]:
        """(sign, offset) with ``restore(x) = sign * head(body(x)) + offset`` for a head output of
        shape ``head_shape`` (offset ``None``: 0).

        * image-predicting, no input skip (the paper's U-Net, App. D.3 / Sec. 4): (1, None);
        * image-predicting with the global input skip (U-Net ``global_residual``): (1, x);
        * an SR head with ``skip="bicubic"``: (1, bicubic_up(x));
        * noise-predicting (DnCNN, App. D.3), output of the input's shape: (-1, x): x - f(x).

        The restored image is affine in the head's output, so a head that is linear in its weights
        (every head here) is fitted by least squares on the target ``sign * (y - offset)``
        (:mod:`rcl_dist.train.probe`).
        """
        same = tuple(head_shape) == tuple(x.shape)
        if self.predicts_noise and same:
            return -1.0, x
        return 1.0, self.skip_offset(x, tuple(head_shape))

    def restores_from_input(self, head: nn.Module) -> bool:
        """True when, with ``head`` installed, the restored image is the input (or its bicubic
        upsampling, for an SR head with ``skip="bicubic"``) plus or minus the head's output, so that a
        zero head restores the input unchanged (the identity) or gives the bicubic baseline."""
        in_ch = getattr(self, "in_channels", None)
        if self.raw is not None or getattr(head, "out_channels", None) != in_ch:
            return False
        if getattr(head, "scale", 1) != 1:
            return getattr(head, "skip", "none") == "bicubic"
        return self.predicts_noise or bool(getattr(self, "global_residual", False))

    def restore(self, x: torch.Tensor, output: torch.Tensor | None = None) -> torch.Tensor:
        """The restored image.

        ``f(x)`` for image-predicting models; ``x - f(x)`` for noise-predicting ones (DnCNN).
        If the head's output shape differs from ``x`` (e.g. an SR head put on a DnCNN for
        fine-tuning), a noise prediction cannot be subtracted from ``x``, so the output is taken
        to be the image itself and ``f(x)`` is returned. Pass ``output=self(x)`` to reuse a
        forward pass.
        """
        y = self(x) if output is None else output
        if self.predicts_noise and y.shape == x.shape:
            return x - y
        return y

    def residual(self, x: torch.Tensor, output: torch.Tensor | None = None) -> torch.Tensor:
        """The residual tensor n_hat(x) used as the contrastive feature.

        * image-predicting models, RGB input: Eq. 2, ``x - f(x)``;
        * noise-predicting models (DnCNN): App. D.3, ``x - (x - f(x)) = f(x)``;
        * ``raw="mosaic"``: App. B.2, ``x - mosaic(f(x))`` with f(x) of shape [B, 3, H, W];
        * ``raw="packed"``: ``x - pack_bayer(mosaic(f(x)))``, x of shape [B, 4, H/2, W/2].

        Pass ``output=self(x)`` to reuse a forward pass. Raises ``ValueError`` if the output cannot
        be compared with ``x`` (e.g. an SR head whose output is larger than the input).
        """
        y = self(x) if output is None else output
        if self.predicts_noise:
            self._check_same_shape(x, y, "a noise prediction f(x) (App. D.3)")
            return y  # x - (x - f(x))
        if self.raw is None:
            self._check_same_shape(x, y, "Eq. 2, x - f(x),")
            return x - y
        expected = (x.shape[0], 3, *self._raw_full_size(x))
        if tuple(y.shape) != expected:
            raise ValueError(
                f"residual undefined: raw={self.raw!r} input of shape {tuple(x.shape)} needs a full-resolution "
                f"RGB output of shape {expected} (App. B.2), got {tuple(y.shape)}"
            )
        raw_y = mosaic(y)  # [B, 3, H, W] -> [B, 1, H, W]
        if self.raw == "packed":
            raw_y = pack_bayer(raw_y)  # [B, 1, H, W] -> [B, 4, H/2, W/2]
        return x - raw_y

    def _raw_full_size(self, x: torch.Tensor) -> tuple[int, int]:
        h, w = x.shape[-2:]
        return (2 * h, 2 * w) if self.raw == "packed" else (h, w)

    @staticmethod
    def _check_same_shape(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
        if y.shape != x.shape:
            raise ValueError(
                f"residual undefined: {what} needs the output to have the input's shape "
                f"{tuple(x.shape)}, got {tuple(y.shape)} (e.g. an SR head changes the size; see App. B.2)"
            )

    # ------------------------------------------------------------------ head management
    def head_kwargs(self, kind: str) -> dict[str, Any]:
        """Model-specific defaults for :meth:`new_head` (e.g. DnCNN's 3x3, bias-free last conv)."""
        return {}

    def new_head(self, kind: str, out_channels: int, **kw: Any) -> nn.Module:
        """A fresh, randomly initialised head of ``kind`` for this body (not installed; see :meth:`replace_head`)."""
        options = {**self.head_kwargs(kind), **kw}
        return make_head(kind, self.feature_channels, out_channels, **options)

    def replace_head(self, new_head: nn.Module) -> nn.Module:
        """Install ``new_head`` as the last layer and return the old one.

        The new head is moved to the body's device and dtype and is trainable, also when the
        body is frozen (proxy evaluation: the pre-trained last layer is replaced with a randomly
        initialised task-dependent layer and only that layer is fine-tuned).
        """
        if not isinstance(new_head, nn.Module):
            raise TypeError(f"new_head must be an nn.Module, got {type(new_head).__name__}")
        in_ch = getattr(new_head, "in_channels", None)
        if in_ch is not None and in_ch != self.feature_channels:
            raise ValueError(f"new head expects {in_ch} input channels, but the body produces {self.feature_channels}")
        ref = next(self.body.parameters(), None)
        if ref is not None:
            new_head = new_head.to(device=ref.device, dtype=ref.dtype)
        new_head.requires_grad_(True)
        new_head.train(self.training)
        old = self.head
        self.head = new_head
        return old

    # ------------------------------------------------------------------ freezing (proxy evaluation)
    def freeze_all_but_head(self) -> list[nn.Parameter]:
        """Freeze every parameter outside ``head`` and return the trainable (head) parameters.

        Implements "all weights except those in the last layer are frozen" (Sec. 4). The body is
        also kept in eval mode, even after ``.train()``, so batch-norm running statistics (DnCNN)
        stay fixed as well: the intermediate representations are not changed by fine-tuning.
        """
        self.requires_grad_(False)
        self.head.requires_grad_(True)
        self._body_frozen = True
        self.body.eval()
        return [p for p in self.parameters() if p.requires_grad]

    def unfreeze(self) -> None:
        """Make every parameter trainable again and let the body follow ``train()``/``eval()``."""
        self.requires_grad_(True)
        self._body_frozen = False
        self.body.train(self.training)

    @property
    def body_frozen(self) -> bool:
        return self._body_frozen

    def train(self, mode: bool = True) -> Restorer:
        super().train(mode)
        if self._body_frozen:
            self.body.eval()
        return self
