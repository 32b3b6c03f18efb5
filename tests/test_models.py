"""Tests of rcl_dist.models: shapes, residual definitions (Eq. 2, App. B.2, D.3), head replacement and freezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rcl_dist.models import (
    DnCNN,
    RawToRGBHead,
    Restorer,
    RGBHead,
    SRHead,
    UNet,
    build_model,
    make_head,
)
from rcl_dist.noise import mosaic, pack_bayer


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small_unet(**kw: object) -> UNet:
    return UNet(**{"width": 4, "depth": 2, **kw})  # type: ignore[arg-type]


def small_dncnn(**kw: object) -> DnCNN:
    return DnCNN(**{"width": 8, "depth": 4, **kw})  # type: ignore[arg-type]


def head_params(model: Restorer) -> set[int]:
    return {id(p) for p in model.head.parameters()}


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("size", [(32, 32), (37, 29), (1, 1), (5, 70)])
@pytest.mark.parametrize("up_mode", ["bilinear", "transpose"])
def test_unet_rgb_shapes_any_size(size: tuple[int, int], up_mode: str) -> None:
    model = UNet(width=4, depth=3, up_mode=up_mode)
    x = torch.rand(2, 3, *size)
    assert model(x).shape == x.shape
    assert model.body(x).shape == (2, model.feature_channels, *size)


@pytest.mark.parametrize("size", [(32, 32), (37, 29)])
def test_unet_sr_head_output_is_twice_the_input(size: tuple[int, int]) -> None:
    model = small_unet(head="sr2", out_channels=3)
    x = torch.rand(1, 3, *size)
    assert model(x).shape == (1, 3, 2 * size[0], 2 * size[1])


def test_unet_raw_shapes() -> None:
    mos = small_unet(in_channels=1, raw="mosaic")
    assert mos(torch.rand(2, 1, 32, 32)).shape == (2, 3, 32, 32)
    packed = small_unet(in_channels=4, raw="packed", head="raw2rgb")
    assert packed(torch.rand(2, 4, 16, 16)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("size", [(32, 32), (37, 29)])
def test_dncnn_shapes(size: tuple[int, int]) -> None:
    x = torch.rand(2, 1, *size)
    assert small_dncnn(in_channels=1, out_channels=1)(x).shape == x.shape
    assert small_dncnn(in_channels=1, out_channels=1, head="sr2")(x).shape == (2, 1, 2 * size[0], 2 * size[1])


def test_heads_shapes_and_factory() -> None:
    feats = torch.rand(2, 6, 7, 9)
    assert RGBHead(6, 3)(feats).shape == (2, 3, 7, 9)
    assert RGBHead(6, 3, kernel_size=3)(feats).shape == (2, 3, 7, 9)
    assert SRHead(6, 3, scale=3)(feats).shape == (2, 3, 21, 27)
    assert RawToRGBHead(6)(feats).shape == (2, 3, 14, 18)
    assert isinstance(make_head("rgb", 6, 3), RGBHead)
    assert isinstance(make_head("sr2", 6, 3), SRHead) and make_head("sr2", 6, 3).scale == 2
    assert isinstance(make_head("raw2rgb", 6, 3), RawToRGBHead)
    assert make_head("rgb", 6, 3).conv.kernel_size == (1, 1)  # U-Net's 1x1 last layer
    assert small_dncnn().head.conv.kernel_size == (3, 3)  # DnCNN's 3x3 last layer
    with pytest.raises(ValueError, match="rgb, sr2, raw2rgb"):
        make_head("sr4", 6, 3)
    with pytest.raises(ValueError, match="out_ch must be 3"):
        make_head("raw2rgb", 6, 4)
    with pytest.raises(ValueError, match="kernel_size"):
        RGBHead(6, 3, kernel_size=2)


# ----------------------------------------------------------------------------- residuals
def test_unet_residual_is_x_minus_f() -> None:  # Eq. 2
    model = small_unet().eval()
    x = torch.rand(2, 3, 37, 29)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(model.residual(x), x - y)
        torch.testing.assert_close(model.residual(x, output=y), x - y)
        torch.testing.assert_close(model.restore(x), y)


def test_unet_global_residual_predicts_image() -> None:
    model = small_unet(global_residual=True).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x + model.head(model.body(x)))
        torch.testing.assert_close(model.residual(x), x - model(x))
    # an SR head changes the size: no input skip there, the head predicts the image directly
    sr = small_unet(global_residual=True, head="sr2").eval()
    with torch.no_grad():
        torch.testing.assert_close(sr(x), sr.head(sr.body(x)))
    assert sr.restore_affine(x, (1, 3, 32, 32)) == (1.0, None)
    sign, offset = model.restore_affine(x, tuple(x.shape))
    assert sign == 1.0 and offset is x


def test_sr_head_bicubic_skip_adds_the_interpolated_input() -> None:
    """skip="bicubic": restored = bicubic_up(x) + head(body(x)); a zero head is the bicubic baseline the
    evaluation reports (F.interpolate, align_corners=False), and restore stays affine in the head."""
    import torch.nn.functional as F

    from rcl_dist.models.base import bicubic_up

    x = torch.rand(2, 3, 13, 10)
    up = F.interpolate(x, size=(26, 20), mode="bicubic", align_corners=False)  # literal reference
    for model in (small_unet(), small_unet(global_residual=True), small_dncnn()):
        model.replace_head(model.new_head("sr2", 3, skip="bicubic"))
        model.eval()
        assert model.restores_from_input(model.head) and model.head.skip == "bicubic"
        with torch.no_grad():
            torch.testing.assert_close(model(x), up + model.head(model.body(x)))
            torch.testing.assert_close(model.restore(x), model(x))
            sign, offset = model.restore_affine(x, (2, 3, 26, 20))
            assert sign == 1.0
            torch.testing.assert_close(offset, up)
            for p in model.head.parameters():
                p.zero_()
            torch.testing.assert_close(model.restore(x), bicubic_up(x, (26, 20)), atol=0, rtol=0)
    # without the skip (the default; checkpoints written before it existed) the head predicts the image
    plain = small_unet(head="sr2").eval()
    assert plain.head.skip == "none" and not plain.restores_from_input(plain.head)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), plain.head(plain.body(x)))
    # a RAW model never interpolates its (mosaic) input; a head of other channels cannot take the skip
    packed = small_unet(in_channels=4, raw="packed", head="raw2rgb")
    assert packed.head.skip == "none" and not packed.interpolation_skip((1, 4, 8, 8), (1, 3, 16, 16))
    grey_to_rgb = small_unet(in_channels=1, out_channels=3)
    grey_to_rgb.replace_head(grey_to_rgb.new_head("sr2", 3, skip="bicubic"))
    assert not grey_to_rgb.interpolation_skip((1, 1, 8, 8), (1, 3, 16, 16))
    with pytest.raises(ValueError, match="skip must be one of bicubic, none"):
        make_head("sr2", 4, 3, skip="bilinear")


def test_restore_is_affine_in_the_head_output() -> None:
    """restore(x) = sign * head(body(x)) + offset for every model (what the probe's targets rest on)."""
    x = torch.rand(2, 3, 16, 16)
    for model in (small_unet(), small_unet(global_residual=True), small_dncnn(), small_dncnn(head="sr2")):
        model.eval()
        with torch.no_grad():
            h = model.head(model.body(x))
            sign, offset = model.restore_affine(x, tuple(h.shape))
            torch.testing.assert_close(model.restore(x), sign * h + (0 if offset is None else offset))


def test_dncnn_residual_is_f_and_restore_is_x_minus_f() -> None:  # App. D.3
    model = small_dncnn().eval()
    x = torch.rand(2, 3, 37, 29)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(model.residual(x), y)
        torch.testing.assert_close(model.residual(x), x - model.restore(x))  # x - (x - f(x))
        torch.testing.assert_close(model.restore(x), x - y)


def test_dncnn_restore_with_sr_head_returns_output() -> None:
    model = small_dncnn(head="sr2").eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.restore(x), model(x))
    with pytest.raises(ValueError, match="residual undefined"):
        model.residual(x)


