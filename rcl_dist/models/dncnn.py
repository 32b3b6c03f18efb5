"""DnCNN (Zhang et al., TIP 2017), the backbone of App. D.3 of Dong et al. (IJCAI 2022).

DnCNN predicts the noise, so the restored image is x - f(x) and the residual of Eq. 2 becomes
n_hat(x) = x - (x - f(x)) = f(x) (App. D.3).

Parameter count: the default DnCNN-S (``in_channels=out_channels=1, depth=17, width=64``) has
556,032 trainable parameters = 3x3 conv weights 1*64*9 + 15 * 64*64*9 + 64*1*9 (= 554,112)
+ batch-norm affine weight and bias 15 * 2*64 (= 1,920). All convolutions are bias-free, as in
the widely used PyTorch port of DnCNN; BN running statistics are buffers and are not counted.
(The original MatConvNet model also has biases on the first and last convs, 64 + 1 more.)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Restorer, check_backbone

__all__ = ["DnCNN"]


class DnCNN(Restorer):
    """conv + ReLU, (depth - 2) x (conv + BN + ReLU), then a 3x3 conv as the replaceable head.

    [B, C_in, H, W] -> features [B, width, H, W] -> noise estimate [B, C_out, H, W] (``head="rgb"``).

    Args:
        in_channels / out_channels: image channels (1 for grey, 3 for RGB).
        depth: total number of conv layers including the head (>= 2; 17 for DnCNN-S).
        width: feature channels (64).
        head: ``"rgb"`` (3x3 bias-free conv, the original last layer), ``"sr2"`` or ``"raw2rgb"``.
            With a head that changes the size, f(x) is taken to be an image (see ``restore``).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, depth: int = 17, width: int = 64, head: str = "rgb") -> None:
        super().__init__()
        check_backbone(in_channels, out_channels, head, {"depth": (depth, 2), "width": (width, 1)})
        self.raw = None
        self.predicts_noise = True
        self.depth = depth
        self.width = width
        self.in_channels = in_channels
        self.feature_channels = width
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),  # [B, C_in, H, W] -> [B, width, H, W]
            nn.ReLU(inplace=True),
        ]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = self.new_head(head, out_channels)  # [B, width, H, W] -> [B, C_out, H, W]

    def head_kwargs(self, kind: str) -> dict[str, Any]:
        # DnCNN's last layer is a 3x3 conv (bias-free, as in the rest of the network).
        return {"kernel_size": 3, "bias": False} if kind == "rgb" else {}

    # forward (Restorer's): head(body(x)), plus the bicubic upsampling of x for an SR head with that skip
