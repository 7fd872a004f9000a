"""CIFAR variants of ResNet18/34/50: 4 stages (64..512 planes), 3x3 stride-1 stem, no max-pool.

State-dict names and shapes follow HobbitLong/RepDistiller ``models/resnetv2.py`` (identical in
megvii-research/mdistiller ``mdistiller/models/cifar/resnetv2.py``)::

    conv1.weight, bn1.*, layer{1..4}.{i}.{conv1,bn1,conv2,bn2[,conv3,bn3]}.*,
    layer{s}.{i}.shortcut.{0 (1x1 conv), 1 (BN)}.*, linear.{weight,bias}

Unlike the torchvision ResNets the projection is called ``shortcut`` and the classifier ``linear``.
Deviation (parameter-free): `in_channels` changes only ``conv1``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ickd.models.factory import MODELS


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """1x1 conv + BN when the shape changes; an empty Sequential (identity, no state) otherwise."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetV2(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        stages = []
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            strides = [1 if stage == 0 else 2] + [1] * (count - 1)
            blocks = []
            for stride in strides:
                blocks.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.linear(feat), feat


@MODELS.register("ResNet18")
def resnet18_cifar(num_classes: int, in_channels: int = 3) -> CifarResNetV2:
    """CIFAR ResNet18 (BasicBlock [2,2,2,2]), feature dim 512."""
    return CifarResNetV2(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@MODELS.register("ResNet34")
def resnet34_cifar(num_classes: int, in_channels: int = 3) -> CifarResNetV2:
    """CIFAR ResNet34 (BasicBlock [3,4,6,3]), feature dim 512."""
    return CifarResNetV2(BasicBlock, (3, 4, 6, 3), num_classes, in_channels)


@MODELS.register("ResNet50")
def resnet50_cifar(num_classes: int, in_channels: int = 3) -> CifarResNetV2:
    """CIFAR ResNet50 (Bottleneck [3,4,6,3]), feature dim 2048."""
    return CifarResNetV2(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
