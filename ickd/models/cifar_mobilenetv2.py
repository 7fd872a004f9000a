"""MobileNetV2 for CIFAR as used in the KD benchmarks: width 0.5, expansion 6 (``mobile_half``).

State-dict names and shapes follow HobbitLong/RepDistiller ``models/mobilenetv2.py`` (identical in
megvii-research/mdistiller ``mdistiller/models/cifar/mobilenetv2.py``)::

    conv1.{0 (3x3 s2 conv), 1 (BN)}.*
    blocks.{stage 0..6}.{i}.conv.{0,1 | 3,4 | 6,7}.*   pointwise / depthwise / pointwise-linear + BNs
    conv2.{0 (1x1 conv to 1280), 1 (BN)}.*
    classifier.0.{weight,bias}

Note the stem has stride 2 (32 -> 16), as in the reference; the expansion conv exists even for
expansion 1 (stage 0). Deviation (parameter-free): global adaptive average pooling instead of
``AvgPool2d(2, ceil_mode=True)`` (same on 32x32; 28x28 works too); `in_channels` changes only the
stem conv.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ickd.models.factory import MODELS

# (expansion t, output channels c, repeats n, first stride s) before width scaling.
# t == 1 stays 1; every other stage uses the model's expansion (6 for the benchmark model).
_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = inp * expansion
        self.use_residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width_mult: float = 0.5,
        expansion: int = 6,
    ) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTING:
            t = expansion if t != 1 else 1
            out = int(c * width_mult)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
            self.blocks.append(nn.Sequential(*stage))
        # The reference never shrinks the last layer below 1280 channels.
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.feature_dim = last

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        feat = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(feat), feat


@MODELS.register("MobileNetV2")
def mobilenetv2_half(num_classes: int, in_channels: int = 3) -> CifarMobileNetV2:
    """CIFAR MobileNetV2, width 0.5, expansion 6 (reference `mobile_half`), feature dim 1280."""
    return CifarMobileNetV2(num_classes, in_channels, width_mult=0.5, expansion=6)
