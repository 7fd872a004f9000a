"""ickd.data: real on-disk formats (written by tests/data_files.py), loaders, subsets, augmentation."""
from __future__ import annotations

import gzip
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ickd.data.fashion_mnist as fm
from data_files import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_FILES,
    idx_bytes,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_imagenet_folder,
)
from ickd.data import DATASETS, DataBundle, build_data, random_crop_flip, stratified_subset
from ickd.errors import ConfigError, DatasetNotFoundError, UnknownNameError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ICKD_DATA_ROOT", raising=False)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cifar")
    return write_cifar100(root, num_train=500, num_test=200)


@pytest.fixture(scope="module")
def synth() -> DataBundle:
    return build_data("synthetic", num_classes=10, num_train=200, num_val=60, image_size=16)


# ---------------------------------------------------------------- registry / build_data


def test_registry_names_and_unknown_name() -> None:
    assert {"cifar100", "cifar10", "fashion_mnist", "imagenet", "synthetic"} <= set(DATASETS.names())
    with pytest.raises(UnknownNameError) as err:
        build_data("cifar1000")
    assert "cifar100" in str(err.value) and "fashion_mnist" in str(err.value)


def test_unknown_dataset_option_is_config_error() -> None:
    with pytest.raises(ConfigError, match="num_clases") as err:
        build_data("synthetic", num_clases=5)
    assert "num_classes" in str(err.value)  # lists the valid options


def test_bad_batch_size(synth: DataBundle) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        synth.train_loader(0)


# ---------------------------------------------------------------- CIFAR


def test_cifar100_loads_real_pickles(cifar_root) -> None:
    b = build_data("cifar100", root=str(cifar_root.root), download=False)
    assert (b.num_classes, b.in_channels, b.image_size) == (100, 3, 32)
    assert (b.num_train, b.num_val) == (500, 200)
    assert b.source == str(cifar_root.folder)
    assert b.class_names[:2] == ["fine_00", "fine_01"] and len(b.class_names) == 100
    assert torch.equal(b.train_labels, torch.from_numpy(cifar_root.train.labels))

    mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(3, 1, 1)
    seen = []
    for x, y, idx in b.val_loader(64):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and idx.dtype == torch.int64
        # Every sample equals its pickle row (CHW planes), normalised with the recipe constants.
        raw = torch.from_numpy(cifar_root.test.images[idx.numpy()]).view(-1, 3, 32, 32).float() / 255
        torch.testing.assert_close(x, (raw - mean) / std, atol=1e-5, rtol=0)
        assert torch.equal(y, torch.from_numpy(cifar_root.test.labels[idx.numpy()]))
        seen.append(x)
    allx = torch.cat(seen)
    # The files carry CIFAR-like channel statistics, so normalised data is about N(0, 1) per channel.
    assert torch.allclose(allx.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.1)
    assert torch.allclose(allx.std(dim=(0, 2, 3)), torch.ones(3), atol=0.1)


def test_cifar100_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        build_data("cifar100", root=str(tmp_path), download=False)
    msg = str(err.value)
    assert str(tmp_path / "cifar-100-python" / "train") in msg
    assert "dataset.download=true" in msg and "cifar-100-python.tar.gz" in msg


def test_cifar100_corrupt_pickle(tmp_path: Path) -> None:
    w = write_cifar100(tmp_path, num_train=20, num_test=10)
    data = (w.folder / "train").read_bytes()
    (w.folder / "train").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python") as err:
        build_data("cifar100", root=str(tmp_path))
    assert "delete" in str(err.value)


def test_cifar100_check_md5_rejects_non_official_files(tmp_path: Path) -> None:
    write_cifar100(tmp_path, num_train=20, num_test=10)
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        build_data("cifar100", root=str(tmp_path), check_md5=True)


def test_cifar10_loads_five_batches_in_order(tmp_path: Path) -> None:
    w = write_cifar10(tmp_path, per_batch=12, num_test=30)
    b = build_data("cifar10", root=str(tmp_path))
    assert (b.num_classes, b.num_train, b.num_val) == (10, 60, 30)
    assert torch.equal(b.train_labels, torch.from_numpy(w.train.labels))
    assert torch.equal(b.train_images.reshape(60, -1), torch.from_numpy(w.train.images))


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_from_root_gz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIRS", ())
    w = write_fashion_mnist(tmp_path, num_train=100, num_test=30)
    b = build_data("fashion_mnist", root=str(tmp_path))
    assert (b.num_classes, b.in_channels, b.image_size, b.num_train, b.num_val) == (10, 1, 28, 100, 30)
    assert b.source == str(tmp_path)
    assert torch.equal(b.train_images[:, 0], torch.from_numpy(w.train.images))
    assert torch.equal(b.val_labels, torch.from_numpy(w.test.labels))
    x, y, idx = next(iter(b.val_loader(30)))
    expected = (torch.from_numpy(w.test.images).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[:, 0], expected[idx], atol=1e-5, rtol=0)