def test_mosaic_raw_residual() -> None:  # App. B.2
    model = small_unet(in_channels=1, raw="mosaic").eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 3, 32, 32)
        torch.testing.assert_close(model.residual(x), x - mosaic(y))


def test_packed_raw_residual() -> None:
    model = small_unet(in_channels=4, raw="packed", head="raw2rgb").eval()
    x = torch.rand(2, 4, 10, 12)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 3, 20, 24)
        r = model.residual(x)
        assert r.shape == x.shape
        torch.testing.assert_close(r, x - pack_bayer(mosaic(y)))


def test_sr_head_residual_raises() -> None:
    model = small_unet(head="sr2")
    with pytest.raises(ValueError, match="residual undefined"):
        model.residual(torch.rand(1, 3, 16, 16))
    packed = small_unet(in_channels=4, raw="packed", head="raw2rgb")
    packed.replace_head(packed.new_head("rgb", 3))  # half-resolution output: not full-res RGB
    with pytest.raises(ValueError, match="App. B.2"):
        packed.residual(torch.rand(1, 4, 8, 8))


# ----------------------------------------------------------------------------- proxy evaluation
@pytest.mark.parametrize("factory", [small_unet, small_dncnn])
def test_freeze_all_but_head(factory) -> None:  # type: ignore[no-untyped-def]
    model = factory()
    trainable = model.freeze_all_but_head()
    assert {id(p) for p in trainable} == head_params(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == head_params(model)
    assert len(trainable) > 0

    model.train()
    assert not model.body.training  # frozen body stays in eval mode (BN statistics fixed)
    body_before = {k: v.clone() for k, v in model.body.state_dict().items()}  # incl. BN buffers
    head_before = [p.detach().clone() for p in model.head.parameters()]

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    loss = (model(x) - target).abs().mean()
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in model.body.parameters())
    opt.step()

    for k, v in model.body.state_dict().items():
        torch.testing.assert_close(v, body_before[k], msg=f"body tensor {k} changed")
    assert any(not torch.equal(a, b.detach()) for a, b in zip(head_before, model.head.parameters()))


