"""Loaders that yield ``(x, y, idx)`` batches with reproducible per-epoch shuffling and augmentation.

Reproducibility contract (the memory bank and resume logic rely on it): the order and the
augmentation of epoch ``e`` are a pure function of ``(seed, e)``. Each epoch builds fresh
``torch.Generator``s seeded from ``(seed, e, stream)``; the global RNG is never touched. So a run
resumed at an epoch boundary (``loader.set_epoch(e)``) sees exactly the batches an uninterrupted run
would have seen.

If ``set_epoch`` is never called, each new iteration advances the epoch by one (a forgotten
``set_epoch`` must not silently repeat the same order every epoch, the classic DistributedSampler
pitfall); an explicit ``set_epoch(e)`` always wins.

Sharding for data-parallel training (``rank``, ``world_size``): every rank computes the same
(seed, epoch) order and takes its positions ``rank::world_size`` (:func:`shard_order`). With
per-rank batch ``b``, batch k of all ranks together is exactly global batch k (size ``b*world_size``)
of that order. Shuffled loaders first drop the order's tail to a multiple of ``world_size`` (at most
``world_size - 1`` samples, different ones each epoch), so every rank yields the same number of
equal batches, which DDP's collectives need; fixed-order loaders (evaluation, the bank fill pass)
keep every sample exactly once, so shards may differ by one sample. ``world_size=1`` is the plain,
unsharded loader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ickd.data.augment import normalize, normalize_constants, random_crop_flip
from ickd.errors import ConfigError

__all__ = ["AugmentSpec", "InMemoryLoader", "epoch_generator", "derive_seed", "Batch", "shard_order", "shard_size", "check_shard"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Independent random streams per epoch, so e.g. turning augmentation off does not change the order.
STREAM_ORDER = 0
STREAM_AUGMENT = 1
STREAM_SUBSET = 2
STREAM_WORKERS = 3


def derive_seed(*keys: int) -> int:
    """Mix integer keys (seed, epoch, stream, ...) into one well-spread 63-bit seed.

    SeedSequence hashing keeps nearby keys (seed 0 epoch 1 vs seed 1 epoch 0) uncorrelated,
    which a naive ``seed * 1000 + epoch`` would not.
    """
    entropy = [int(k) & 0xFFFF_FFFF_FFFF_FFFF for k in keys]  # SeedSequence wants non-negative ints
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    return int(state[0]) & 0x7FFF_FFFF_FFFF_FFFF


def epoch_generator(seed: int, epoch: int, stream: int, *extra: int) -> torch.Generator:
    """A fresh CPU generator for one (seed, epoch, stream[, extra keys such as a rank])."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, epoch, stream, *extra))
    return g


def check_shard(rank: int, world_size: int) -> tuple[int, int]:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} and world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
    return int(rank), int(world_size)


def shard_size(n: int, rank: int, world_size: int, even: bool) -> int:
    """Length of ``shard_order`` for an order of ``n`` samples."""
    if world_size == 1:
        return n
    if even:
        return n // world_size
    return len(range(rank, n, world_size))


def shard_order(order: torch.Tensor, rank: int, world_size: int, even: bool) -> torch.Tensor:
    """This rank's positions of an epoch's order: ``order[rank::world_size]``, after dropping the
    tail to a multiple of ``world_size`` when ``even`` (equal shards). See the module docstring."""
    if world_size == 1:
        return order
    n = order.shape[0]
    if even:
        if n < world_size:
            raise ConfigError(f"{n} samples cannot be split over {world_size} processes; use fewer processes")
        order = order[: n - n % world_size]
    return order[rank::world_size]


def check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


@dataclass(frozen=True)
class AugmentSpec:
    """Batched train augmentation: RandomCrop(size, padding) + optional RandomHorizontalFlip."""

    padding: int = 4
    flip: bool = True


class InMemoryLoader:
    """Batches an in-memory uint8 image tensor; augmentation and normalisation run on whole batches.

    The images live on ``device`` (moved once by the caller); every batch is gathered, augmented and
    normalised there, so on a GPU no per-step host-to-device copy happens at all.

    Yields ``(x, y, idx)``: ``x`` float32 (B, C', H, W) normalised, ``y`` int64 (B,), ``idx`` int64 (B,)
    positions in this split, all on ``device``.

    ``rank``/``world_size`` select one data-parallel shard (module docstring); ``batch_size`` is then
    the per-rank batch. A sharded loader draws its augmentation from a stream of its own rank.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = True,
        drop_last: bool = False,
        augment: AugmentSpec | None = None,
        seed: int = 0,
        out_channels: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        if labels.device != images.device:
            raise ValueError("images and labels must be on the same device")
        self.images = images
        self.labels = labels
        self.batch_size = check_batch_size(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = int(seed)
        self.rank, self.world_size = check_shard(rank, world_size)
        self.epoch = 0
        self.device = images.device
        c = images.shape[1]
        self.out_channels = out_channels or c
        if self.out_channels != c and c != 1:
            raise ValueError(f"can only replicate 1 channel to {self.out_channels}, data has {c}")
        self._scale, self._shift = normalize_constants(mean, std, self.device)

    @property
    def num_samples(self) -> int:
        """Samples yielded per epoch (this rank's shard when sharded)."""
        return shard_size(int(self.images.shape[0]), self.rank, self.world_size, even=self.shuffle)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch = epoch + 1  # see module docstring: auto-advance unless set_epoch is called
        n = int(self.images.shape[0])
        if self.shuffle:
            order = torch.randperm(n, generator=epoch_generator(self.seed, epoch, STREAM_ORDER))
        else:
            order = torch.arange(n)
        # Every rank shares the order; the augmentation stream is per rank so ranks do not repeat
        # each other's crops (the batch augmentation draws in batch order).
        shard = () if self.world_size == 1 else (self.rank, self.world_size)
        order = shard_order(order, self.rank, self.world_size, even=self.shuffle)
        aug_gen = epoch_generator(self.seed, epoch, STREAM_AUGMENT, *shard) if self.augment else None
        return self._batches(order.to(self.device), aug_gen)

    def _batches(self, order: torch.Tensor, aug_gen: torch.Generator | None) -> Iterator[Batch]:
        n, b = self.num_samples, self.batch_size
        stop = (n // b) * b if self.drop_last else n
        for start in range(0, stop, b):
            idx = order[start : start + b]
            xb = self.images.index_select(0, idx)
            if aug_gen is not None:
                assert self.augment is not None
                xb = random_crop_flip(xb, self.augment.padding, self.augment.flip, aug_gen)
            x = normalize(xb, self._scale, self._shift)
            if self.out_channels != x.shape[1]:
                x = x.expand(-1, self.out_channels, -1, -1).contiguous()
            yield x, self.labels.index_select(0, idx), idx

    def __repr__(self) -> str:
        return (
            f"InMemoryLoader(n={self.num_samples}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, augment={self.augment}, seed={self.seed}, device={self.device}"
            + (f", rank={self.rank}, world_size={self.world_size})" if self.world_size > 1 else ")")
        )
