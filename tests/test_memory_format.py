"""channels_last (NHWC) training: the trainer's placement of the model (rcl_dist.train.worker.place_model)
changes where the numbers sit in memory, not what they are."""

from __future__ import annotations

import copy

import torch

from rcl_dist.config import load_config
from rcl_dist.models.factory import build_model_from_config
from rcl_dist.train.worker import place_model


def _unet():
    torch.manual_seed(0)
    return build_model_from_config(load_config(None, ["model.width=8", "model.depth=2"]))


def test_place_model_converts_only_when_asked():
    cpu = torch.device("cpu")
    nhwc = place_model(_unet(), True, cpu)
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain = place_model(_unet(), False, cpu)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))


def test_channels_last_unet_gives_the_same_outputs_and_gradients():
    """NCHW inputs into an NHWC model: the Eq. 2 residual and the weight gradients of the usual layout."""
    ref = _unet()
    nhwc = place_model(copy.deepcopy(ref), True, torch.device("cpu"))
    x = torch.rand(3, 3, 40, 36, generator=torch.Generator().manual_seed(1))  # not a multiple of 2**depth
    out_ref, out = ref.residual(x), nhwc.residual(x)
    assert (out - out_ref).norm() <= 1e-5 * out_ref.norm()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out_ref.backward(g)
    out.backward(g)
    for (name, a), b in zip(ref.named_parameters(), nhwc.parameters()):
        assert (b.grad - a.grad).norm() <= 1e-4 * a.grad.norm() + 1e-12, name
