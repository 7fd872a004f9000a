"""Write tiny datasets in the real on-disk formats (for tests; the trainer tests reuse these).

- CIFAR-100 / CIFAR-10 python pickles, laid out exactly as torchvision reads them;
- Fashion-MNIST idx files (gzip or raw) with the real magic numbers and big-endian dimensions;
- an ImageNet-style ``train/<wnid>/*.JPEG`` + ``val/<wnid>/*.JPEG`` tree of real JPEGs.

Every writer returns what it wrote (arrays in the file layout), so tests can compare loaded data
against the source bytes.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


@dataclass
class Split:
    """Images in file layout (CIFAR: (N, 3072) CHW rows; MNIST: (N, 28, 28)) and int labels."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class Written:
    root: Path
    folder: Path
    train: Split
    test: Split
    extra: dict = field(default_factory=dict)


def _cifar_like_pixels(rng: np.random.Generator, n: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(N, 3072) uint8 rows (R plane, G plane, B plane) with roughly the given per-channel stats,
    so normalised batches should come out near mean 0 / std 1 per channel."""
    planes = [
        np.clip(rng.normal(m * 255.0, s * 255.0, size=(n, 1024)), 0, 255) for m, s in zip(mean, std)
    ]
    return np.round(np.concatenate(planes, axis=1)).astype(np.uint8)


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def write_cifar100(
    root: str | Path, num_train: int = 500, num_test: int = 100, seed: int = 0, num_used_classes: int = 100
) -> Written:
    """Write ``root/cifar-100-python/{train,test,meta}``; labels cycle over ``num_used_classes``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    # Clipping at 0/255 shrinks the std a little; scaled std keeps the normalised std close to 1.
    std = tuple(s * 1.05 for s in CIFAR100_STD)
    splits = {}
    for split, n, batch_label in (
        ("train", num_train, "training batch 1 of 1"),
        ("test", num_test, "testing batch 1 of 1"),
    ):
        data = _cifar_like_pixels(rng, n, CIFAR100_MEAN, std)
        fine = _balanced_labels(rng, n, num_used_classes)
        entry = {
            "filenames": [f"img_{split}_{i:05d}.png" for i in range(n)],
            "batch_label": batch_label,
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "data": data,
        }
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        splits[split] = Split(data, fine)
    meta = {
        "fine_label_names": [f"fine_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return Written(Path(root), folder, splits["train"], splits["test"], {"meta": meta})


def write_cifar10(root: str | Path, per_batch: int = 20, num_test: int = 40, seed: int = 0) -> Written:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    parts: list[Split] = []
    for i, n in [(i, per_batch) for i in range(1, 6)] + [(0, num_test)]:
        data = _cifar_like_pixels(rng, n, mean, std)
        labels = _balanced_labels(rng, n, 10)
        name = f"data_batch_{i}" if i else "test_batch"
        entry = {
            "batch_label": f"training batch {i} of 5" if i else "testing batch 1 of 1",
            "labels": labels.tolist(),
            "data": data,
            "filenames": [f"{name}_{j}.png" for j in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        parts.append(Split(data, labels))
    meta = {"num_cases_per_batch": per_batch, "label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    train = Split(np.concatenate([p.images for p in parts[:5]]), np.concatenate([p.labels for p in parts[:5]]))
    return Written(Path(root), folder, train, parts[5])


IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array in idx format: magic 0x0000 08 <ndim>, big-endian int32 dims, data."""
    assert array.dtype == np.uint8
    magic = 0x0800 | array.ndim  # 2051 for 3-d images, 2049 for 1-d labels
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion_mnist(
    folder: str | Path, num_train: int = 200, num_test: int = 50, seed: int = 0, gz: bool = True, size: int = 28
) -> Written:
    """Write the four Fashion-MNIST idx files directly into ``folder`` (``.gz`` unless ``gz=False``)."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", num_train), ("test", num_test)):
        labels = _balanced_labels(rng, n, 10).astype(np.uint8)
        # Class-dependent brightness so the data is not pure noise; mean close to the real 0.286.
        base = 40 + 9 * labels[:, None, None].astype(np.float64)
        images = np.clip(rng.normal(base, 60.0, size=(n, size, size)), 0, 255).round().astype(np.uint8)
        for stem, arr in zip(FASHION_FILES[split], (images, labels)):
            payload = idx_bytes(arr)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(payload, mtime=0))
            else:
                (folder / stem).write_bytes(payload)
        splits[split] = Split(images, labels.astype(np.int64))
    return Written(folder, folder, splits["train"], splits["test"])


def write_imagenet_folder(
    root: str | Path,
    num_classes: int = 3,
    train_per_class: int = 4,
    val_per_class: int = 2,
    size: tuple[int, int] = (48, 40),
    seed: int = 0,
    flat_val: bool = False,
) -> Written:
    """Write ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (real JPEGs via PIL).

    Each class has its own dominant colour. ``flat_val=True`` puts val images directly in
    ``root/val`` the way the official archive extracts. Splits hold (N, H, W, 3) arrays.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    wnids = [f"n{1440764 + 1000 * c:08d}" for c in range(num_classes)]
    colours = rng.integers(30, 226, size=(num_classes, 3))
    w, h = size
    splits = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        images, labels = [], []
        for c, wnid in enumerate(wnids):
            folder = root / split if (split == "val" and flat_val) else root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = np.clip(colours[c] + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
                name = f"ILSVRC2012_val_{c * per_class + i + 1:08d}.JPEG" if split == "val" else f"{wnid}_{i}.JPEG"
                Image.fromarray(arr).save(folder / name, format="JPEG", quality=90)
                images.append(arr)
                labels.append(c)
        splits[split] = Split(np.stack(images), np.asarray(labels, dtype=np.int64))
    return Written(root, root, splits["train"], splits["val"], {"wnids": wnids, "colours": colours})
