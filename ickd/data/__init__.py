"""Datasets returning (image, label, index) batches; a GPU-resident fast path for small datasets.

    from ickd.data import build_data
    bundle = build_data("cifar100", root="/data", train_subset=None, seed=0)
    loader = bundle.train_loader(64, device="cuda")  # pipeline="classic": DataLoader + PIL transforms
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y, idx in loader: ...

Registered datasets: cifar100, cifar10, fashion_mnist, imagenet, synthetic (see ``DATASETS``).
"""
from ickd.data.augment import crop_flip, draw_crop_flip, normalize, normalize_constants, random_crop_flip
from ickd.data.base import (
    DATASETS,
    DEFAULT_DATA_ROOT,
    DataBundle,
    Loader,
    TensorBundle,
    build_data,
    check_holdout,
    resolve_root,
    split_train,
    stratified_subset,
)
from ickd.data.classic import ClassicLoader
from ickd.data.loader import AugmentSpec, EpochPlan, InMemoryLoader, derive_seed, epoch_generator, plan_epoch

# Importing the dataset modules registers them in DATASETS.
from ickd.data import cifar, fashion_mnist, imagenet, synthetic  # noqa: E402,F401  isort: skip
from ickd.data.imagenet import FolderLoader, ImageFolderBundle  # noqa: E402

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_ROOT",
    "AugmentSpec",
    "ClassicLoader",
    "DataBundle",
    "EpochPlan",
    "FolderLoader",
    "ImageFolderBundle",
    "InMemoryLoader",
    "Loader",
    "TensorBundle",
    "build_data",
    "check_holdout",
    "crop_flip",
    "derive_seed",
    "draw_crop_flip",
    "epoch_generator",
    "normalize",
    "normalize_constants",
    "plan_epoch",
    "random_crop_flip",
    "resolve_root",
    "split_train",
    "stratified_subset",
]
