"""ImageNet (or any image-folder dataset) via torchvision ImageFolder + DataLoader + PIL transforms.

Reproducibility without the global RNG: the sampler (in the main process) draws, per epoch, the
order *and* one seed per sample from generators seeded by (seed, epoch). Each worker receives
``(position, sample_seed)`` keys and applies the random transforms under ``torch.random.fork_rng``
seeded with that sample seed. A sample's augmentation is therefore a pure function of
(seed, epoch, position): independent of num_workers, of which worker loads it, and of resumption;
and the caller's global RNG state is left untouched even with ``num_workers=0``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ickd.data.base import DATASETS, VAL_SALT, DataBundle, check_given_root, check_subset, resolve_root, split_train, stratified_subset
from ickd.data.loader import (
    STREAM_AUGMENT,
    STREAM_ORDER,
    STREAM_WORKERS,
    Batch,
    check_batch_size,
    check_shard,
    derive_seed,
    epoch_generator,
    shard_order,
    shard_size,
)
from ickd.errors import ConfigError, DatasetNotFoundError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IndexedImageFolder", "FolderLoader", "ImageFolderBundle", "build_imagenet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LAYOUT = (
    "Expected layout:\n"
    "  <root>/train/<wnid>/*.JPEG   e.g. <root>/train/n01440764/n01440764_10026.JPEG\n"
    "  <root>/val/<wnid>/*.JPEG     e.g. <root>/val/n01440764/ILSVRC2012_val_00000293.JPEG\n"
)
_VALPREP = (
    "The official validation archive extracts flat; move the images into class folders with the usual "
    "valprep.sh script (https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh), "
    "run inside <root>/val."
)

NO_AUGMENT = -1  # sample-seed sentinel: use the deterministic eval transform


class _ClassMapFolder(ImageFolder):
    """ImageFolder whose class->index map is imposed (the train split's), so val labels can never
    shift when val lacks a class folder."""

    def __init__(self, root: str, class_to_idx: dict[str, int], **kwargs: Any) -> None:
        self._imposed = class_to_idx
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        present = {e.name for e in os.scandir(directory) if e.is_dir()}
        extra = sorted(present - set(self._imposed))
        if extra:
            raise DatasetNotFoundError(
                f"{directory} has class folder(s) not in the train split: {', '.join(extra[:5])}"
                f"{' ...' if len(extra) > 5 else ''}. Fix: train/ and val/ must use the same class folder names."
            )
        return sorted(self._imposed, key=self._imposed.__getitem__), dict(self._imposed)


class IndexedImageFolder(Dataset):
    """Wraps an ImageFolder (optionally restricted to ``indices``); item ``(pos, sample_seed)`` ->
    ``(image tensor, label, pos)`` where ``pos`` is the position within this (sub)set."""

    def __init__(
        self,
        folder: ImageFolder,
        indices: np.ndarray | None,
        train_transform: Callable[[Any], torch.Tensor],
        eval_transform: Callable[[Any], torch.Tensor],
    ) -> None:
        self.folder = folder
        self.indices = np.arange(len(folder)) if indices is None else np.asarray(indices, dtype=np.int64)
        targets = np.asarray(folder.targets, dtype=np.int64)
        self.labels = torch.from_numpy(targets[self.indices])
        self.train_transform = train_transform
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, int, int]:
        pos, sample_seed = key if isinstance(key, tuple) else (key, NO_AUGMENT)
        path, label = self.folder.samples[int(self.indices[pos])]
        img = self.folder.loader(path)
        if sample_seed == NO_AUGMENT:
            x = self.eval_transform(img)
        else:
            # Seed the transforms' global-RNG draws locally, then restore the caller's RNG state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                x = self.train_transform(img)
        return x, label, int(pos)


class EpochKeySampler(Sampler[tuple[int, int]]):
    """Yields ``(position, sample_seed)`` keys; order and seeds are functions of (seed, epoch).

    Sharded (``rank``/``world_size``, rules in ``ickd.data.loader``), each rank yields its positions of
    the shared order; a sample's seed depends on its position only, so its augmentation does not
    depend on the number of ranks either.
    """

    def __init__(self, n: int, shuffle: bool, augment: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.augment, self.seed = n, shuffle, augment, seed
        self.rank, self.world_size = check_shard(rank, world_size)
        self.epoch = 0

    def __len__(self) -> int:
        return shard_size(self.n, self.rank, self.world_size, even=self.shuffle)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order_t = torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch, STREAM_ORDER))
        else:
            order_t = torch.arange(self.n)
        order = shard_order(order_t, self.rank, self.world_size, even=self.shuffle).tolist()
        if self.augment:
            # Seeds indexed by position (not by draw order), so a sample's augmentation is
            # independent of the shuffle.
            seeds = torch.randint(0, 2**62, (self.n,), generator=epoch_generator(self.seed, self.epoch, STREAM_AUGMENT))
            seeds_l = seeds.tolist()
            return iter([(p, seeds_l[p]) for p in order])
        return iter([(p, NO_AUGMENT) for p in order])


class FolderLoader:
    """DataLoader over an IndexedImageFolder, yielding ``(x, y, idx)`` on ``device``.

    Same contract as InMemoryLoader: ``set_epoch(e)`` selects the epoch; without it each iteration
    advances the epoch by one.
    """

    def __init__(
        self,
        dataset: IndexedImageFolder,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        augment: bool,
        seed: int,
        device: str | torch.device,
        num_workers: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.batch_size = check_batch_size(batch_size)
        self.device = torch.device(device)
        self.sampler = EpochKeySampler(len(dataset), shuffle, augment, int(seed), rank, world_size)
        self.epoch = 0
        self._seed = int(seed)
        # DataLoader draws its worker base seed from this generator (the global RNG otherwise);
        # re-seeded per epoch so even that draw is a function of (seed, epoch).
        self._loader_gen = torch.Generator()
        self.dataloader = DataLoader(
            dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=drop_last,
            num_workers=num_workers, pin_memory=self.device.type == "cuda",
            # Workers outlive epochs (forking ImageNet-sized sample lists each epoch is slow); the
            # sampler runs in the main process, so set_epoch still reaches every epoch.
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, generator=self._loader_gen,
        )

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.epoch = self.epoch
        self._loader_gen.manual_seed(derive_seed(self._seed, self.epoch, STREAM_WORKERS))
        self.epoch += 1
        it = iter(self.dataloader)  # the sampler is consumed here, with this epoch
        return self._to_device(it)

    def _to_device(self, it: Iterator[Any]) -> Iterator[Batch]:
        nb = self.device.type == "cuda"
        for x, y, idx in it:
            yield (x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb),
                   idx.to(self.device, non_blocking=nb))


class ImageFolderBundle(DataBundle):
    """train/ and val/ image folders with ImageNet-style transforms; an optional holdout is a list of
    train/ images (evaluated with the val transform)."""

    def __init__(
        self, *, name: str, train: IndexedImageFolder, val: IndexedImageFolder, classes: list[str],
        image_size: int, source: str, seed: int, default_workers: int, holdout: IndexedImageFolder | None = None,
    ) -> None:
        self.name = name
        self.train_set, self.val_set, self.holdout_set = train, val, holdout
        self.num_holdout = len(holdout) if holdout is not None else 0
        self.holdout_indices = holdout.indices if holdout is not None else None
        self.train_indices = train.indices if holdout is not None or len(train) < len(train.folder) else None
        self.num_classes = len(classes)
        self.class_names = classes
        self.in_channels = 3
        self.image_size = image_size
        self.num_train, self.num_val = len(train), len(val)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.source = source
        self.seed = seed
        self.default_workers = default_workers

    @property
    def train_labels(self) -> torch.Tensor:
        return self.train_set.labels

    @property
    def val_labels(self) -> torch.Tensor:
        return self.val_set.labels

    @property
    def holdout_labels(self) -> torch.Tensor | None:
        return self.holdout_set.labels if self.holdout_set is not None else None

    def _workers(self, num_workers: int | None) -> int:
        n = self.default_workers if num_workers is None else num_workers
        if n < 0:
            raise ConfigError(f"num_workers must be >= 0, got {n}")
        return n

    def train_loader(
        self, batch_size: int, shuffle: bool = True, drop_last: bool = False, augment: bool = True,
        device: str | torch.device = "cpu", num_workers: int | None = None, seed: int | None = None,
        rank: int = 0, world_size: int = 1, pipeline: str | None = None,
    ) -> FolderLoader:
        self.check_pipeline(pipeline)
        return FolderLoader(
            self.train_set, batch_size, shuffle=shuffle, drop_last=drop_last, augment=augment,
            seed=self.seed if seed is None else seed, device=device, num_workers=self._workers(num_workers),
            rank=rank, world_size=world_size,
        )

    def val_loader(
        self, batch_size: int, device: str | torch.device = "cpu", num_workers: int | None = None,
        rank: int = 0, world_size: int = 1, pipeline: str | None = None,
    ) -> FolderLoader:
        self.check_pipeline(pipeline)
        return FolderLoader(
            self.val_set, batch_size, shuffle=False, drop_last=False, augment=False, seed=self.seed,
            device=device, num_workers=self._workers(num_workers), rank=rank, world_size=world_size,
        )

    def holdout_loader(
        self, batch_size: int, device: str | torch.device = "cpu", num_workers: int | None = None,
        rank: int = 0, world_size: int = 1, pipeline: str | None = None,
    ) -> FolderLoader | None:
        if self.holdout_set is None:
            return None
        self.check_pipeline(pipeline)
        return FolderLoader(
            self.holdout_set, batch_size, shuffle=False, drop_last=False, augment=False, seed=self.seed,
            device=device, num_workers=self._workers(num_workers), rank=rank, world_size=world_size,
        )


def _check_split_dir(split_dir: Path, split: str) -> None:
    if not split_dir.is_dir():
        raise DatasetNotFoundError(
            f"imagenet: {split_dir} does not exist. Fix: set dataset.root=<folder holding train/ and val/>.\n{_LAYOUT}"
        )
    entries = list(os.scandir(split_dir))
    has_dirs = any(e.is_dir() for e in entries)
    flat_images = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    if not has_dirs:
        hint = _VALPREP if flat_images else "Fix: put the images into one sub-folder per class."
        raise DatasetNotFoundError(
            f"imagenet: {split_dir} has no class sub-folders"
            f"{f' ({len(flat_images)} images lie directly in it)' if flat_images else ''}. {hint}\n{_LAYOUT}"
        )


@DATASETS.register("imagenet")
def build_imagenet(
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    holdout: int | float | None = None,
    image_size: int = 224,
    resize_size: int | None = None,
    num_workers: int | None = None,
) -> ImageFolderBundle:
    """ImageNet from ``<root>/{train,val}/<wnid>/*.JPEG`` (any ImageFolder tree works).

    Train: RandomResizedCrop(image_size) + flip; val: Resize(resize_size, default image_size*256/224)
    + CenterCrop(image_size); both normalised with the ImageNet mean/std. ``download`` is not
    possible (ImageNet needs a licence); ``num_workers`` sets the loaders' default worker count.
    ``holdout`` carves a class-balanced list of train/ images (val transform) before ``train_subset``.
    """
    if download:
        raise ConfigError(
            "dataset.download=true is not supported for imagenet (the files need a licence from image-net.org). "
            "Fix: download ILSVRC2012 yourself, lay it out as below and set dataset.root=...\n" + _LAYOUT
        )
    if not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"dataset.image_size must be an integer >= 8, got {image_size!r}")
    check_given_root(root, "imagenet", holds="train/ and val/", detail=_LAYOUT)
    base = resolve_root(root)
    train_dir, val_dir = base / "train", base / "val"
    _check_split_dir(train_dir, "train")
    _check_split_dir(val_dir, "val")
    try:
        train_folder = ImageFolder(str(train_dir))
        val_folder = _ClassMapFolder(str(val_dir), train_folder.class_to_idx, allow_empty=True)
    except DatasetNotFoundError:
        raise
    except (FileNotFoundError, ValueError) as err:
        raise DatasetNotFoundError(f"imagenet: cannot read image folders under {base}: {err}\n{_LAYOUT}") from err
    if len(val_folder) == 0:
        raise DatasetNotFoundError(f"imagenet: {val_dir} holds no images in its class folders.\n{_LAYOUT}")

    resize = resize_size or int(round(image_size * 256 / 224))
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])

    n_va = check_subset(val_subset, len(val_folder), "val_subset", "imagenet")
    val_idx = stratified_subset(np.asarray(val_folder.targets), n_va, seed, VAL_SALT) if n_va and n_va < len(val_folder) else None
    train_idx, holdout_idx = split_train(np.asarray(train_folder.targets), holdout, train_subset, seed, "imagenet")

    default_workers = min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers)
    return ImageFolderBundle(
        name="imagenet",
        train=IndexedImageFolder(train_folder, train_idx, train_tf, eval_tf),
        val=IndexedImageFolder(val_folder, val_idx, train_tf, eval_tf),
        holdout=IndexedImageFolder(train_folder, holdout_idx, train_tf, eval_tf) if holdout_idx is not None else None,
        classes=list(train_folder.classes), image_size=image_size, source=str(base), seed=seed,
        default_workers=default_workers,
    )
