"""The classic input pipeline for in-memory uint8 datasets: DataLoader workers + torchvision PIL transforms.

The fast path (``InMemoryLoader``, pipeline ``device``) augments whole batches on the training
device. This one is the textbook recipe instead: a ``torch.utils.data.DataLoader`` whose workers turn
each uint8 image into a PIL image and run ``torchvision.transforms.functional`` on it
(pad -> crop -> hflip -> to_tensor -> normalize), with pinned memory and non-blocking copies to the
device. It exists as a switch (``trainer.pipeline=classic``) to compare against, and to show that
the fast path changes nothing but speed.

Same batches as the fast path: both execute the same :func:`~ickd.data.loader.plan_epoch` plan. The
batch sampler (main process) yields, for every batch, one ``(position, off_y, off_x, flip)`` key per
sample: the order, shard and crop/flip draws the device loader uses. Workers only apply them, so the
output is a pure function of (seed, epoch, rank): independent of ``num_workers``, of which worker
loads which batch, and of the global RNG (which is never touched).
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import functional as TF

from ickd.data.loader import (
    STREAM_WORKERS,
    AugmentSpec,
    Batch,
    EpochPlan,
    check_batch_size,
    check_shard,
    derive_seed,
    plan_epoch,
    shard_size,
)
from ickd.errors import ConfigError

__all__ = ["ClassicLoader", "PlannedImageDataset", "PlannedBatchSampler", "check_num_workers", "default_num_workers"]

#: A sample key: a bare position (no augmentation) or (position, off_y, off_x, flip).
SampleKey = Union[int, tuple[int, int, int, bool]]

#: Channel counts a PIL image can hold as uint8 (L, LA, RGB, RGBA).
PIL_CHANNELS = (1, 2, 3, 4)


def default_num_workers() -> int:
    """Workers used when the caller passes ``num_workers=None``."""
    return min(4, os.cpu_count() or 1)


def check_num_workers(num_workers: int | None) -> int:
    if num_workers is None:
        return default_num_workers()
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be a non-negative integer (0: load in the main process), got {num_workers!r}")
    return num_workers


class PlannedImageDataset(Dataset):
    """Item ``key`` -> ``(float image, label, position)`` through per-sample torchvision PIL transforms.

    ``key`` is a position (to_tensor + normalize only) or ``(position, off_y, off_x, flip)``: the
    image is zero-padded by ``padding``, cropped back to its size at (off_y, off_x) in padded
    coordinates, and mirrored when ``flip``. A 1-channel image is replicated to ``out_channels``
    before normalising, as ``InMemoryLoader`` does (so ``mean``/``std`` may have ``out_channels`` entries).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int,
        out_channels: int,
    ) -> None:
        self.images = images
        self.labels = labels.tolist()  # Python ints: cheap per-item lookups in the workers
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.padding = int(padding)
        self.out_channels = int(out_channels)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int, int]:
        if isinstance(key, tuple):
            pos, off_y, off_x, flip = key
        else:
            pos, off_y, off_x, flip = key, None, None, False
        raw = self.images[pos]
        img = TF.to_pil_image(raw)
        if off_y is not None:
            h, w = int(raw.shape[-2]), int(raw.shape[-1])
            if self.padding:
                img = TF.pad(img, self.padding, fill=0)
            img = TF.crop(img, off_y, off_x, h, w)
            if flip:
                img = TF.hflip(img)
        x = TF.to_tensor(img)
        if x.shape[0] != self.out_channels:
            x = x.expand(self.out_channels, -1, -1)
        # normalize copies first (inplace=False), which also materialises the expanded channels.
        return TF.normalize(x, self.mean, self.std), self.labels[pos], int(pos)