def test_fashion_mnist_torchvision_layout_uncompressed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIRS", ())
    raw = tmp_path / "FashionMNIST" / "raw"
    w = write_fashion_mnist(raw, num_train=40, num_test=20, gz=False)
    b = build_data("fashion_mnist", root=str(tmp_path))
    assert b.source == str(raw) and b.num_train == 40
    assert torch.equal(b.train_labels, torch.from_numpy(w.train.labels))


def test_fashion_mnist_root_takes_precedence_over_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "system"
    write_fashion_mnist(system, num_train=20, num_test=10, seed=1)
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (str(system),))
    assert build_data("fashion_mnist").source == str(system)  # no root: falls back to the system folder
    write_fashion_mnist(tmp_path / "mine", num_train=30, num_test=10)
    assert build_data("fashion_mnist", root=str(tmp_path / "mine")).num_train == 30


@pytest.mark.skipif(
    not DEBIAN_FMNIST.is_dir(),
    reason=f"{DEBIAN_FMNIST} absent: install it with `apt-get install dataset-fashion-mnist` (CI does)",
)
def test_fashion_mnist_debian_package_real_files() -> None:
    b = build_data("fashion_mnist")  # no root: the Debian folder is the default place
    assert b.source == str(DEBIAN_FMNIST)
    assert (b.num_train, b.num_val, b.image_size, b.in_channels, b.num_classes) == (60000, 10000, 28, 1, 10)
    assert torch.equal(torch.bincount(b.train_labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(b.val_labels), torch.full((10,), 1000))
    # The published normalisation constants are the train set's own statistics.
    f = b.train_images.float() / 255
    assert abs(f.mean().item() - 0.2860) < 1e-3 and abs(f.std().item() - 0.3530) < 1e-3


def test_fashion_mnist_missing_everywhere_lists_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_system = tmp_path / "usr_share_empty"
    empty_system.mkdir()
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (str(empty_system),))
    root = tmp_path / "nothing_here"
    monkeypatch.setenv("ICKD_DATA_ROOT", str(root))  # root=null: $ICKD_DATA_ROOT, then the system folders
    with pytest.raises(DatasetNotFoundError) as err:
        build_data("fashion_mnist", root=None, download=False)
    msg = str(err.value)
    for place in (root, root / "FashionMNIST" / "raw", empty_system):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "dataset.root=" in msg and "dataset.download=true" in msg


def test_fashion_mnist_partial_folder_names_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIRS", ())
    write_fashion_mnist(tmp_path, num_train=10, num_test=10)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        build_data("fashion_mnist", root=str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated_gzip", "bad_magic", "short_data"])
def test_fashion_mnist_corrupt_file_is_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIRS", ())
    write_fashion_mnist(tmp_path, num_train=20, num_test=10)
    target = tmp_path / f"{FASHION_FILES['train'][0]}.gz"
    payload = gzip.decompress(target.read_bytes())
    if damage == "truncated_gzip":
        target.write_bytes(target.read_bytes()[:-40])
    elif damage == "bad_magic":
        target.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + payload[4:]))  # labels magic on images
    else:
        target.write_bytes(gzip.compress(payload[:-100]))
    with pytest.raises(DatasetNotFoundError) as err:
        build_data("fashion_mnist", root=str(tmp_path))
    msg = str(err.value)
    assert str(target) in msg
    assert {"truncated_gzip": "cannot read", "bad_magic": "magic number 2049, expected 2051",
            "short_data": "truncated"}[damage] in msg


