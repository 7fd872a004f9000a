"""ShuffleNetV1 (groups 3) and ShuffleNetV2 (net size 1x) for CIFAR.

ShuffleV1 state-dict names and shapes follow HobbitLong/RepDistiller ``models/ShuffleNetv1.py``
(identical in megvii-research/mdistiller ``mdistiller/models/cifar/ShuffleNetv1.py``)::

    conv1.weight (1x1, 24 ch), bn1.*, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}.*, linear.*

ShuffleV2 follows ``models/ShuffleNetv2.py`` (same in mdistiller)::

    conv1.weight (1x1, 24 ch), bn1.*,
    layer{1,2,3}.0.{conv1..conv5,bn1..bn5}.*       (DownBlock, stride 2)
    layer{1,2,3}.{i>=1}.{conv1,bn1,conv2,bn2,conv3,bn3}.*   (BasicBlock on half the channels)
    conv2.weight, bn2.*, linear.*

Deviations (parameter-free): global adaptive average pooling instead of ``avg_pool2d(4)`` (same on
32x32; 28x28 works too); `in_channels` changes only ``conv1``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ickd.models.factory import MODELS


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[N, g*c, H, W] -> interleave the g groups channel-wise."""
    if groups == 1:
        return x
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


# ---------------------------------------------------------------- ShuffleNetV1
class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1.

    Stride-1 units add the input; stride-2 units concatenate an average-pooled input instead.
    """

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int
    ) -> None:
        super().__init__()
        self.stride = stride
        self.first_groups = first_groups
        mid = out_planes // 4
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            # count_include_pad=True (torch default) as in the reference's AvgPool2d(3, 2, 1).
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(
        self,
        out_planes: tuple[int, int, int],
        num_blocks: tuple[int, int, int],
        groups: int,
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        stages = []
        for stage, (planes, count) in enumerate(zip(out_planes, num_blocks)):
            units = []
            for i in range(count):
                # The first unit concatenates its input, so its branch produces planes - in_planes.
                # The very first 1x1 conv of the network is not grouped (too few input channels).
                units.append(
                    ShuffleV1Unit(
                        in_planes,
                        planes - in_planes if i == 0 else planes,
                        stride=2 if i == 0 else 1,
                        groups=groups,
                        first_groups=1 if (stage == 0 and i == 0) else groups,
                    )
                )
                in_planes = planes
            stages.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.linear(feat), feat


@MODELS.register("ShuffleV1")
def shufflev1(num_classes: int, in_channels: int = 3) -> ShuffleNetV1:
    """ShuffleNetV1, groups 3, stages [240, 480, 960] x [4, 8, 4], feature dim 960."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, in_channels)


# ---------------------------------------------------------------- ShuffleNetV2
class ShuffleV2Basic(nn.Module):
    """Split channels in half; transform the second half; concat; shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, stride=1, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: two branches on the full input, each producing out/2 channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(
        self,
        out_channels: tuple[int, int, int, int],
        num_blocks: tuple[int, int, int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        ch = 24
        stages = []
        for out, count in zip(out_channels[:3], num_blocks):
            units = [ShuffleV2Down(ch, out)] + [ShuffleV2Basic(out) for _ in range(count)]
            stages.append(nn.Sequential(*units))
            ch = out
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(ch, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.feature_dim = out_channels[3]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.linear(feat), feat


@MODELS.register("ShuffleV2")
def shufflev2(num_classes: int, in_channels: int = 3) -> ShuffleNetV2:
    """ShuffleNetV2 net size 1 (stages 116/232/464, 1024-d head), feature dim 1024."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes, in_channels)
