"""Inference copies of frozen networks with fewer kernels per forward (issue 12, "kernel diet").

:func:`fold_frozen` returns an eval-only copy of a network whose BatchNorm layers that follow a
convolution are folded into it (``w' = w * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) *
gamma / sqrt(var + eps)``, computed in fp32 by ``torch.fx.experimental.optimization.fuse``), with all
convolution and linear weights kept in the compute dtype, so a bf16-autocast forward neither runs the BN
passes nor casts a weight per call. Only for frozen networks in eval mode: the copy does not follow
later changes of the original (callers key their cache on the original's parameter versions).
BatchNorms that do not follow a convolution (pre-activation blocks) stay, in fp32 as before.
Networks that ``torch.fx`` cannot trace (data-dependent control flow) give None: use the original.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["fold_frozen"]


def fold_frozen(model: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format = torch.preserve_format) -> nn.Module | None:
    """An eval-mode copy of ``model`` with Conv+BN folded and weights in ``dtype`` (None: untraceable)."""
    from torch.fx.experimental.optimization import fuse

    if model.training:
        raise ValueError("fold_frozen needs a model in eval mode (BatchNorm running statistics are folded in)")
    try:
        folded = fuse(model, inplace=False)
    except Exception as exc:  # torch.fx cannot trace every network (e.g. control flow on shapes)
        log.info("frozen network %s not folded (%s: %s); its forward keeps the BatchNorm passes",
                 type(model).__name__, type(exc).__name__, exc)
        return None
    folded.eval().requires_grad_(False)
    folded.to(memory_format=memory_format)
    for module in folded.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            module.to(dtype=dtype)
    return folded
