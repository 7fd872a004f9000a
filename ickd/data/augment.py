"""Batched, seeded augmentation on image tensors (the fast path for in-memory datasets).

Per-sample PIL transforms cost tens of microseconds per image in Python; on 2 CPU cores that would
dominate a CIFAR epoch, and on GPU it would starve the device. Here a whole batch is cropped and
flipped with one ``gather``: the random draws come from a caller-owned CPU ``torch.Generator`` (so
results depend only on that generator's seed, never on the global RNG). Drawing
(:func:`draw_crop_flip`) and applying (:func:`crop_flip`) are separate so a loader can draw a whole
epoch's parameters at once, move them to the device in one copy, and so the classic per-sample PIL
path can replay exactly the same crops and flips.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["draw_crop_flip", "crop_flip", "random_crop_flip", "normalize", "normalize_constants"]


def draw_crop_flip(
    batch: int, padding: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random parameters of :func:`random_crop_flip` for ``batch`` samples, drawn on the CPU.

    Returns ``(off_y, off_x, do_flip)``: int64 offsets uniform in [0, 2*padding] (the crop window's
    top-left corner in padded coordinates) and a bool flip coin per sample. Always 3 draws of
    ``batch`` values, in this order, whatever the flags, so the generator's stream (and therefore
    every later batch) does not depend on them.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    off_y = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    off_x = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    do_flip = torch.rand(batch, generator=generator) < 0.5
    return off_y, off_x, do_flip


def crop_flip(
    x: torch.Tensor,
    padding: int,
    flip: bool,
    off_y: torch.Tensor,
    off_x: torch.Tensor,
    do_flip: torch.Tensor,
) -> torch.Tensor:
    """Crop every image of ``x`` at its own offset from the zero-padded image, flipping where drawn.

    Args:
        x: (B, C, H, W) tensor of any dtype, on any device.
        padding: pixels of zero padding on each side.
        flip: whether flipping is enabled at all (``do_flip`` is ignored when false).
        off_y, off_x: int64 (B,) crop offsets in [0, 2*padding], on ``x``'s device.
        do_flip: bool (B,) per-sample flips, on ``x``'s device.

    The parameters must already be on ``x``'s device: a hidden per-batch host-to-device copy is
    exactly what the callers avoid (see ``InMemoryLoader``), so it is an error, not a convenience.

    Returns:
        A new (B, C, H, W) tensor with the same dtype and device as ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"crop_flip expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    dev = x.device
    for name, t in (("off_y", off_y), ("off_x", off_x), ("do_flip", do_flip)):
        if t.shape != (b,):
            raise ValueError(f"{name} must have shape ({b},) for a batch of {b}, got {tuple(t.shape)}")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but the batch is on {dev}; move the parameters first")
    if padding == 0 and not flip:
        return x.clone()
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
    This is :func:`draw_crop_flip` followed by :func:`crop_flip`.

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
    off_y, off_x, do_flip = draw_crop_flip(x.shape[0], padding, generator)
    dev = x.device
    return crop_flip(x, padding, flip, off_y.to(dev), off_x.to(dev), do_flip.to(dev))


def normalize_constants(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) tensors shaped (1, C, 1, 1) for :func:`normalize`."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return m, s


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``.

    The same operations, in the same order, as torchvision's ``to_tensor`` + ``normalize``, so the
    device pipeline and the classic one give bit-identical batches on CPU (a fused multiply-add
    would save two small kernels but differ in the last bit, and training curves amplify that).
    """
    return x.to(torch.float32).div_(255.0).sub(mean).div_(std)  # sub broadcasts 1 channel to len(mean)