def test_idx_bytes_roundtrip_matches_torchvision_reader(tmp_path: Path) -> None:
    # Cross-check our writer/reader against torchvision's own idx parser.
    from torchvision.datasets.mnist import read_image_file, read_label_file

    imgs = np.arange(2 * 5 * 7, dtype=np.uint8).reshape(2, 5, 7)
    (tmp_path / "i").write_bytes(idx_bytes(imgs))
    (tmp_path / "l").write_bytes(idx_bytes(np.array([3, 9], dtype=np.uint8)))
    assert idx_bytes(imgs)[:4] == (2051).to_bytes(4, "big")
    assert torch.equal(read_image_file(str(tmp_path / "i")), torch.from_numpy(imgs))
    assert read_label_file(str(tmp_path / "l")).tolist() == [3, 9]
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "i", 2051), imgs)


def test_fashion_mnist_rgb_and_resize_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIRS", ())
    write_fashion_mnist(tmp_path, num_train=20, num_test=10)
    b = build_data("fashion_mnist", root=str(tmp_path), channels=3, image_size=32)
    assert (b.in_channels, b.image_size) == (3, 32)
    x, _, _ = next(iter(b.train_loader(8)))
    assert x.shape == (8, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    with pytest.raises(ConfigError, match="channels"):
        build_data("fashion_mnist", root=str(tmp_path), channels=2)


# ---------------------------------------------------------------- ImageNet folders


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory: pytest.TempPathFactory):
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"), num_classes=3, train_per_class=4, val_per_class=2)


def test_imagenet_folder_loads(imagenet_tree) -> None:
    b = build_data("imagenet", root=str(imagenet_tree.root), image_size=32, num_workers=0)
    assert (b.num_classes, b.in_channels, b.image_size, b.num_train, b.num_val) == (3, 3, 32, 12, 6)
    assert b.class_names == imagenet_tree.extra["wnids"]
    x, y, idx = next(iter(b.val_loader(6)))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(idx, torch.arange(6)) and torch.equal(y, b.val_labels)
    # Each image shows its class colour: undo the normalisation and compare the mean colour.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rgb = ((x * std + mean) * 255).mean(dim=(2, 3))
    colours = torch.tensor(imagenet_tree.extra["colours"], dtype=torch.float32)
    assert (rgb - colours[y]).abs().max() < 12


def test_imagenet_train_loader_deterministic_and_leaves_global_rng(imagenet_tree) -> None:
    b = build_data("imagenet", root=str(imagenet_tree.root), image_size=24, seed=3)
    state = torch.get_rng_state()
    first = collect(b.train_loader(5, num_workers=0))
    assert torch.equal(state, torch.get_rng_state())  # augmentation never used the global RNG
    assert sorted(torch.cat([i for _, _, i in first]).tolist()) == list(range(12))
    again = b.train_loader(5, num_workers=0)
    assert_same_batches(first, collect(again))
    # Same batches whatever the number of worker processes.
    assert_same_batches(first, collect(b.train_loader(5, num_workers=2)))
    later = b.train_loader(5, num_workers=0)
    later.set_epoch(1)
    assert not torch.equal(torch.cat([i for _, _, i in collect(later)]), torch.cat([i for _, _, i in first]))


def test_imagenet_val_class_map_follows_train(tmp_path: Path) -> None:
    w = write_imagenet_folder(tmp_path, num_classes=3)
    shutil.rmtree(tmp_path / "val" / w.extra["wnids"][0])  # val lacks class 0: labels must not shift
    b = build_data("imagenet", root=str(tmp_path), image_size=16)
    assert b.num_classes == 3 and sorted(b.val_labels.tolist()) == [1, 1, 2, 2]


