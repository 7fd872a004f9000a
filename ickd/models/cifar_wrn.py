"""Wide ResNets WRN-d-k for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2): pre-activation blocks.

State-dict names and shapes follow HobbitLong/RepDistiller ``models/wrn.py`` (identical in
megvii-research/mdistiller ``mdistiller/models/cifar/wrn.py``)::

    conv1.weight, block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2}.*,
    block{s}.layer.{i}.convShortcut.weight   (only where in/out planes differ),
    bn1.* (final BN before pooling), fc.{weight,bias}

Deviations (parameter-free): global adaptive average pooling instead of ``avg_pool2d(8)``;
dropout is not offered (the published models use dropRate 0); `in_channels` changes only ``conv1``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ickd.models.factory import MODELS


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv with identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        # Attribute name `convShortcut` is part of the published state_dict.
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # As in the reference: a projected shortcut starts from the pre-activated input,
        # an identity shortcut from the raw input.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage; the extra `.layer` level exists only to match the reference names."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1) for _ in range(n - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        self.feature_dim = ch[3]

        # Reference initialisation: He-normal (fan_out) convs, BN identity, zero Linear bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(feat), feat

    def forward_features(self, x: Tensor) -> tuple[Tensor, dict]:
        """Logits and the feature dict: ``stages`` = [conv1, block1, block2, relu(bn1(block3))]
        outputs (pre-activation blocks: the first three are pre-activation already), ``preact`` the
        same with ``bn1(block3)`` last (mdistiller's WRN feats / preact_feats), ``pooled``."""
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        pre = self.bn1(self.block3(f2))
        f3 = F.relu(pre)
        feat = torch.flatten(F.adaptive_avg_pool2d(f3, 1), 1)
        return self.fc(feat), {"pooled": feat, "stages": [f0, f1, f2, f3], "preact": [f0, f1, f2, pre]}


def _register(depth: int, widen: int) -> None:
    name = f"wrn_{depth}_{widen}"

    def factory(num_classes: int, in_channels: int = 3) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels)

    factory.__name__ = name
    factory.__doc__ = f"WRN-{depth}-{widen} for CIFAR, feature dim {64 * widen}."
    MODELS.add(name, factory)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)
