"""VGG with BatchNorm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19): 5 conv blocks, no FC stack.

State-dict names and shapes follow HobbitLong/RepDistiller ``models/vgg.py`` built with
``batch_norm=True`` (the ``vgg*_bn`` builders; identical in megvii-research/mdistiller
``mdistiller/models/cifar/vgg.py``)::

    block{0..4}.{3j}.{weight,bias}   conv j of the block (convs have a bias)
    block{0..4}.{3j+1}.*             its BatchNorm
    classifier.{weight,bias}         Linear(512, num_classes)

Indices step by 3 because each conv is followed by BN and a (parameter-free) ReLU module; the last
ReLU of each block is dropped and applied functionally in `forward`, as in the reference.
Spatial schedule as in the reference: max-pool after blocks 0, 1, 2; after block 3 only for inputs
of height >= 64 (the reference tests height == 64, i.e. Tiny-ImageNet; identical on 32x32 and
64x64); global average pool after block 4. On 32x32 input that is 3 max-pools
(32 -> 4), on 28x28 input 28 -> 3. `in_channels` changes only the first conv.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ickd.models.factory import MODELS

# Conv widths per block, as in the reference configurations S, A, B, D, E.
_CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [
        [64, 64],
        [128, 128],
        [256, 256, 256, 256],
        [512, 512, 512, 512],
        [512, 512, 512, 512],
    ],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])  # end on BN: forward applies the ReLU (pre-activation taps)


class CifarVGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        ins = [in_channels] + [widths[-1] for widths in cfg[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _make_block(widths, c) for widths, c in zip(cfg, ins)
        )
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        self.feature_dim = cfg[-1][-1]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        large_input = x.shape[2] >= 64
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if large_input:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(feat), feat

    def forward_features(self, x: Tensor) -> tuple[Tensor, dict]:
        """Logits and the feature dict: ``stages`` = the five blocks' activated outputs (before
        pooling), ``preact`` the same before their ReLU (mdistiller's VGG feats), ``pooled``."""
        large_input = x.shape[2] >= 64
        stages, preact = [], []
        for i, block in enumerate((self.block0, self.block1, self.block2, self.block3, self.block4)):
            if i in (1, 2, 3) or (i == 4 and large_input):
                x = F.max_pool2d(x, 2)
            pre = block(x)
            x = F.relu(pre)
            stages.append(x)
            preact.append(pre)
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(feat), {"pooled": feat, "stages": stages, "preact": preact}


def _register(name: str) -> None:
    cfg = _CFGS[name]

    def factory(num_classes: int, in_channels: int = 3) -> CifarVGG:
        return CifarVGG(cfg, num_classes, in_channels)

    factory.__name__ = name
    factory.__doc__ = f"{name} with BatchNorm (CIFAR), feature dim 512."
    MODELS.add(name, factory)


for _name in _CFGS:
    _register(_name)
