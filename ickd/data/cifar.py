"""CIFAR-100 / CIFAR-10 from the official python pickles, read through torchvision's own classes.

torchvision's ``CIFAR100`` verifies each pickle's md5 against the official release before loading;
that would reject any re-packaged copy (and the tiny files the tests write in the same format), so by
default a subclass checks only that the files exist and our own checks validate shapes and labels.
``check_md5=True`` restores torchvision's full verification.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from ickd.data.base import DATASETS, TensorBundle, check_given_root, resolve_root
from ickd.data.loader import AugmentSpec
from ickd.errors import DatasetNotFoundError

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_MEAN", "CIFAR10_STD", "build_cifar100", "build_cifar10"]

# The constants of the standard KD recipes (RepDistiller / mdistiller).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _without_md5(cls: type[CIFAR10]) -> type[CIFAR10]:
    """A subclass of a torchvision CIFAR class whose integrity check is 'the file exists'."""
    attrs = {
        "train_list": [[f, None] for f, _ in cls.train_list],
        "test_list": [[f, None] for f, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    }
    return type(f"{cls.__name__}Files", (cls,), attrs)


_CIFAR100Files = _without_md5(CIFAR100)
_CIFAR10Files = _without_md5(CIFAR10)


def _expected_files(cls: type[CIFAR10]) -> list[str]:
    return [f for f, _ in cls.train_list] + [f for f, _ in cls.test_list] + [cls.meta["filename"]]


def _load_cifar(
    name: str, tv_cls: type[CIFAR10], root: Path, download: bool, check_md5: bool
) -> tuple[Any, Any]:
    folder = root / tv_cls.base_folder
    expected = _expected_files(tv_cls)
    cls = tv_cls if check_md5 else (_CIFAR100Files if tv_cls is CIFAR100 else _CIFAR10Files)
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing and not download:
        raise DatasetNotFoundError(
            f"{name}: missing {', '.join(str(folder / f) for f in missing)}. The python-pickle release "
            f"must be extracted so that {folder}/{{{','.join(expected)}}} exist. Fix: set dataset.download=true "
            f"(needs internet), or download {tv_cls.url} yourself and extract it into {root}, "
            f"or point dataset.root=... at the folder that contains {tv_cls.base_folder}/."
        )
    try:
        train = cls(str(root), train=True, download=download)
        val = cls(str(root), train=False, download=False)
    except DatasetNotFoundError:
        raise
    except (OSError, RuntimeError) as err:  # URLError is an OSError; md5 mismatch is a RuntimeError
        action = "download" if missing else "load"
        raise DatasetNotFoundError(
            f"{name}: could not {action} the dataset in {folder}: {err}. Fix: check the internet "
            f"connection, or download {tv_cls.url} yourself and extract it into {root}; if the files "
            f"are corrupt, delete {folder} and download again."
        ) from err
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as err:
        raise DatasetNotFoundError(
            f"{name}: the files in {folder} are not valid CIFAR python pickles ({type(err).__name__}: {err}). "
            f"Fix: delete {folder} and extract {tv_cls.url} again (or set dataset.download=true)."
        ) from err
    return train, val


def _to_tensors(ds: Any, name: str, split: str, num_classes: int, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.asarray(ds.data)
    targets = np.asarray(ds.targets, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (32, 32, 3) or len(targets) != len(data):
        raise DatasetNotFoundError(
            f"{name}: {split} split in {folder} has images {data.dtype}{data.shape} and {len(targets)} labels; "
            f"expected uint8 (N, 32, 32, 3) with N labels. Fix: delete {folder} and extract the official archive again."
        )
    if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
        raise DatasetNotFoundError(
            f"{name}: {split} labels in {folder} span [{targets.min()}, {targets.max()}], expected [0, {num_classes}). "
            f"Fix: delete {folder} and extract the official archive again."
        )
    # HWC -> CHW, contiguous so batches are cheap index_selects.
    images = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
    return images, torch.from_numpy(targets)


def _build(
    name: str, tv_cls: type[CIFAR10], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...],
    *, root: str | os.PathLike[str] | None, download: bool, train_subset: int | None, val_subset: int | None,
    seed: int, check_md5: bool, padding: int, holdout: int | float | None,
) -> TensorBundle:
    check_given_root(root, name, download, holds=f"{tv_cls.base_folder}/")
    base = resolve_root(root)
    folder = base / tv_cls.base_folder
    train, val = _load_cifar(name, tv_cls, base, download, check_md5)
    xtr, ytr = _to_tensors(train, name, "train", num_classes, folder)
    xva, yva = _to_tensors(val, name, "test", num_classes, folder)
    classes = list(getattr(train, "classes", []))
    if len(classes) != num_classes:
        classes = [str(i) for i in range(num_classes)]
    return TensorBundle(
        name=name, train_images=xtr, train_labels=ytr, val_images=xva, val_labels=yva,
        num_classes=num_classes, class_names=classes, mean=mean, std=std, source=str(folder),
        augment=AugmentSpec(padding=padding, flip=True), seed=seed,
        train_subset=train_subset, val_subset=val_subset, holdout=holdout,
    )


@DATASETS.register("cifar100")
def build_cifar100(
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    holdout: int | float | None = None,
    check_md5: bool = False,
    padding: int = 4,
) -> TensorBundle:
    """CIFAR-100 (fine labels) from ``<root>/cifar-100-python/{train,test,meta}``; val = the test set,
    as in the published KD tables (``holdout`` carves a tuning split from the 50k train set instead).
    Train augmentation: RandomCrop(32, padding=4) + horizontal flip."""
    return _build(
        "cifar100", CIFAR100, 100, CIFAR100_MEAN, CIFAR100_STD, root=root, download=download,
        train_subset=train_subset, val_subset=val_subset, seed=seed, check_md5=check_md5, padding=padding, holdout=holdout,
    )


@DATASETS.register("cifar10")
def build_cifar10(
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    holdout: int | float | None = None,
    check_md5: bool = False,
    padding: int = 4,
) -> TensorBundle:
    """CIFAR-10 from ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``."""
    return _build(
        "cifar10", CIFAR10, 10, CIFAR10_MEAN, CIFAR10_STD, root=root, download=download,
        train_subset=train_subset, val_subset=val_subset, seed=seed, check_md5=check_md5, padding=padding, holdout=holdout,
    )
