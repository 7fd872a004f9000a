"""MobileNetV1 for ImageNet (Howard et al. 2017), the student of the ResNet50 -> MobileNetV1 pair.

torchvision has no MobileNetV1. Parameter names follow the layout used by the KD benchmark code
(mdistiller's ImageNet ``MobileNetV1``: ``model.<i>`` sequential blocks, then ``fc``), so its
checkpoints keep the same key structure: 4.23 M parameters with 1000 classes.
"""
from __future__ import annotations

import torch
from torch import nn

from ickd.models.factory import MODELS

# (out_channels, stride) of the 13 depthwise-separable blocks after the stem.
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, 32, 2)]
        channels = 32
        for out, stride in _BLOCKS:
            layers.append(_conv_dw(channels, out, stride))
            channels = out
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        self.feature_dim: int = channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = torch.flatten(self.model(x), 1)
        return self.fc(feat), feat


@MODELS.register("mobilenet_v1")
def mobilenet_v1(num_classes: int, in_channels: int = 3) -> MobileNetV1:
    return MobileNetV1(num_classes, in_channels)
