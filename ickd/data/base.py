"""Dataset registry, the DataBundle interface, subsets, and ``build_data``.

A *DataBundle* is what the trainer gets: dataset facts (classes, channels, size, split sizes, where
the files came from) plus ``train_loader``/``val_loader`` factories. Every batch carries the dataset
index of each sample, because the IC-KD memory bank is addressed by it.
"""
from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from ickd.data.classic import ClassicLoader
from ickd.data.loader import STREAM_SUBSET, AugmentSpec, Batch, InMemoryLoader, derive_seed
from ickd.errors import ConfigError
from ickd.registry import Registry

__all__ = [
    "DATASETS",
    "DataBundle",
    "TensorBundle",
    "Loader",
    "build_data",
    "stratified_subset",
    "check_subset",
    "resolve_root",
    "DEFAULT_DATA_ROOT",
]

#: name -> builder(root, download, train_subset, val_subset, seed, **kwargs) -> DataBundle
DATASETS: Registry[Callable[..., "DataBundle"]] = Registry("dataset")

#: Used when neither ``root`` nor $ICKD_DATA_ROOT is set.
DEFAULT_DATA_ROOT = "~/.cache/ickd/data"


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """``root`` if given, else $ICKD_DATA_ROOT, else DEFAULT_DATA_ROOT (``~`` expanded)."""
    chosen = root if root not in (None, "") else os.environ.get("ICKD_DATA_ROOT") or DEFAULT_DATA_ROOT
    return Path(os.fspath(chosen)).expanduser()


class Loader(Protocol):
    """What both loader kinds provide."""

    batch_size: int
    epoch: int

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


def check_subset(value: int | None, size: int, what: str, dataset: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"dataset.{what} must be a positive integer or null (all), got {value!r}")
    if value > size:
        raise ConfigError(
            f"dataset.{what}={value} is larger than the {dataset} {what.split('_')[0]} split "
            f"({size} samples); use at most {size} or null for all"
        )
    return int(value)


def stratified_subset(
    labels: np.ndarray | torch.Tensor, n: int, seed: int, salt: int = 0
) -> np.ndarray:
    """Pick ``n`` indices, class-balanced (per-class counts differ by at most 1 where classes allow).

    Deterministic in ``(seed, salt)``; ``salt`` keeps e.g. the train and val choices independent.
    Each class's samples are ranked in a seeded random order; then samples are taken round-robin
    by rank (rank 0 of every class, then rank 1, ...), with a seeded class order breaking ties in
    the last round. Small classes simply run out and the others fill the gap.
    Returned indices are sorted ascending (keeps on-disk locality; position i in the subset is the
    i-th chosen sample).
    """
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.astype(np.int64, copy=False)
    total = y.shape[0]
    if not 0 < n <= total:
        raise ValueError(f"subset size {n} must be in [1, {total}]")
    rng = np.random.default_rng(derive_seed(seed, STREAM_SUBSET, salt))
    perm = rng.permutation(total)
    ys = y[perm]
    # rank of each permuted sample within its class: position among equal labels after a stable sort.
    order = np.argsort(ys, kind="stable")
    sorted_y = ys[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_y)) + 1]
    counts = np.diff(np.r_[starts, len(sorted_y)])
    rank_sorted = np.arange(len(sorted_y)) - np.repeat(starts, counts)
    rank = np.empty_like(rank_sorted)
    rank[order] = rank_sorted
    classes = np.unique(y)
    class_key = np.empty(int(classes.max()) + 1 if classes.size else 0, dtype=np.int64)
    class_key[classes] = rng.permutation(classes.size)
    pick = np.lexsort((class_key[ys], rank))[:n]  # primary key: rank, then shuffled class order
    return np.sort(perm[pick])


