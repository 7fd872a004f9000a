"""Batched, seeded augmentation on image tensors (the fast path for in-memory datasets).

Per-sample PIL transforms cost tens of microseconds per image in Python; on 2 CPU cores that would
dominate a CIFAR epoch, and on GPU it would starve the device. Here a whole batch is cropped and
flipped with one ``gather``: the random draws come from a caller-owned CPU ``torch.Generator`` (so
results depend only on that generator's seed, never on the global RNG), and only the small index
tensors are moved to the batch's device.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["random_crop_flip", "normalize", "normalize_constants"]


def random_crop_flip(
    x: torch.Tensor,
    padding: int,
    flip: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Random crop with zero padding plus random horizontal flip, per sample, for a whole batch.

    Equivalent in distribution to torchvision ``RandomCrop(H, padding=padding)`` followed by
    ``RandomHorizontalFlip()`` applied to every image (zero fill, so on uint8 data the padded
    border becomes ``-mean/std`` after normalisation, exactly as with ToTensor+Normalize).

    Args:
        x: (B, C, H, W) tensor of any dtype, on any device.
        padding: pixels of zero padding on each side; offsets are uniform in [0, 2*padding].
        flip: whether to flip each image horizontally with probability 1/2.
        generator: CPU generator providing all random draws (3 draws of B values per call).

    Returns:
        A new (B, C, H, W) tensor with the same dtype and device as ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    # Always draw the same number of values so the generator's stream does not depend on the flags.
    off_y = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    off_x = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    do_flip = torch.rand(b, generator=generator) < 0.5
    if padding == 0 and not flip:
        return x.clone()
    dev = x.device
    off_y, off_x, do_flip = off_y.to(dev), off_x.to(dev), do_flip.to(dev)
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = off_y[:, None] + ar_h[None, :]  # (B, H) source rows in padded coordinates
    cols = ar_w[None, :].expand(b, w)
    if flip:
        # Flipping the crop window's columns == flipping the cropped image.
        cols = torch.where(do_flip[:, None], (w - 1 - ar_w)[None, :], cols)
    cols = off_x[:, None] + cols  # (B, W)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    out = padded.reshape(b, c, hp * wp).gather(2, flat)
    return out.reshape(b, c, h, w)


def normalize_constants(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) so that ``uint8 * scale + shift == (uint8/255 - mean)/std``."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * s), -m / s


def normalize(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised, in one fused multiply-add."""
    return torch.addcmul(shift, x.to(torch.float32), scale)
