"""Dataset registry, the DataBundle interface, subsets, and ``build_data``.

A *DataBundle* is what the trainer gets: dataset facts (classes, channels, size, split sizes, where
the files came from) plus ``train_loader``/``val_loader``/``holdout_loader`` factories. Every batch
carries the dataset index of each sample, because the IC-KD memory bank is addressed by it.

Splits: *train* (what the model and the memory bank see), *val* (the dataset's official test set;
metrics ``test/*``) and, with ``dataset.holdout``, a *holdout* carved from the official train split
before ``train_subset`` is drawn (metrics ``holdout/*``): hyperparameters are tuned on it, so the
test set stays untouched until the final report.
"""
from __future__ import annotations

import inspect
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from ickd.data.classic import ClassicLoader
from ickd.data.loader import STREAM_SUBSET, AugmentSpec, Batch, InMemoryLoader, derive_seed
from ickd.errors import ConfigError, DatasetNotFoundError
from ickd.registry import Registry

__all__ = [
    "DATASETS",
    "DataBundle",
    "TensorBundle",
    "Loader",
    "build_data",
    "stratified_subset",
    "check_subset",
    "check_holdout",
    "split_train",
    "HOLDOUT_SALT",
    "VAL_SALT",
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


def check_given_root(
    root: str | os.PathLike[str] | None, dataset: str, download: bool = False, holds: str = "the dataset files", detail: str = "",
) -> None:
    """A ``dataset.root`` the user gave must exist: never fall back silently to another copy.

    ``root=None`` keeps each loader's documented fallbacks; with ``download=true`` a missing root is
    created by the download.
    """
    if root in (None, ""):
        return
    path = Path(os.fspath(root)).expanduser()
    if path.is_dir() or (download and not path.exists()):
        return
    problem = "is not a folder" if path.exists() else "does not exist"
    raise DatasetNotFoundError(
        f"{dataset}: dataset.root={root} {problem} (resolved: {path.resolve()}). Fix: point dataset.root at the "
        f"folder holding {holds}, or set dataset.root=null to use the default places ($ICKD_DATA_ROOT, "
        "system folders; see the README's Datasets section)" + (f"\n{detail}" if detail else "")
    )


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


#: ``stratified_subset`` salts: train subset 0, val subset 1, holdout 2 (independent choices).
TRAIN_SALT, VAL_SALT, HOLDOUT_SALT = 0, 1, 2


def check_holdout(value: int | float | None, size: int, dataset: str) -> int:
    """The holdout size in samples for ``dataset.holdout`` (null/0: none, an int count, or a float
    fraction in (0, 1) of the ``size`` official training images); ConfigError naming the fix."""
    if value is None:
        return 0
    fix = (f"use null (no holdout), a count 1..{size - 1} (e.g. 5000) or a fraction in (0, 1) "
           f"(e.g. 0.1) of the {size} {dataset} training images")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"dataset.holdout={value!r} is not a number; {fix}")
    if isinstance(value, (int, np.integer)):
        n = int(value)
        if n < 0 or n >= size:
            raise ConfigError(f"dataset.holdout={n} must leave training images (0 <= holdout < {size}); {fix}")
        return n
    frac = float(value)
    if not 0.0 < frac < 1.0 or math.isnan(frac):
        raise ConfigError(f"dataset.holdout={value!r}: a fraction must lie strictly between 0 and 1; {fix}")
    n = int(round(frac * size))
    if n < 1 or n >= size:
        raise ConfigError(f"dataset.holdout={value!r} of {size} images is {n} samples, which leaves no holdout or no training set; {fix}")
    return n


