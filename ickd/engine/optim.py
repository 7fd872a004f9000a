"""Optimiser and learning-rate schedule from the ``optim`` config section."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from ickd.errors import ConfigError

SCHEDULES = ("multistep", "cosine", "constant")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any], fused: bool = False) -> torch.optim.Optimizer:
    """``fused``: one fused kernel per step on CUDA instead of several multi-tensor launches (the
    optimiser runs outside the captured step, so its launch count is part of every step)."""
    name = str(cfg["name"])
    speed = {"fused": True} if fused else {}
    lr = float(cfg["lr"])
    if lr <= 0:
        raise ConfigError(f"optim.lr={lr} must be > 0")
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=float(cfg["momentum"]),
            nesterov=bool(cfg["nesterov"]),
            weight_decay=float(cfg["weight_decay"]),
            **speed,
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=float(cfg["weight_decay"]), **speed)
    raise ConfigError(f"optim.name={name!r} is not valid; use sgd or adamw")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-epoch schedule (stepped once per epoch), with an optional linear warm-up."""
    kind = str(cfg["schedule"])
    warmup = int(cfg["warmup_epochs"])
    if kind == "multistep":
        milestones = sorted(int(m) for m in cfg["milestones"])
        gamma = float(cfg["gamma"])

        def factor(epoch: int) -> float:
            return gamma ** sum(epoch >= m for m in milestones)

    elif kind == "cosine":
        min_factor = float(cfg["min_lr_factor"])

        def factor(epoch: int) -> float:
            span = max(1, epochs - warmup)
            t = min(1.0, max(0.0, (epoch - warmup) / span))
            return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    elif kind == "constant":

        def factor(epoch: int) -> float:
            return 1.0

    else:
        raise ConfigError(f"optim.schedule={kind!r} is not valid; use one of {', '.join(SCHEDULES)}")

    def with_warmup(epoch: int) -> float:
        if warmup > 0 and epoch < warmup:
            return (epoch + 1) / warmup
        return factor(epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, with_warmup)
