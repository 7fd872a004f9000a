"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4): 3 stages of post-act BasicBlocks.

State-dict names and shapes follow HobbitLong/RepDistiller ``models/resnet.py`` (identical in
megvii-research/mdistiller ``mdistiller/models/cifar/resnet.py``), so the published
``cifar_teachers`` checkpoints load with strict=True::

    conv1.weight, bn1.*, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}.*,
    layer{s}.0.downsample.{0 (1x1 conv), 1 (BN)}.*, fc.{weight,bias}

Parameter-free deviations: global adaptive average pooling instead of ``AvgPool2d(8)`` (same result
on 32x32 inputs, and 28x28 inputs work too); `in_channels` changes only ``conv1``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ickd.models.factory import MODELS, check_widths


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add the (projected) input, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # Named `downsample` (a Sequential of conv, BN) to match the reference state_dict.
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, the output before its final ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        pre = out + shortcut
        return F.relu(pre), pre


class CifarResNet(nn.Module):
    """Depth 6n+2 ResNet with widths [stem, stage1, stage2, stage3]."""

    def __init__(
        self, depth: int, widths: Sequence[int], num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 >= 8, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for stage, planes in enumerate(widths[1:4]):
            stride = 1 if stage == 0 else 2
            blocks = [BasicBlock(in_planes, planes, stride)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes

        # Reference initialisation (kaiming fan_out convs, BN = identity); Linear keeps torch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(feat), feat

    def forward_features(self, x: Tensor) -> tuple[Tensor, dict]:
        """Logits and the feature dict (ickd.models.FEATURE_KEYS): ``stages`` = [stem, layer1, layer2,
        layer3] outputs, ``preact`` = the same before their last ReLU (mdistiller's feats /
        preact_feats), ``pooled``. Same ops as :meth:`forward`."""
        pre = self.bn1(self.conv1(x))
        x = F.relu(pre)
        stages, preact = [x], [pre]
        for layer in (self.layer1, self.layer2, self.layer3):
            *head, last = list(layer)
            for block in head:
                x = block(x)
            x, pre = last.forward_preact(x)
            stages.append(x)
            preact.append(pre)
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(feat), {"pooled": feat, "stages": stages, "preact": preact}


def _register(name: str, depth: int, default_widths: tuple[int, int, int, int]) -> None:
    def factory(
        num_classes: int, in_channels: int = 3, *, widths: Sequence[int] | None = None
    ) -> CifarResNet:
        w = default_widths if widths is None else check_widths(widths, 4, name)
        return CifarResNet(depth, w, num_classes, in_channels)

    factory.__name__ = name
    factory.__doc__ = f"CIFAR ResNet depth {depth}, widths {list(default_widths)} (overridable)."
    MODELS.add(name, factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, (16, 16, 32, 64))
_register("resnet8x4", 8, (32, 64, 128, 256))
_register("resnet32x4", 32, (32, 64, 128, 256))