def split_train(
    labels: np.ndarray | torch.Tensor, holdout: int | float | None, train_subset: int | None, seed: int, dataset: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Indices into the official train split: ``(train, holdout)``.

    The holdout (``stratified_subset`` with its own salt) is chosen first from the whole train split;
    ``train_subset`` is then drawn from what is left, so the two never overlap and the training set
    (hence the memory bank) never holds a holdout sample. ``train`` is None when every image trains
    (no holdout, no subset); ``holdout`` is None without a holdout. Without a holdout the training
    subset is exactly the one chosen before holdouts existed (same salt, same pool).
    """
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    total = int(y.shape[0])
    n_ho = check_holdout(holdout, total, dataset)
    held = stratified_subset(y, n_ho, seed, salt=HOLDOUT_SALT) if n_ho else None
    pool = np.setdiff1d(np.arange(total), held, assume_unique=True) if held is not None else None
    left = total - n_ho
    n_tr = check_subset(train_subset, total, "train_subset", dataset)  # type and the split's size first
    if n_tr is not None and n_tr > left:
        raise ConfigError(
            f"dataset.train_subset={n_tr} is larger than the {left} {dataset} training images left after "
            f"dataset.holdout={holdout!r} takes {n_ho} of {total}; use dataset.train_subset<={left} (or null), "
            "or a smaller holdout"
        )
    if n_tr is None or n_tr == left:
        return pool, held
    if pool is None:
        return stratified_subset(y, n_tr, seed, salt=TRAIN_SALT), held
    return pool[stratified_subset(y[pool], n_tr, seed, salt=TRAIN_SALT)], held


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
        num_holdout: size of the holdout carved from the official train split (0: none); see
            ``dataset.holdout`` and :func:`split_train`.
        train_indices, holdout_indices: positions in the official train split of the training
            samples (in ``idx`` order) and of the holdout samples (None: all / no holdout).
        source: where the data came from (folder path, or a description for synthetic data).
        class_names: one name per class.
        mean, std: per-channel normalisation constants applied to every batch.
        seed: default seed of the loaders (and of the subset choice).
        pipelines: the input pipelines this dataset offers, default first: ``device`` (the uint8
            dataset resident on the training device, batched augmentation there, no workers) and/or
            ``classic`` (torch DataLoader workers running per-sample torchvision PIL transforms).
    """

    pipelines: tuple[str, ...] = ("classic",)
    num_holdout: int = 0
    train_indices: np.ndarray | None = None
    holdout_indices: np.ndarray | None = None

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

    @property
    def holdout_labels(self) -> torch.Tensor | None:
        """int64 (num_holdout,) labels of the holdout, or None without a holdout."""
        return None

    def holdout_loader(
        self,
        batch_size: int,
        device: str | torch.device = "cpu",
        num_workers: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        pipeline: str | None = None,
    ) -> Loader | None:
        """Loader over the holdout like ``val_loader`` (fixed order, no augmentation, same sharding);
        None when the bundle has no holdout."""
        return None

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
            f"num_val={self.num_val}, num_holdout={self.num_holdout}, source={self.source!r})"
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
        holdout: int | float | None = None,
    ) -> None:
        for split, x, y in (("train", train_images, train_labels), ("val", val_images, val_labels)):
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[2] != x.shape[3]:
                raise ValueError(f"{name} {split} images must be uint8 (N, C, S, S), got {x.dtype} {tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{name} {split}: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
        self.seed = int(seed)
        n_va = check_subset(val_subset, val_images.shape[0], "val_subset", name)
        train_labels = train_labels.to(torch.int64)
        val_labels = val_labels.to(torch.int64)
        train_idx, holdout_idx = split_train(train_labels, holdout, train_subset, self.seed, name)
        # The holdout is the official train images it names, un-augmented at evaluation.
        held = (train_images[:0], train_labels[:0])
        if holdout_idx is not None:
            keep = torch.from_numpy(holdout_idx)
            held = (train_images[keep], train_labels[keep])
        if train_idx is not None:
            keep = torch.from_numpy(train_idx)
            train_images, train_labels = train_images[keep], train_labels[keep]
        if n_va is not None and n_va < val_images.shape[0]:
            keep = torch.from_numpy(stratified_subset(val_labels, n_va, self.seed, salt=VAL_SALT))
            val_images, val_labels = val_images[keep], val_labels[keep]
        self.name = name
        self.train_indices, self.holdout_indices = train_idx, holdout_idx
        self._train = (train_images.contiguous(), train_labels.contiguous())
        self._val = (val_images.contiguous(), val_labels.contiguous())
        self._holdout = (held[0].contiguous(), held[1].contiguous())
        self.num_holdout = int(held[1].shape[0])
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
        # device string -> (train_x, train_y, val_x, val_y, holdout_x, holdout_y); moved only once.
        self._on_device: dict[str, tuple[torch.Tensor, ...]] = {}

    @property
    def train_labels(self) -> torch.Tensor:
        return self._train[1]

    @property
    def val_labels(self) -> torch.Tensor:
        return self._val[1]

    @property
    def holdout_labels(self) -> torch.Tensor | None:
        return self._holdout[1] if self.num_holdout else None

    @property
    def holdout_images(self) -> torch.Tensor | None:
        """uint8 (num_holdout, C, H, W) CPU tensor (official train images), or None without a holdout."""
        return self._holdout[0] if self.num_holdout else None

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
            self._on_device[key] = tuple(t.to(dev) for t in (*self._train, *self._val, *self._holdout))
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
        x, y = self._tensors(device)[0:2]
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
        return self._eval_loader(self._val, 2, batch_size, device, num_workers, rank, world_size, pipeline)

    def holdout_loader(
        self,
        batch_size: int,
        device: str | torch.device = "cpu",
        num_workers: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        pipeline: str | None = None,
    ) -> InMemoryLoader | ClassicLoader | None:
        if not self.num_holdout:
            return None
        return self._eval_loader(self._holdout, 4, batch_size, device, num_workers, rank, world_size, pipeline)

    def _eval_loader(
        self, split: tuple[torch.Tensor, torch.Tensor], slot: int, batch_size: int, device: str | torch.device,
        num_workers: int | None, rank: int, world_size: int, pipeline: str | None,
    ) -> InMemoryLoader | ClassicLoader:
        """Fixed order, no augmentation: ``split`` (CPU) or its copy at ``slot`` of ``_tensors``."""
        options: dict[str, Any] = dict(
            mean=self.mean, std=self.std, shuffle=False, drop_last=False, augment=None, seed=self.seed,
            out_channels=self.out_channels, rank=rank, world_size=world_size,
        )
        if self.check_pipeline(pipeline) == "classic":
            x, y = split
            return ClassicLoader(x, y, batch_size, device=device, num_workers=num_workers, **options)
        x, y = self._tensors(device)[slot:slot + 2]
        return InMemoryLoader(x, y, batch_size, **options)


_COMMON = ("root", "download", "train_subset", "val_subset", "seed", "holdout")


def build_data(
    name: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    holdout: int | float | None = None,
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
        holdout: carve a seeded class-balanced holdout from the train split first (an int count or
            a float fraction in (0, 1); None/0: none); ``train_subset`` is drawn from the rest.
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
    takes_holdout = "holdout" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if holdout is not None and not takes_holdout:
        raise ConfigError(f"dataset {name!r} does not support dataset.holdout; set dataset.holdout=null")
    extra = {"holdout": holdout} if takes_holdout else {}
    return builder(
        root=root, download=bool(download), train_subset=train_subset, val_subset=val_subset,
        seed=int(seed), **extra, **dataset_kwargs,
    )