def test_imagenet_missing_and_flat_val(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"train/<wnid>/\*\.JPEG"):
        build_data("imagenet", root=str(tmp_path / "nope"))
    write_imagenet_folder(tmp_path / "flat", flat_val=True)
    with pytest.raises(DatasetNotFoundError, match="valprep"):
        build_data("imagenet", root=str(tmp_path / "flat"))


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_learnable() -> None:
    a = build_data("synthetic", num_train=300, num_val=100, image_size=16, seed=0)
    b = build_data("synthetic", num_train=300, num_val=100, image_size=16, seed=5)  # run seed: same data
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.val_labels, b.val_labels)
    c = build_data("synthetic", num_train=300, num_val=100, image_size=16, data_seed=1)
    assert not torch.equal(a.train_images, c.train_images)
    assert torch.equal(torch.bincount(a.train_labels), torch.full((10,), 30))
    # Class-dependent: a nearest-class-mean classifier already separates the classes.
    tr = a.train_images.float().flatten(1)
    means = torch.stack([tr[a.train_labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(a.val_images.float().flatten(1), means).argmin(1)
    assert (pred == a.val_labels).float().mean() > 0.9


# ---------------------------------------------------------------- in-memory loader


def test_epoch_visits_every_index_once(synth: DataBundle) -> None:
    loader = synth.train_loader(64)
    assert len(loader) == math.ceil(200 / 64) == 4
    batches = collect(loader)
    idx = torch.cat([i for _, _, i in batches])
    assert sorted(idx.tolist()) == list(range(200))
    assert [len(i) for _, _, i in batches] == [64, 64, 64, 8]
    for x, y, i in batches:
        assert x.shape[1:] == (3, 16, 16) and torch.equal(y, synth.train_labels[i])

    dl = synth.train_loader(64, drop_last=True)
    assert len(dl) == 3
    idx = torch.cat([i for _, _, i in collect(dl)])
    assert len(idx) == 192 and len(set(idx.tolist())) == 192


def test_same_seed_epoch_same_batches_and_resume(synth: DataBundle) -> None:
    a = synth.train_loader(32)
    epochs = []
    for e in range(3):
        a.set_epoch(e)
        epochs.append(collect(a))
    # A "resumed" run: a new bundle and loader built from scratch, jumping straight to epoch 2.
    fresh = build_data("synthetic", num_classes=10, num_train=200, num_val=60, image_size=16)
    b = fresh.train_loader(32)
    b.set_epoch(2)
    assert_same_batches(epochs[2], collect(b))
    # Different epochs: different order (and different augmentation).
    order = [torch.cat([i for _, _, i in ep]) for ep in epochs]
    assert not torch.equal(order[0], order[1]) and not torch.equal(order[1], order[2])
    # Augmentation also changes with the epoch (fixed order, so only the augmentation can differ).
    fixed = synth.train_loader(200, shuffle=False)
    fixed.set_epoch(0)
    x0 = next(iter(fixed))[0]
    fixed.set_epoch(1)
    x1 = next(iter(fixed))[0]
    fixed.set_epoch(0)
    assert not torch.equal(x0, x1) and torch.equal(x0, next(iter(fixed))[0])
    # Different seed: different order for the same epoch.
    other = synth.train_loader(32, seed=1)
    assert not torch.equal(torch.cat([i for _, _, i in collect(other)]), order[0])


def test_iteration_without_set_epoch_advances(synth: DataBundle) -> None:
    loader = synth.train_loader(50)
    first, second = collect(loader), collect(loader)
    assert not torch.equal(first[0][2], second[0][2])
    loader.set_epoch(0)
    assert_same_batches(first, collect(loader))


def test_loader_does_not_touch_global_rng(synth: DataBundle) -> None:
    state = torch.get_rng_state()
    collect(synth.train_loader(32))
    assert torch.equal(state, torch.get_rng_state())


def test_val_loader_fixed_order_no_augmentation(synth: DataBundle) -> None:
    v = synth.val_loader(25)
    a, b = collect(v), collect(v)
    assert_same_batches(a, b)
    assert torch.equal(torch.cat([i for _, _, i in a]), torch.arange(60))
    plain = synth.train_loader(25, shuffle=False, augment=False)
    # Unaugmented train batches are just the normalised images, in order.
    x, _, i = next(iter(plain))
    scale = torch.tensor(synth.std).view(1, 3, 1, 1)
    shift = torch.tensor(synth.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (synth.train_images[i].float() / 255 - shift) / scale, atol=1e-5, rtol=0)


def _crops(img: torch.Tensor, pad: int) -> list[tuple[int, int, bool, torch.Tensor]]:
    """All crop/flip variants of one (C, H, W) image, by plain slicing (the reference semantics)."""
    c, h, w = img.shape
    p = F.pad(img, (pad, pad, pad, pad))
    out = []
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            crop = p[:, oy : oy + h, ox : ox + w]
            out += [(oy, ox, False, crop), (oy, ox, True, crop.flip(-1))]
    return out


def test_augmentation_is_crop_and_flip_of_the_original(synth: DataBundle) -> None:
    aug = synth.train_loader(200, shuffle=False, augment=True)
    x_aug, _, idx = next(iter(aug))
    x_plain, _, idx2 = next(iter(synth.train_loader(200, shuffle=False, augment=False)))
    assert torch.equal(idx, idx2) and x_aug.shape == x_plain.shape
    assert not torch.equal(x_aug, x_plain)
    pad = 16 // 8  # synthetic default padding = image_size // 8
    scale = torch.tensor(synth.std).view(3, 1, 1)
    shift = torch.tensor(synth.mean).view(3, 1, 1)
    flips, offsets = [], set()
    for j in range(40):
        raw = synth.train_images[idx[j]]
        matches = [
            (oy, ox, fl) for oy, ox, fl, crop in _crops(raw, pad)
            if torch.allclose(x_aug[j], (crop.float() / 255 - shift) / scale, atol=1e-5)
        ]
        assert matches, f"sample {j} is not a crop/flip of its source image"
        flips.append(matches[0][2])
        offsets.add(matches[0][:2])
    assert 5 < sum(flips) < 35  # both flipped and unflipped samples occur
    assert len(offsets) > 5  # many different crop offsets occur


def test_random_crop_flip_matches_slicing_reference() -> None:
    x = torch.randint(0, 256, (64, 3, 10, 12), dtype=torch.uint8)
    g1 = torch.Generator().manual_seed(7)
    out = random_crop_flip(x, 3, True, g1)
    g2 = torch.Generator().manual_seed(7)  # replay the same draws
    oy = torch.randint(0, 7, (64,), generator=g2)
    ox = torch.randint(0, 7, (64,), generator=g2)
    fl = torch.rand(64, generator=g2) < 0.5
    xp = F.pad(x, (3, 3, 3, 3))
    for i in range(64):
        ref = xp[i, :, oy[i] : oy[i] + 10, ox[i] : ox[i] + 12]
        assert torch.equal(out[i], ref.flip(-1) if fl[i] else ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_random_crop_flip_cuda_equals_cpu() -> None:
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
    cpu = random_crop_flip(x, 4, True, torch.Generator().manual_seed(1))
    gpu = random_crop_flip(x.cuda(), 4, True, torch.Generator().manual_seed(1))
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_on_cuda_matches_cpu(synth: DataBundle) -> None:
    cpu = collect(synth.train_loader(64))
    gpu = synth.train_loader(64, device="cuda")
    for (xc, yc, ic), (xg, yg, ig) in zip(cpu, gpu):
        assert xg.is_cuda and yg.is_cuda and ig.is_cuda
        assert torch.equal(ic, ig.cpu()) and torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- subsets


def test_subset_is_stratified_deterministic_and_reindexed() -> None:
    kw = dict(num_classes=10, num_train=400, num_val=100, image_size=8)
    a = build_data("synthetic", train_subset=55, val_subset=20, seed=0, **kw)
    assert (a.num_train, a.num_val) == (55, 20)
    counts = torch.bincount(a.train_labels, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 55
    assert torch.equal(torch.bincount(a.val_labels, minlength=10), torch.full((10,), 2))
    idx = torch.cat([i for _, _, i in collect(a.train_loader(16))])
    assert sorted(idx.tolist()) == list(range(55))  # idx counts positions inside the subset
    b = build_data("synthetic", train_subset=55, val_subset=20, seed=0, **kw)
    assert torch.equal(a.train_images, b.train_images)
    c = build_data("synthetic", train_subset=55, val_subset=20, seed=1, **kw)
    assert not torch.equal(a.train_images, c.train_images)
    # The subset really is drawn from the full set, with labels kept attached.
    full = build_data("synthetic", **kw)
    flat = full.train_images.flatten(1)
    for k in range(0, 55, 11):
        match = (flat == a.train_images[k].flatten()).all(1).nonzero().flatten()
        assert len(match) >= 1 and full.train_labels[match[0]] == a.train_labels[k]


def test_subset_on_real_format_files(cifar_root) -> None:
    b = build_data("cifar100", root=str(cifar_root.root), train_subset=300, val_subset=100)
    counts = torch.bincount(b.train_labels, minlength=100)
    assert counts.sum() == 300 and counts.max() == 3 and counts.min() == 3


def test_stratified_subset_with_imbalanced_classes() -> None:
    labels = np.array([0] * 100 + [1] * 3 + [2] * 50)
    pick = stratified_subset(labels, 43, seed=0)
    assert len(set(pick.tolist())) == 43 and np.all(np.diff(pick) > 0)
    assert np.bincount(labels[pick]).tolist() == [20, 3, 20]  # the small class runs out, others fill in


def test_subset_too_large_or_invalid(tmp_path: Path, cifar_root) -> None:
    with pytest.raises(ConfigError, match="500 samples"):
        build_data("cifar100", root=str(cifar_root.root), train_subset=501)
    with pytest.raises(ConfigError, match="200 samples"):
        build_data("cifar100", root=str(cifar_root.root), val_subset=1000)
    with pytest.raises(ConfigError, match="positive"):
        build_data("synthetic", train_subset=0)


# ---------------------------------------------------------------- holdout (dataset.holdout)


def _normalised(bundle: DataBundle, images: torch.Tensor) -> torch.Tensor:
    c = images.shape[1]
    scale = torch.tensor(bundle.std[:c]).view(1, c, 1, 1)
    shift = torch.tensor(bundle.mean[:c]).view(1, c, 1, 1)
    return (images.float() / 255 - shift) / scale


@pytest.mark.skipif(
    not DEBIAN_FMNIST.is_dir(),
    reason=f"{DEBIAN_FMNIST} absent: install it with `apt-get install dataset-fashion-mnist` (CI does)",
)
def test_holdout_on_real_fashion_mnist_is_carved_from_train_before_the_subset() -> None:
    b = build_data("fashion_mnist", holdout=5000, train_subset=20000, seed=0)  # the demo's split
    assert (b.num_train, b.num_holdout, b.num_val) == (20000, 5000, 10000)
    ho, tr = b.holdout_indices, b.train_indices
    # Both are positions in the official 60k train file (the test file is another file): distinct,
    # inside the train split, and never overlapping, so no holdout image trains or enters the bank.
    assert len(np.unique(ho)) == 5000 and len(np.unique(tr)) == 20000
    assert ho.min() >= 0 and ho.max() < 60000 and tr.min() >= 0 and tr.max() < 60000
    assert np.intersect1d(ho, tr).size == 0
    train_x, train_y = fm.load_split(fm.find_fashion_mnist(None, False)[1], "train")
    assert torch.equal(b.holdout_images, train_x[torch.from_numpy(ho)]) and torch.equal(b.holdout_labels, train_y[torch.from_numpy(ho)])
    assert torch.equal(b.train_images, train_x[torch.from_numpy(tr)]) and torch.equal(b.train_labels, train_y[torch.from_numpy(tr)])
    # Class-balanced: Fashion-MNIST has 6000 per class, so exactly 500 and 2000 of each.
    assert torch.equal(torch.bincount(b.holdout_labels, minlength=10), torch.full((10,), 500))
    assert torch.equal(torch.bincount(b.train_labels, minlength=10), torch.full((10,), 2000))
    # Deterministic in subset_seed; another seed draws another holdout.
    again = build_data("fashion_mnist", holdout=5000, train_subset=20000, seed=0)
    assert np.array_equal(again.holdout_indices, ho) and np.array_equal(again.train_indices, tr)
    other = build_data("fashion_mnist", holdout=5000, train_subset=20000, seed=1)
    assert not np.array_equal(other.holdout_indices, ho) and np.intersect1d(other.holdout_indices, other.train_indices).size == 0
    # A fraction, and no subset: every image not held out trains.
    frac = build_data("fashion_mnist", holdout=0.1, seed=0)
    assert (frac.num_holdout, frac.num_train) == (6000, 54000)
    assert np.array_equal(np.sort(np.concatenate([frac.holdout_indices, frac.train_indices])), np.arange(60000))
    # The holdout loader: fixed order, every sample once, the un-augmented images (like val).
    loader = b.holdout_loader(1000)
    batches = collect(loader)
    assert torch.equal(torch.cat([i for _, _, i in batches]), torch.arange(5000))
    assert torch.equal(torch.cat([y for _, y, _ in batches]), b.holdout_labels)
    x = torch.cat([x for x, _, _ in batches])
    torch.testing.assert_close(x, _normalised(b, b.holdout_images), atol=1e-5, rtol=0)


def test_no_holdout_keeps_the_training_subset_it_always_had() -> None:
    kw = dict(num_classes=10, num_train=400, num_val=100, image_size=8)
    plain = build_data("synthetic", train_subset=55, seed=3, **kw)
    assert plain.num_holdout == 0 and plain.holdout_loader(16) is None and plain.holdout_labels is None
    full = build_data("synthetic", **kw)
    expected = stratified_subset(full.train_labels, 55, seed=3, salt=0)  # the pre-holdout choice
    assert np.array_equal(plain.train_indices, expected) and torch.equal(plain.train_images, full.train_images[expected])
    assert build_data("synthetic", holdout=0, **kw).num_holdout == 0  # 0 means none, like null


def test_holdout_on_synthetic_is_balanced_disjoint_and_the_same_in_both_pipelines() -> None:
    kw = dict(num_classes=10, num_train=400, num_val=100, image_size=8)
    b = build_data("synthetic", holdout=50, train_subset=120, seed=2, **kw)
    assert (b.num_holdout, b.num_train) == (50, 120)
    assert torch.equal(torch.bincount(b.holdout_labels, minlength=10), torch.full((10,), 5))
    assert np.intersect1d(b.holdout_indices, b.train_indices).size == 0
    # Train indices still count 0..num_train-1 (the memory bank is addressed by them).
    assert sorted(torch.cat([i for _, _, i in collect(b.train_loader(32))]).tolist()) == list(range(120))
    assert_same_batches(collect(b.holdout_loader(16)), collect(b.holdout_loader(16, pipeline="classic", num_workers=0)))
    shards = [collect(b.holdout_loader(8, rank=r, world_size=2)) for r in range(2)]
    seen = sorted(torch.cat([i for s in shards for _, _, i in s]).tolist())
    assert seen == list(range(50))  # sharded like val: every holdout sample on exactly one rank


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(holdout=-1), ["dataset.holdout=-1", "a count 1..99"]),
        (dict(holdout=100), ["dataset.holdout=100", "0 <= holdout < 100"]),
        (dict(holdout=1.0), ["strictly between 0 and 1"]),
        (dict(holdout=0.0), ["strictly between 0 and 1"]),
        (dict(holdout=2.5), ["strictly between 0 and 1"]),
        (dict(holdout=0.001), ["0 samples"]),
        (dict(holdout="ten"), ["not a number"]),
        (dict(holdout=True), ["not a number"]),
        (dict(holdout=90, train_subset=20), ["dataset.train_subset=20", "10 synthetic training images left", "dataset.holdout=90"]),
    ],
)
def test_bad_holdout_values_are_config_errors_naming_the_fix(kwargs, words) -> None:
    with pytest.raises(ConfigError) as err:
        build_data("synthetic", num_train=100, num_val=20, image_size=8, **kwargs)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_holdout_on_real_format_cifar_files(cifar_root) -> None:
    b = build_data("cifar100", root=str(cifar_root.root), holdout=100, train_subset=300, seed=0)
    assert (b.num_holdout, b.num_train) == (100, 300)
    assert torch.equal(torch.bincount(b.holdout_labels, minlength=100), torch.ones(100, dtype=torch.int64))
    assert np.intersect1d(b.holdout_indices, b.train_indices).size == 0
    # The holdout images are the pickles' train rows (CHW rows of 3072 bytes) at those positions.
    rows = torch.from_numpy(cifar_root.train.images[b.holdout_indices]).view(-1, 3, 32, 32)
    assert torch.equal(b.holdout_images, rows)
    with pytest.raises(ConfigError, match="dataset.train_subset=450"):
        build_data("cifar100", root=str(cifar_root.root), holdout=100, train_subset=450)


def test_holdout_on_an_image_folder_uses_train_images_with_the_eval_transform(imagenet_tree) -> None:
    b = build_data("imagenet", root=str(imagenet_tree.root), image_size=32, num_workers=0, holdout=3, seed=1)
    assert (b.num_train, b.num_holdout, b.num_val) == (9, 3, 6)
    assert sorted(b.holdout_labels.tolist()) == [0, 1, 2]  # one per class
    assert np.intersect1d(b.holdout_indices, b.train_indices).size == 0
    assert sorted(np.concatenate([b.holdout_indices, b.train_indices]).tolist()) == list(range(12))
    x, y, idx = next(iter(b.holdout_loader(3)))
    assert torch.equal(idx, torch.arange(3)) and torch.equal(y, b.holdout_labels)
    # Deterministic eval transform: two passes give identical tensors.
    x2, _, _ = next(iter(b.holdout_loader(3)))
    assert torch.equal(x, x2)
    folder = b.train_set.folder
    held_paths = {folder.samples[i][0] for i in b.holdout_indices}
    assert all("/train/" in p for p in held_paths) and not held_paths & {folder.samples[i][0] for i in b.train_indices}
    assert build_data("imagenet", root=str(imagenet_tree.root), image_size=32).holdout_loader(3) is None
