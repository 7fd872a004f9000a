"""The feature dict a model gives distillation methods: ``pooled`` (B, D) from every model, and
``stages`` / ``preact`` (per-stage feature maps after / before the stage's last activation, the stem
first) from the families that define ``forward_features`` (CIFAR ResNet, WRN, VGG). The plain
``forward`` (logits, pooled) and every state_dict key are unchanged."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ickd.errors import ConfigError

FEATURE_KEYS = ("pooled", "stages", "preact")


def has_stage_features(net: nn.Module) -> bool:
    return callable(getattr(net, "forward_features", None))


def forward_features(net: nn.Module, x: torch.Tensor, keys: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, Any]]:
    """``net``'s logits and feature dict. Without ``keys`` beyond ``pooled`` this is the plain
    forward (the same ops); with ``stages``/``preact`` it needs ``net.forward_features``."""
    extra = [k for k in keys if k != "pooled"]
    unknown = [k for k in extra if k not in FEATURE_KEYS]
    if unknown:
        raise ConfigError(f"unknown feature key(s) {unknown}; a method may ask for {list(FEATURE_KEYS)}")
    if not extra:
        logits, pooled = net(x)
        return logits, {"pooled": pooled}
    if not has_stage_features(net):
        raise ConfigError(
            f"{type(net).__name__} does not give per-stage features ({', '.join(extra)}), which this distill method "
            "needs; use a CIFAR ResNet, WRN or VGG student/teacher, or a method over logits or pooled features "
            "(kd, dkd, ickd, crd)"
        )
    return net.forward_features(x)
