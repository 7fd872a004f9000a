"""Fashion-MNIST from the four original idx files (gzip or not).

Lookup order, first complete set wins:
  1. ``root`` (files directly in it, or torchvision's layout ``root/FashionMNIST/raw/``); a given
     ``root`` is the only place looked at (a missing one is an error, never a silent fallback);
     with ``root=null``: ``$ICKD_DATA_ROOT``, then
  2. the system folders in ``SYSTEM_DIRS`` (Debian package ``dataset-fashion-mnist``),
  3. torchvision ``FashionMNIST(root, download=True)`` when ``download`` is true.
A folder that holds the files but a corrupt one is an error (never a silent fall-through to the
next place, which would hide a broken configured copy).
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ickd.data.base import DATASETS, TensorBundle, check_given_root, resolve_root
from ickd.data.loader import AugmentSpec
from ickd.errors import ConfigError, DatasetNotFoundError

__all__ = [
    "SYSTEM_DIRS", "FILES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "CLASSES",
    "read_idx", "find_fashion_mnist", "build_fashion_mnist",
]

#: Where system packages put the files; tests override this to point at an empty folder.
SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)

#: split -> (images file, labels file), names without the .gz suffix.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim

_FIX = (
    "Fixes: `apt-get install dataset-fashion-mnist` (puts the files in /usr/share/datasets/fashion-mnist), "
    "or set dataset.root=<folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz>, or dataset.download=true (needs internet)."
)


def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
    """Parse an idx file (``.gz`` or raw) into a uint8 array, checking the magic number and size."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DatasetNotFoundError(
            f"cannot read {path}: {type(err).__name__}: {err}. Fix: replace the file. {_FIX}"
        ) from err
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetNotFoundError(
            f"{path} is truncated ({len(raw)} bytes, header needs {header}). Fix: replace the file. {_FIX}"
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetNotFoundError(
            f"{path} has idx magic number {found}, expected {magic} "
            f"({'images' if magic == IDX_IMAGES_MAGIC else 'labels'} file). Fix: replace the file. {_FIX}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetNotFoundError(
            f"{path} is truncated or corrupt: header says {dims} = {expected} bytes of data, "
            f"found {len(raw) - header}. Fix: replace the file. {_FIX}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _resolve_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _candidate_dirs(root: str | os.PathLike[str] | None) -> list[Path]:
    if root not in (None, ""):  # a given dataset.root is the only place looked at: no silent fallback
        base = Path(os.fspath(root)).expanduser()
        return [base, base / "FashionMNIST" / "raw"]
    dirs: list[Path] = []
    configured = os.environ.get("ICKD_DATA_ROOT")
    if configured:
        base = Path(os.fspath(configured)).expanduser()
        dirs += [base, base / "FashionMNIST" / "raw"]
    dirs += [Path(d) for d in SYSTEM_DIRS]
    return dirs


def find_fashion_mnist(
    root: str | os.PathLike[str] | None, download: bool = False
) -> tuple[Path, dict[str, Path]]:
    """Return (folder, {file stem: path}) of the first folder holding all four files.

    Raises DatasetNotFoundError listing every folder looked at (and what was missing) plus the fixes.
    """
    check_given_root(root, "fashion_mnist", download, holds="the four idx files")
    stems = [s for pair in FILES.values() for s in pair]
    looked: list[str] = []
    for folder in _candidate_dirs(root):
        found = {s: _resolve_file(folder, s) for s in stems}
        missing = [s for s, p in found.items() if p is None]
        if not missing:
            return folder, {s: p for s, p in found.items() if p is not None}
        looked.append(f"{folder} ({'does not exist' if not folder.is_dir() else 'missing ' + ', '.join(missing)})")
    if download:
        target = resolve_root(root)
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(target), train=True, download=True)
        except Exception as err:  # noqa: BLE001 - any failure (URLError, md5) becomes the one clear error
            looked.append(f"download into {target / 'FashionMNIST' / 'raw'} failed: {type(err).__name__}: {err}")
        else:
            folder = target / "FashionMNIST" / "raw"
            found = {s: _resolve_file(folder, s) for s in stems}
            if all(p is not None for p in found.values()):
                return folder, {s: p for s, p in found.items() if p is not None}
            looked.append(f"{folder} (download finished but files are missing)")
    else:
        looked.append("download (not tried: dataset.download=false)")
    only = (
        f"dataset.root={root} is set, so only it was searched; set dataset.root=null to use $ICKD_DATA_ROOT "
        f"and {', '.join(SYSTEM_DIRS)}.\n" if root not in (None, "") else ""
    )
    raise DatasetNotFoundError(
        "fashion_mnist: could not find the four idx files. Looked at:\n  - " + "\n  - ".join(looked) + "\n" + only + _FIX
    )


def load_split(files: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_stem, lbl_stem = FILES[split]
    images = read_idx(files[img_stem], IDX_IMAGES_MAGIC)
    labels = read_idx(files[lbl_stem], IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DatasetNotFoundError(
            f"{files[img_stem]} holds {images.shape[0]} images but {files[lbl_stem]} holds {labels.shape[0]} labels. "
            f"Fix: replace both files from the same release. {_FIX}"
        )
    if labels.size and labels.max() >= len(CLASSES):
        raise DatasetNotFoundError(
            f"{files[lbl_stem]} has label {labels.max()} >= {len(CLASSES)}. Fix: replace the file. {_FIX}"
        )
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W); copy: frombuffer is read-only
    return x, torch.from_numpy(labels.astype(np.int64))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images once at load time (e.g. 28 -> 32 for CIFAR-shaped networks)."""
    if x.shape[-1] == size:
        return x
    y = F.interpolate(x.to(torch.float32), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp_(0, 255).to(torch.uint8)


@DATASETS.register("fashion_mnist")
def build_fashion_mnist(
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    holdout: int | float | None = None,
    image_size: int = 28,
    channels: int = 1,
    padding: int = 2,
) -> TensorBundle:
    """Fashion-MNIST, 10 classes, val = the 10k test set; ``holdout`` is carved from the 60k train set.

    Options: ``image_size`` resizes once at load (28 keeps originals); ``channels=3`` replicates the
    grey channel per batch for RGB networks. Train augmentation: RandomCrop(size, padding=2) + flip.
    """
    if channels not in (1, 3):
        raise ConfigError(f"dataset.channels must be 1 or 3 for fashion_mnist, got {channels!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"dataset.image_size must be an integer >= 8, got {image_size!r}")
    folder, files = find_fashion_mnist(root, download)
    xtr, ytr = load_split(files, "train")
    xva, yva = load_split(files, "test")
    return TensorBundle(
        name="fashion_mnist", train_images=_resize(xtr, image_size), train_labels=ytr,
        val_images=_resize(xva, image_size), val_labels=yva, num_classes=len(CLASSES), class_names=CLASSES,
        mean=FASHION_MNIST_MEAN * channels, std=FASHION_MNIST_STD * channels, source=str(folder),
        augment=AugmentSpec(padding=padding, flip=True), seed=seed,
        train_subset=train_subset, val_subset=val_subset, out_channels=channels, holdout=holdout,
    )