class PlannedBatchSampler(Sampler[list[SampleKey]]):
    """Yields each batch of an epoch's plan as a list of sample keys (see :class:`PlannedImageDataset`).

    Runs in the main process; ``epoch`` is set by the loader before every iteration, and the plan is
    made when iteration starts, so persistent workers still see every epoch's own order and crops.
    """

    def __init__(
        self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, augment: AugmentSpec | None,
        seed: int, rank: int, world_size: int,
    ) -> None:
        self.n, self.batch_size = n, batch_size
        self.shuffle, self.drop_last, self.augment, self.seed = shuffle, drop_last, augment, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(
            self.n, self.batch_size, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
            drop_last=self.drop_last, augment=self.augment, rank=self.rank, world_size=self.world_size,
        )

    def __len__(self) -> int:
        n, b = shard_size(self.n, self.rank, self.world_size, even=self.shuffle), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        # Built eagerly (not a generator), so the plan belongs to the epoch set when iteration began.
        plan = self.plan(self.epoch)
        order = plan.order.tolist()
        if plan.crops is None:
            return iter([order[start:stop] for start, stop in plan.batch_bounds()])
        assert self.augment is not None
        off_y, off_x, do_flip = (t.tolist() for t in plan.crops)
        flip = self.augment.flip  # do_flip is drawn either way; it only counts when flipping is on
        keys = [(p, oy, ox, flip and fl) for p, oy, ox, fl in zip(order, off_y, off_x, do_flip)]
        return iter([keys[start:stop] for start, stop in plan.batch_bounds()])


class ClassicLoader:
    """DataLoader over in-memory uint8 images with per-sample PIL transforms, yielding ``(x, y, idx)``.

    Takes the same arguments and keeps the same contract as ``InMemoryLoader`` (order, sharding,
    ``drop_last``, channel replication, ``set_epoch`` and auto-advance) and yields the same batches
    (bit for bit on CPU) on ``device``. ``images``/``labels`` stay on the CPU (workers read them);
    ``num_workers`` worker processes (0: the main process) are kept alive across epochs.
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
        device: str | torch.device = "cpu",
        num_workers: int | None = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        if images.device.type != "cpu" or labels.device.type != "cpu":
            raise ValueError("the classic pipeline reads images in CPU workers; pass CPU tensors")
        c = int(images.shape[1])
        if c not in PIL_CHANNELS:
            raise ConfigError(
                f"pipeline=classic converts images to PIL, which holds {', '.join(map(str, PIL_CHANNELS))} "
                f"channels; this data has {c}. Fix: use pipeline=device"
            )
        self.out_channels = out_channels or c
        if self.out_channels != c and c != 1:
            raise ValueError(f"can only replicate 1 channel to {self.out_channels}, data has {c}")
        self.batch_size = check_batch_size(batch_size)
        self.rank, self.world_size = check_shard(rank, world_size)
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.seed = int(seed)
        self.device = torch.device(device)
        self.num_workers = check_num_workers(num_workers)
        self.epoch = 0
        self.dataset = PlannedImageDataset(
            images, labels, mean=mean, std=std, padding=augment.padding if augment else 0,
            out_channels=self.out_channels,
        )
        self.sampler = PlannedBatchSampler(
            int(images.shape[0]), self.batch_size, shuffle=shuffle, drop_last=drop_last, augment=augment,
            seed=self.seed, rank=self.rank, world_size=self.world_size,
        )
        # DataLoader draws its worker base seed from this generator (from the global RNG otherwise);
        # re-seeded per epoch so even that draw is a function of (seed, epoch). The transforms use
        # no randomness of their own, so worker seeds cannot change any output anyway.
        self._loader_gen = torch.Generator()
        self.dataloader = DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            # The sampler runs in the main process, so persistent workers still follow set_epoch.
            persistent_workers=self.num_workers > 0, generator=self._loader_gen,
        )

    @property
    def num_samples(self) -> int:
        """Samples per epoch before ``drop_last`` (this rank's shard when sharded), as InMemoryLoader."""
        return shard_size(len(self.dataset), self.rank, self.world_size, even=self.shuffle)

    def plan(self, epoch: int) -> EpochPlan:
        """The CPU plan of ``epoch`` (what an iteration after ``set_epoch(epoch)`` yields)."""
        return self.sampler.plan(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.epoch = self.epoch
        self._loader_gen.manual_seed(derive_seed(self.seed, self.epoch, STREAM_WORKERS))
        self.epoch += 1  # auto-advance unless set_epoch is called (ickd.data.loader docstring)
        return self._to_device(iter(self.dataloader))

    def _to_device(self, it: Iterator[Any]) -> Iterator[Batch]:
        nb = self.device.type == "cuda"  # pinned batches: the copy overlaps with compute
        for x, y, idx in it:
            yield (x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb),
                   idx.to(self.device, non_blocking=nb))

    def __repr__(self) -> str:
        return (
            f"ClassicLoader(n={self.num_samples}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, augment={self.augment}, seed={self.seed}, device={self.device}, "
            f"num_workers={self.num_workers}"
            + (f", rank={self.rank}, world_size={self.world_size})" if self.world_size > 1 else ")")
        )
