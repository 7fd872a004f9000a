"""A seeded, learnable, class-conditional image dataset for tests and smoke runs (no files needed)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ickd.data.base import DATASETS, TensorBundle
from ickd.data.loader import AugmentSpec, derive_seed
from ickd.errors import ConfigError

__all__ = ["make_synthetic", "build_synthetic"]


def make_synthetic(
    num_classes: int, n: int, image_size: int, channels: int, noise: float, data_seed: int, split: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images = class prototype + per-sample brightness jitter + pixel noise, as uint8 (n, C, S, S).

    Prototypes are smooth (a 4x4 random grid upsampled), so a few-pixel crop shift barely changes
    them and a small CNN separates the classes within a few epochs. Prototypes depend only on
    ``data_seed``; ``split`` (0 train, 1 val) selects independent samples around the same prototypes.
    """
    g_proto = torch.Generator().manual_seed(derive_seed(data_seed, 0xC1A55))
    grid = torch.rand(num_classes, channels, 4, 4, generator=g_proto)
    protos = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=False)
    protos = 40.0 + 175.0 * protos  # keep away from 0/255 so noise is not clipped much
    g = torch.Generator().manual_seed(derive_seed(data_seed, 0x5A3, split))
    # Balanced labels in a seeded order.
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    bright = 12.0 * torch.randn(n, 1, 1, 1, generator=g)
    pix = (255.0 * noise) * torch.randn(n, channels, image_size, image_size, generator=g)
    images = (protos[labels] + bright + pix).round().clamp_(0, 255).to(torch.uint8)
    return images, labels


@DATASETS.register("synthetic")
def build_synthetic(
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    holdout: int | float | None = None,
    num_classes: int = 10,
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 32,
    channels: int = 3,
    noise: float = 0.25,
    data_seed: int = 0,
    padding: int | None = None,
) -> TensorBundle:
    """Synthetic data; ``root``/``download`` are ignored. ``data_seed`` fixes the images, while
    ``seed`` (the run seed) only picks subsets and loader order, so seeds of a sweep share data."""
    for key, val, lo in (("num_classes", num_classes, 2), ("num_train", num_train, 1), ("num_val", num_val, 1),
                         ("image_size", image_size, 4), ("channels", channels, 1)):
        if not isinstance(val, int) or val < lo:
            raise ConfigError(f"dataset.{key} must be an integer >= {lo}, got {val!r}")
    if noise < 0:
        raise ConfigError(f"dataset.noise must be >= 0, got {noise!r}")
    xtr, ytr = make_synthetic(num_classes, num_train, image_size, channels, noise, data_seed, split=0)
    xva, yva = make_synthetic(num_classes, num_val, image_size, channels, noise, data_seed, split=1)
    # Normalise with the train set's own statistics (the generator defines no canonical constants).
    f = xtr.to(torch.float32) / 255.0
    mean = f.mean(dim=(0, 2, 3)).tolist()
    std = f.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    pad = image_size // 8 if padding is None else padding
    return TensorBundle(
        name="synthetic", train_images=xtr, train_labels=ytr, val_images=xva, val_labels=yva,
        num_classes=num_classes, class_names=[f"class_{i}" for i in range(num_classes)],
        mean=mean, std=std,
        source=f"synthetic(num_classes={num_classes}, image_size={image_size}, data_seed={data_seed})",
        augment=AugmentSpec(padding=pad, flip=True), seed=seed,
        train_subset=train_subset, val_subset=val_subset, holdout=holdout,
    )