@pytest.mark.parametrize("factory", [small_unet, small_dncnn])
def test_unfreeze_gradients_reach_all_params(factory) -> None:  # type: ignore[no-untyped-def]
    model = factory()
    model.freeze_all_but_head()
    model.unfreeze()
    model.train()
    assert model.body.training
    assert all(p.requires_grad for p in model.parameters())
    model(torch.rand(2, 3, 16, 16)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_replace_head_gives_fresh_trainable_head() -> None:
    model = small_unet()
    model.freeze_all_but_head()
    old = model.head
    new = model.new_head("rgb", 3)
    # Same architecture, different (random) weights.
    assert new.conv.weight.shape == old.conv.weight.shape
    assert not torch.equal(new.conv.weight, old.conv.weight)
    returned = model.replace_head(new)
    assert returned is old and model.head is new
    assert {id(p) for p in model.parameters() if p.requires_grad} == head_params(model)

    old2 = model.replace_head(model.new_head("sr2", 3))
    assert old2 is new
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="input channels"):
        model.replace_head(RGBHead(model.feature_channels + 1, 3))
    with pytest.raises(TypeError):
        model.replace_head("rgb")  # type: ignore[arg-type]


def test_replace_head_on_dncnn_keeps_3x3_bias_free_default() -> None:
    model = small_dncnn()
    head = model.new_head("rgb", 3)
    assert head.conv.kernel_size == (3, 3) and head.conv.bias is None


# ----------------------------------------------------------------------------- factory and validation
def test_build_model() -> None:
    assert isinstance(build_model("unet", width=4, depth=1), UNet)
    assert isinstance(build_model("dncnn", width=4, depth=3), DnCNN)
    with pytest.raises(ValueError, match="unet, dncnn"):
        build_model("resnet")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 0}, "depth"),
        ({"width": 0}, "width"),
        ({"in_channels": 0}, "in_channels"),
        ({"head": "foo"}, "allowed kinds"),
        ({"up_mode": "nearest"}, "up_mode"),
        ({"raw": "bayer"}, "raw"),
        ({"raw": "mosaic", "in_channels": 3}, "1 channel"),
        ({"raw": "packed", "in_channels": 4}, "raw2rgb"),
        ({"raw": "packed", "in_channels": 4, "head": "raw2rgb", "out_channels": 1}, "out_channels must be 3"),
    ],
)
def test_unet_argument_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)  # type: ignore[arg-type]


def test_dncnn_argument_validation() -> None:
    with pytest.raises(ValueError, match="depth"):
        DnCNN(depth=1)
    with pytest.raises(ValueError, match="width"):
        DnCNN(width=0)


def test_dncnn_s_parameter_count() -> None:
    # 556,032 = bias-free 3x3 convs (576 + 15 * 36,864 + 576) + 15 BN layers' affine (15 * 128);
    # BN running statistics are buffers, not parameters (see rcl_dist/models/dncnn.py).
    model = DnCNN(in_channels=1, out_channels=1, depth=17, width=64)
    assert sum(p.numel() for p in model.parameters()) == 556_032
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 15
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 17
    assert model.predicts_noise and model.raw is None


def test_unet_level_widths_double() -> None:
    model = UNet(width=8, depth=3)
    convs = [m for m in model.body.modules() if isinstance(m, nn.Conv2d)]
    assert max(c.out_channels for c in convs) == 8 * 2**3
    assert model.feature_channels == 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
