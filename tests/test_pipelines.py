"""The two input pipelines of in-memory datasets yield the same batches.

``device`` (InMemoryLoader: batched crop/flip on the training device) and ``classic`` (ClassicLoader:
DataLoader + per-sample torchvision PIL transforms) execute the same epoch plan, so on the same seed
they must give the same (x, y, idx) batches: same order, shards, crops and flips, up to float
rounding of the normalisation. Also pins the epoch-level parameter draw of InMemoryLoader to the
per-batch ``random_crop_flip`` behaviour it replaced.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

from data_files import write_fashion_mnist
from ickd.data import (
    AugmentSpec,
    ClassicLoader,
    DataBundle,
    InMemoryLoader,
    TensorBundle,
    build_data,
    crop_flip,
    draw_crop_flip,
    normalize,
    normalize_constants,
    random_crop_flip,
)
from ickd.data.imagenet import ImageFolderBundle
from ickd.data.loader import STREAM_AUGMENT, STREAM_ORDER, epoch_generator, shard_order
from ickd.errors import ConfigError

Batches = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def collect(loader) -> Batches:
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]


def assert_same_batches(device_batches: Batches, classic_batches: Batches, exact: bool = True) -> None:
    assert len(device_batches) == len(classic_batches) > 0
    for (xa, ya, ia), (xb, yb, ib) in zip(device_batches, classic_batches):
        assert torch.equal(ia, ib), "different samples (order / sharding)"
        assert torch.equal(ya, yb)
        assert xa.dtype == xb.dtype == torch.float32 and xa.shape == xb.shape
        if exact:
            assert torch.equal(xa, xb)
        else:
            # On CUDA, division by a constant may round differently from the CPU's PIL path.
            torch.testing.assert_close(xa, xb, atol=1e-6, rtol=1e-6)


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ICKD_DATA_ROOT", raising=False)


@pytest.fixture(scope="module")
def synth() -> DataBundle:
    # 70 train samples: batch 16 leaves a partial last batch; padding 3 gives 49 crop offsets.
    return build_data("synthetic", num_classes=5, num_train=70, num_val=23, image_size=12, padding=3, seed=4)


# ---------------------------------------------------------------- pipeline choice


def test_tensor_bundle_offers_both_pipelines(synth: DataBundle) -> None:
    assert synth.pipelines == ("device", "classic")
    for choice in (None, "auto", "device"):
        assert isinstance(synth.train_loader(8, pipeline=choice), InMemoryLoader)
        assert isinstance(synth.val_loader(8, pipeline=choice), InMemoryLoader)
    assert isinstance(synth.train_loader(8, pipeline="classic", num_workers=0), ClassicLoader)
    assert isinstance(synth.val_loader(8, pipeline="classic", num_workers=0), ClassicLoader)
    assert ImageFolderBundle.pipelines == ("classic",)  # ImageNet has only the classic path


def test_unknown_pipeline_is_config_error_naming_choices(synth: DataBundle) -> None:
    with pytest.raises(ConfigError, match=r"'gpu'.*device, classic"):
        synth.train_loader(8, pipeline="gpu")
    with pytest.raises(ConfigError, match=r"'fast'.*device, classic"):
        synth.val_loader(8, pipeline="fast")


def test_classic_rejects_bad_workers_and_non_pil_channels(synth: DataBundle) -> None:
    with pytest.raises(ConfigError, match="num_workers must be a non-negative integer"):
        synth.train_loader(8, pipeline="classic", num_workers=-1)
    five = build_data("synthetic", num_train=10, num_val=5, image_size=8, channels=5)
    five.train_loader(4)  # the device pipeline handles any channel count
    with pytest.raises(ConfigError, match="this data has 5.*pipeline=device"):
        five.train_loader(4, pipeline="classic", num_workers=0)


# ---------------------------------------------------------------- classic == device


def test_classic_equals_device_shuffled_augmented_two_epochs(synth: DataBundle) -> None:
    dev = synth.train_loader(16)
    cls = synth.train_loader(16, pipeline="classic", num_workers=0)
    assert len(dev) == len(cls) == 5 and dev.batch_size == cls.batch_size == 16
    assert dev.num_samples == cls.num_samples == 70
    epochs = []
    for epoch in (0, 1):
        dev.set_epoch(epoch)
        cls.set_epoch(epoch)
        assert dev.epoch == cls.epoch == epoch
        a, b = collect(dev), collect(cls)
        assert dev.epoch == cls.epoch == epoch + 1
        assert_same_batches(a, b)
        assert [x.shape[0] for x, _, _ in a] == [16, 16, 16, 16, 6]
        assert sorted(torch.cat([i for _, _, i in a]).tolist()) == list(range(70))
        epochs.append(a)
    # The comparison is meaningful: epochs differ in order, and the batches are augmented.
    assert not torch.equal(epochs[0][0][2], epochs[1][0][2])
    plain = synth.train_loader(16, augment=False)
    plain.set_epoch(1)
    x_plain = next(iter(plain))[0]
    assert not torch.allclose(epochs[1][0][0], x_plain, atol=1e-3)
    # Without set_epoch both auto-advance the same way (epoch 2 now).
    assert_same_batches(collect(dev), collect(cls))


def test_classic_equals_device_drop_last_and_no_flip() -> None:
    data = build_data("synthetic", num_classes=4, num_train=45, num_val=9, image_size=10, padding=2, seed=1)
    dev = data.train_loader(8, drop_last=True)
    cls = data.train_loader(8, drop_last=True, pipeline="classic", num_workers=0)
    assert len(dev) == len(cls) == 5
    a = collect(dev)
    assert [x.shape[0] for x, _, _ in a] == [8] * 5
    assert_same_batches(a, collect(cls))
    # Flip disabled: the flip coin is still drawn (same stream) but must not be applied.
    x = data.train_images
    y = data.train_labels
    kw = dict(mean=data.mean, std=data.std, augment=AugmentSpec(padding=2, flip=False), seed=3)
    dev_nf = InMemoryLoader(x, y, 8, **kw)
    cls_nf = ClassicLoader(x, y, 8, **kw)
    assert_same_batches(collect(dev_nf), collect(cls_nf))


def test_classic_equals_device_on_a_sharded_rank(synth: DataBundle) -> None:
    dev = synth.train_loader(6, rank=1, world_size=2)
    cls = synth.train_loader(6, rank=1, world_size=2, pipeline="classic", num_workers=0)
    assert len(dev) == len(cls) == 6 and dev.num_samples == cls.num_samples == 35
    for epoch in (0, 3):
        dev.set_epoch(epoch)
        cls.set_epoch(epoch)
        a = collect(dev)
        assert_same_batches(a, collect(cls))
    # Rank 1 of 2 holds the odd positions of the shared (seed, epoch) order.
    full = synth.train_loader(70)
    full.set_epoch(3)
    order = next(iter(full))[2]
    assert torch.cat([i for _, _, i in a]).tolist() == order[1::2].tolist()
    # The fixed-order val shard too.
    dev_val = synth.val_loader(5, rank=1, world_size=2)
    cls_val = synth.val_loader(5, rank=1, world_size=2, pipeline="classic", num_workers=0)
    v = collect(dev_val)
    assert torch.cat([i for _, _, i in v]).tolist() == list(range(1, 23, 2))
    assert_same_batches(v, collect(cls_val))


def test_classic_equals_device_val(synth: DataBundle) -> None:
    dev, cls = synth.val_loader(10), synth.val_loader(10, pipeline="classic", num_workers=0)
    a = collect(dev)
    assert torch.cat([i for _, _, i in a]).tolist() == list(range(23))
    assert_same_batches(a, collect(cls))
    # Unaugmented: plain normalisation of the stored images.
    mean = torch.tensor(synth.mean).view(1, -1, 1, 1)
    std = torch.tensor(synth.std).view(1, -1, 1, 1)
    torch.testing.assert_close(a[0][0], (synth.val_images[:10].float() / 255 - mean) / std, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_grey_data_replicated_like_fashion_mnist(tmp_path: Path, channels: int) -> None:
    write_fashion_mnist(tmp_path, num_train=40, num_test=12, seed=2)
    data = build_data("fashion_mnist", root=str(tmp_path), channels=channels, seed=5)
    assert isinstance(data, TensorBundle) and data.train_images.shape[1] == 1
    dev = data.train_loader(16)
    cls = data.train_loader(16, pipeline="classic", num_workers=0)
    a = collect(dev)
    assert a[0][0].shape == (16, channels, 28, 28)
    if channels == 3:
        assert torch.equal(a[0][0][:, 0], a[0][0][:, 2])
    assert_same_batches(a, collect(cls))
    assert_same_batches(collect(data.val_loader(5)), collect(data.val_loader(5, pipeline="classic", num_workers=0)))


def test_classic_workers_equal_main_process_and_leave_global_rng(synth: DataBundle) -> None:
    rng = torch.get_rng_state()
    main = synth.train_loader(16, pipeline="classic", num_workers=0)
    workers = synth.train_loader(16, pipeline="classic", num_workers=2)
    assert workers.num_workers == 2 and workers.dataloader.persistent_workers
    # Persistent workers across epochs, including going back to an earlier epoch.
    for epoch in (0, 1, 0):
        main.set_epoch(epoch)
        workers.set_epoch(epoch)
        assert_same_batches(collect(main), collect(workers), exact=True)
    assert torch.equal(rng, torch.get_rng_state())
    del workers  # shuts the worker processes down


# ---------------------------------------------------------------- epoch-level draws


def per_batch_reference(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, mean, std, shuffle: bool, drop_last: bool,
    augment: AugmentSpec | None, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
    out_channels: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The InMemoryLoader algorithm before the epoch-level draw: one random_crop_flip call per batch."""
    n = images.shape[0]
    order = torch.randperm(n, generator=epoch_generator(seed, epoch, STREAM_ORDER)) if shuffle else torch.arange(n)
    order = shard_order(order, rank, world_size, even=shuffle)
    shard = () if world_size == 1 else (rank, world_size)
    gen = epoch_generator(seed, epoch, STREAM_AUGMENT, *shard) if augment else None
    scale, shift = normalize_constants(mean, std)
    m = order.shape[0]
    stop = (m // batch_size) * batch_size if drop_last else m
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        xb = images[idx]
        if gen is not None:
            xb = random_crop_flip(xb, augment.padding, augment.flip, gen)
        x = normalize(xb, scale, shift)
        if out_channels and out_channels != x.shape[1]:
            x = x.expand(-1, out_channels, -1, -1)
        yield x, labels[idx], idx


@pytest.mark.parametrize(
    "augment, shuffle, drop_last, rank, world_size",
    [
        (AugmentSpec(padding=3, flip=True), True, False, 0, 1),
        (AugmentSpec(padding=3, flip=True), True, True, 1, 3),
        (AugmentSpec(padding=2, flip=False), True, False, 0, 1),
        (AugmentSpec(padding=0, flip=True), False, False, 0, 1),
        (None, True, False, 2, 3),
    ],
)
def test_in_memory_loader_matches_per_batch_draws(augment, shuffle, drop_last, rank, world_size) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (53, 1, 9, 9), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 7, (53,), generator=g)
    kw = dict(mean=(0.4,), std=(0.2,), shuffle=shuffle, drop_last=drop_last, augment=augment, seed=11,
              rank=rank, world_size=world_size)
    loader = InMemoryLoader(images, labels, 5, out_channels=3, **kw)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        ref = list(per_batch_reference(images, labels, 5, epoch=epoch, out_channels=3, **kw))
        assert_same_batches(collect(loader), ref, exact=True)


