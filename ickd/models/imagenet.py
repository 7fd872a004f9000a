"""ImageNet models from torchvision, registered with a ``tv_`` prefix.

The classes subclass torchvision's own ``ResNet`` / ``MobileNetV2`` and override only ``forward``,
so the state_dict names are torchvision's unchanged and torchvision checkpoints (e.g. the official
``resnet34-*.pth`` files users download themselves) load with strict=True. Weights are always
freshly initialised here (``weights=None`` semantics): nothing is ever downloaded.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import mobilenetv2 as tv_mobilenetv2
from torchvision.models import resnet as tv_resnet

from ickd.models.factory import MODELS


class TVResNet(tv_resnet.ResNet):
    """torchvision ResNet whose forward returns (logits, pooled 512/2048-d feature)."""

    def __init__(self, *args: object, in_channels: int = 3, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim: int = self.fc.in_features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        feat = torch.flatten(self.avgpool(x), 1)
        return self.fc(feat), feat


class TVMobileNetV2(tv_mobilenetv2.MobileNetV2):
    """torchvision MobileNetV2 (width 1.0) whose forward returns (logits, pooled 1280-d feature)."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(num_classes=num_classes)
        if in_channels != 3:
            stem = self.features[0][0]
            self.features[0][0] = nn.Conv2d(
                in_channels, stem.out_channels, 3, stride=2, padding=1, bias=False
            )
            nn.init.kaiming_normal_(self.features[0][0].weight, mode="fan_out")
        self.feature_dim: int = self.last_channel

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x = self.features(x)
        feat = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(feat), feat


_RESNETS: dict[str, tuple[type[nn.Module], list[int], dict[str, int]]] = {
    "tv_resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2], {}),
    "tv_resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3], {}),
    "tv_resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3], {}),
    "tv_resnet101": (tv_resnet.Bottleneck, [3, 4, 23, 3], {}),
    "tv_wide_resnet50_2": (tv_resnet.Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}),
}


def _register_resnet(name: str) -> None:
    block, layers, extra = _RESNETS[name]

    def factory(num_classes: int, in_channels: int = 3) -> TVResNet:
        return TVResNet(block, layers, num_classes=num_classes, in_channels=in_channels, **extra)

    factory.__name__ = name
    factory.__doc__ = f"torchvision {name[3:]} (ImageNet layout, random init)."
    MODELS.add(name, factory)


for _name in _RESNETS:
    _register_resnet(_name)


@MODELS.register("tv_mobilenet_v2")
def tv_mobilenet_v2(num_classes: int, in_channels: int = 3) -> TVMobileNetV2:
    """torchvision mobilenet_v2 (width 1.0, ImageNet layout, random init), feature dim 1280."""
    return TVMobileNetV2(num_classes, in_channels)