class DataBundle(ABC):
    """A dataset's metadata plus its train/val loaders.

    Attributes:
        name: registry name (``cifar100`` ...).
        num_classes, in_channels, image_size: what the model must accept (image_size is H == W).
        num_train, num_val: split sizes after subsetting; ``idx`` of a batch is in [0, num_train).
        source: where the data came from (folder path, or a description for synthetic data).
        class_names: one name per class.
        mean, std: per-channel normalisation constants applied to every batch.
        seed: default seed of the loaders (and of the subset choice).
        pipelines: the input pipelines this dataset offers, default first: ``device`` (the uint8
            dataset resident on the training device, batched augmentation there, no workers) and/or
            ``classic`` (torch DataLoader workers running per-sample torchvision PIL transforms).
    """

    pipelines: tuple[str, ...] = ("classic",)

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int
    num_val: int
    source: str
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int

    @property
    @abstractmethod
    def train_labels(self) -> torch.Tensor:
        """int64 (num_train,) labels of the train split, in index order (CPU)."""

    @property
    @abstractmethod
    def val_labels(self) -> torch.Tensor:
        """int64 (num_val,) labels of the val split, in index order (CPU)."""

    @abstractmethod
    def train_loader(
        self,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: bool = True,
        device: str | torch.device = "cpu",
        num_workers: int | None = None,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        pipeline: str | None = None,
    ) -> Loader:
        """Loader over the train split yielding (x, y, idx); ``seed`` defaults to the bundle's,
        ``pipeline`` to the first of ``pipelines`` (:func:`check_pipeline`).

        ``rank``/``world_size`` give one data-parallel shard of every epoch's order, with
        ``batch_size`` per rank (``ickd.data.loader`` docstring: shuffled shards are equal-sized,
        fixed-order shards keep every sample).
        """

    @abstractmethod
    def val_loader(
        self,
        batch_size: int,
        device: str | torch.device = "cpu",
        num_workers: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        pipeline: str | None = None,
    ) -> Loader:
        """Loader over the val split in fixed order, no augmentation (``rank::world_size`` when sharded)."""

    def check_pipeline(self, pipeline: str | None) -> str:
        """``pipeline`` if this dataset offers it (None: its default), else a ConfigError naming the choices."""
        if pipeline in (None, "auto"):
            return self.pipelines[0]
        if pipeline not in self.pipelines:
            raise ConfigError(
                f"trainer.pipeline={pipeline!r} is not available for dataset {self.name!r}; "
                f"it offers: {', '.join(self.pipelines)} (or auto)"
            )
        return pipeline

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, "
            f"in_channels={self.in_channels}, image_size={self.image_size}, num_train={self.num_train}, "
            f"num_val={self.num_val}, source={self.source!r})"
        )