def test_draw_then_apply_is_random_crop_flip() -> None:
    x = torch.randint(0, 256, (20, 3, 7, 8), dtype=torch.uint8)
    for flip in (True, False):
        params = draw_crop_flip(20, 2, torch.Generator().manual_seed(5))
        assert [p.dtype for p in params] == [torch.int64, torch.int64, torch.bool]
        assert all(p.device.type == "cpu" and p.shape == (20,) for p in params)
        assert 0 <= int(params[0].min()) and int(params[0].max()) <= 4
        out = crop_flip(x, 2, flip, *params)
        assert torch.equal(out, random_crop_flip(x, 2, flip, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="off_x must have shape"):
        crop_flip(x, 2, True, params[0], params[1][:3], params[2])


# ---------------------------------------------------------------- CUDA (not run on CPU-only machines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_pipeline_makes_no_per_batch_host_transfer_on_cuda(synth: DataBundle) -> None:
    loader = synth.train_loader(16, device="cuda")
    it = iter(loader)  # the epoch's one host-to-device copy of order and crop parameters happens here
    torch.cuda.synchronize()
    # A blocking host<->device copy synchronises the stream; in "error" mode that raises.
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [(x.clone(), y.clone(), i.clone()) for x, y, i in it]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == len(loader) == 5 and batches[0][0].is_cuda
    cpu = synth.train_loader(16)  # epoch 0, like the CUDA loader's first iteration
    assert_same_batches(collect(cpu), [(x.cpu(), y.cpu(), i.cpu()) for x, y, i in batches], exact=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_classic_equals_device_on_cuda(synth: DataBundle) -> None:
    dev = synth.train_loader(16, device="cuda")
    cls = synth.train_loader(16, device="cuda", pipeline="classic", num_workers=0)
    a, b = collect(dev), collect(cls)
    assert all(x.is_cuda and y.is_cuda and i.is_cuda for x, y, i in a + b)
    assert_same_batches(a, b, exact=False)
