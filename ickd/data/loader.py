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

An epoch is first *planned* on the CPU (:func:`plan_epoch`: order, shard, batch boundaries and every
sample's crop/flip draw), then executed: by :class:`InMemoryLoader` on whole batches on the training
device, or by ``ickd.data.classic.ClassicLoader`` per sample with torchvision PIL transforms in
DataLoader workers. Both execute the same plan, so both pipelines yield the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ickd.data.augment import crop_flip, draw_crop_flip, normalize, normalize_constants
from ickd.errors import ConfigError

__all__ = [
    "AugmentSpec",
    "Batch",
    "EpochPlan",
    "InMemoryLoader",
    "check_shard",
    "derive_seed",
    "epoch_generator",
    "plan_epoch",
    "shard_order",
    "shard_size",
]

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


@dataclass(frozen=True)
class EpochPlan:
    """Everything random about one epoch of one rank, decided up front on the CPU.

    Attributes:
        order: int64 (num_yielded,) dataset positions in the order they are yielded (this rank's
            shard, already cut to the last yielded sample when ``drop_last``).
        batch_size: samples per batch; the last batch may be smaller (never empty).
        crops: ``(off_y, off_x, do_flip)`` of every yielded sample, aligned with ``order``, as drawn
            by :func:`~ickd.data.augment.draw_crop_flip`; None without augmentation.
    """

    order: torch.Tensor
    batch_size: int
    crops: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None

    def batch_bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` into ``order``/``crops`` of every batch, in yield order."""
        n, b = int(self.order.shape[0]), self.batch_size
        return [(start, min(start + b, n)) for start in range(0, n, b)]


def plan_epoch(
    n: int,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    drop_last: bool,
    augment: AugmentSpec | None,
    rank: int = 0,
    world_size: int = 1,
) -> EpochPlan:
    """The order and augmentation draws of ``epoch`` for an ``n``-sample split (module docstring).

    Crop/flip parameters are drawn batch by batch, in yield order, from the (seed, epoch, rank)
    augmentation stream: exactly the calls a per-batch ``random_crop_flip`` loop makes, so the
    result does not depend on whether a loader draws per batch or per epoch.
    """
    if shuffle:
        order = torch.randperm(n, generator=epoch_generator(seed, epoch, STREAM_ORDER))
    else:
        order = torch.arange(n)
    order = shard_order(order, rank, world_size, even=shuffle)
    count = int(order.shape[0])
    if drop_last:
        order = order[: (count // batch_size) * batch_size]
    plan = EpochPlan(order=order, batch_size=batch_size, crops=None)
    if augment is None:
        return plan
    # Every rank shares the order; the augmentation stream is per rank so ranks do not repeat
    # each other's crops.
    shard = () if world_size == 1 else (rank, world_size)
    gen = epoch_generator(seed, epoch, STREAM_AUGMENT, *shard)
    draws = [draw_crop_flip(stop - start, augment.padding, gen) for start, stop in plan.batch_bounds()]
    if draws:
        crops = tuple(torch.cat(parts) for parts in zip(*draws))
    else:  # drop_last with fewer samples than one batch: an empty epoch
        crops = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool))
    return EpochPlan(order=order, batch_size=batch_size, crops=crops)  # type: ignore[arg-type]


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
        self._mean, self._std = normalize_constants(mean, std, self.device)

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

    def plan(self, epoch: int) -> EpochPlan:
        """The CPU plan of ``epoch`` (what an iteration after ``set_epoch(epoch)`` yields)."""
        return plan_epoch(
            int(self.images.shape[0]), self.batch_size, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
            drop_last=self.drop_last, augment=self.augment, rank=self.rank, world_size=self.world_size,
        )

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch = epoch + 1  # see module docstring: auto-advance unless set_epoch is called
        plan = self.plan(epoch)
        # The whole epoch's order and crop/flip parameters go to the device in ONE copy, here, and
        # batches only slice them. On CUDA a copy from pageable host memory synchronises the
        # stream, so a per-batch copy would stall the asynchronous (or graph-captured) train step
        # every iteration; once per epoch costs nothing.
        rows = [plan.order]
        if plan.crops is not None:
            off_y, off_x, do_flip = plan.crops
            rows += [off_y, off_x, do_flip.to(torch.int64)]
        on_device = torch.stack(rows).to(self.device)
        order = on_device[0]
        crops = (on_device[1], on_device[2], on_device[3] != 0) if plan.crops is not None else None
        return self._batches(order, crops, plan.batch_bounds())

    def _batches(
        self,
        order: torch.Tensor,
        crops: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        bounds: list[tuple[int, int]],
    ) -> Iterator[Batch]:
        for start, stop in bounds:
            idx = order[start:stop]
            xb = self.images.index_select(0, idx)
            if crops is not None:
                assert self.augment is not None
                off_y, off_x, do_flip = (t[start:stop] for t in crops)
                xb = crop_flip(xb, self.augment.padding, self.augment.flip, off_y, off_x, do_flip)
            x = normalize(xb, self._mean, self._std)
            if self.out_channels != x.shape[1]:
                x = x.expand(-1, self.out_channels, -1, -1).contiguous()
            yield x, self.labels.index_select(0, idx), idx

    def __repr__(self) -> str:
        return (
            f"InMemoryLoader(n={self.num_samples}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, augment={self.augment}, seed={self.seed}, device={self.device}"
            + (f", rank={self.rank}, world_size={self.world_size})" if self.world_size > 1 else ")")
        )