class TensorBundle(DataBundle):
    """A small dataset held in memory as uint8 (N, C, H, W) tensors.

    Pipelines: ``device`` (default; InMemoryLoader, the data moved to the device once and augmented
    there in whole batches) or ``classic`` (ClassicLoader: DataLoader workers with per-sample
    torchvision PIL transforms; ``num_workers=None`` means ``min(4, CPUs)``). Both yield the same
    batches for the same seed and epoch: same samples, crops and flips, and (on CPU) bit-identical
    normalised values, as both normalise with torchvision's operations.
    """

    pipelines = ("device", "classic")

    def __init__(
        self,
        *,
        name: str,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        val_images: torch.Tensor,
        val_labels: torch.Tensor,
        num_classes: int,
        class_names: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        source: str,
        augment: AugmentSpec | None,
        seed: int = 0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        out_channels: int | None = None,
    ) -> None:
        for split, x, y in (("train", train_images, train_labels), ("val", val_images, val_labels)):
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[2] != x.shape[3]:
                raise ValueError(f"{name} {split} images must be uint8 (N, C, S, S), got {x.dtype} {tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{name} {split}: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
        self.seed = int(seed)
        n_tr = check_subset(train_subset, train_images.shape[0], "train_subset", name)
        n_va = check_subset(val_subset, val_images.shape[0], "val_subset", name)
        train_labels = train_labels.to(torch.int64)
        val_labels = val_labels.to(torch.int64)
        if n_tr is not None and n_tr < train_images.shape[0]:
            keep = torch.from_numpy(stratified_subset(train_labels, n_tr, self.seed, salt=0))
            train_images, train_labels = train_images[keep], train_labels[keep]
        if n_va is not None and n_va < val_images.shape[0]:
            keep = torch.from_numpy(stratified_subset(val_labels, n_va, self.seed, salt=1))
            val_images, val_labels = val_images[keep], val_labels[keep]
        self.name = name
        self._train = (train_images.contiguous(), train_labels.contiguous())
        self._val = (val_images.contiguous(), val_labels.contiguous())
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.out_channels = out_channels or int(train_images.shape[1])
        self.in_channels = self.out_channels
        self.image_size = int(train_images.shape[-1])
        self.num_train = int(train_images.shape[0])
        self.num_val = int(val_images.shape[0])
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.source = source
        self.augment_spec = augment
        # device string -> (train_x, train_y, val_x, val_y); the data is moved to a device only once.
        self._on_device: dict[str, tuple[torch.Tensor, ...]] = {}

    @property
    def train_labels(self) -> torch.Tensor:
        return self._train[1]

    @property
    def val_labels(self) -> torch.Tensor:
        return self._val[1]

    @property
    def train_images(self) -> torch.Tensor:
        """uint8 (num_train, C, H, W) CPU tensor, unnormalised (before channel replication)."""
        return self._train[0]

    @property
    def val_images(self) -> torch.Tensor:
        return self._val[0]

    def _tensors(self, device: str | torch.device) -> tuple[torch.Tensor, ...]:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        key = str(dev)
        if key not in self._on_device:
            self._on_device[key] = tuple(t.to(dev) for t in (*self._train, *self._val))
        return self._on_device[key]

    def train_loader(
        self,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: bool = True,
        device: str | torch.device = "cpu",
        num_workers: int | None = None,  # classic pipeline only; the device pipeline has no workers
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        pipeline: str | None = None,
    ) -> InMemoryLoader | ClassicLoader:
        options: dict[str, Any] = dict(
            mean=self.mean, std=self.std, shuffle=shuffle, drop_last=drop_last,
            augment=self.augment_spec if augment else None,
            seed=self.seed if seed is None else seed, out_channels=self.out_channels,
            rank=rank, world_size=world_size,
        )
        if self.check_pipeline(pipeline) == "classic":
            x, y = self._train
            return ClassicLoader(x, y, batch_size, device=device, num_workers=num_workers, **options)
        x, y, _, _ = self._tensors(device)
        return InMemoryLoader(x, y, batch_size, **options)

    def val_loader(
        self,
        batch_size: int,
        device: str | torch.device = "cpu",
        num_workers: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        pipeline: str | None = None,
    ) -> InMemoryLoader | ClassicLoader:
        options: dict[str, Any] = dict(
            mean=self.mean, std=self.std, shuffle=False, drop_last=False, augment=None, seed=self.seed,
            out_channels=self.out_channels, rank=rank, world_size=world_size,
        )
        if self.check_pipeline(pipeline) == "classic":
            x, y = self._val
            return ClassicLoader(x, y, batch_size, device=device, num_workers=num_workers, **options)
        _, _, x, y = self._tensors(device)
        return InMemoryLoader(x, y, batch_size, **options)


_COMMON = ("root", "download", "train_subset", "val_subset", "seed")


def build_data(
    name: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    **dataset_kwargs: Any,
) -> DataBundle:
    """Build the named dataset.

    Args:
        name: one of ``DATASETS.names()`` (unknown names raise UnknownNameError listing them).
        root: data folder (dataset-specific layout); default $ICKD_DATA_ROOT or ~/.cache/ickd/data.
        download: allow downloading missing files (needs internet).
        train_subset / val_subset: use a seeded class-balanced subset of this many samples;
            ``idx`` then counts positions inside the subset.
        seed: chooses the subsets and is the loaders' default shuffle/augmentation seed.
        **dataset_kwargs: dataset-specific options (e.g. ``image_size`` for imagenet).
    """
    builder = DATASETS.get(name)
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(dataset_kwargs) - set(params))
        if unknown:
            valid = sorted(set(params) - set(_COMMON))
            raise ConfigError(
                f"dataset {name!r} does not accept option(s) {', '.join(unknown)}; "
                f"its options are: {', '.join(valid) or '(none)'}"
            )
    return builder(
        root=root, download=bool(download), train_subset=train_subset, val_subset=val_subset,
        seed=int(seed), **dataset_kwargs,
    )
