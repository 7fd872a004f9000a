"""Tests of the model zoo (ickd.models): shapes, parameter counts, reference state_dict names,
checkpoint loading and its error messages."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from ickd.errors import CheckpointError, ConfigError, UnknownNameError
from ickd.models import MODELS, create_model, list_models, load_pretrained

IMAGENET_MODELS = [n for n in list_models() if n.startswith("tv_") or n == "mobilenet_v1"]
CIFAR_MODELS = [n for n in list_models() if n not in IMAGENET_MODELS]

REQUIRED = {
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "ResNet18", "ResNet34", "ResNet50",
    "MobileNetV2", "ShuffleV1", "ShuffleV2",
    "tv_resnet18", "tv_resnet34", "tv_resnet50", "tv_resnet101", "tv_wide_resnet50_2", "tv_mobilenet_v2",
    "mobilenet_v1",
}  # fmt: skip

# Published parameter counts (millions, 100 classes) and pooled-feature sizes.
PUBLISHED = {
    "resnet8": (0.084, 64), "resnet20": (0.278, 64), "resnet32": (0.473, 64),
    "resnet56": (0.862, 64), "resnet110": (1.737, 64), "resnet8x4": (1.234, 256),
    "resnet32x4": (7.434, 256), "wrn_16_2": (0.703, 128), "wrn_40_1": (0.570, 64),
    "wrn_40_2": (2.255, 128), "vgg8": (3.965, 512), "vgg13": (9.462, 512),
    "ResNet50": (23.705, 2048), "MobileNetV2": (0.813, 1280), "ShuffleV1": (0.949, 960),
    "ShuffleV2": (1.356, 1024),
}  # fmt: skip

# sha256 (first 16 hex) of the sorted "name:[shape]" lines of each model's state_dict (100 classes).
# Recorded after checking, model by model, that names, shapes, order and eval-mode outputs equal
# those of a transcription of the RepDistiller / mdistiller reference definitions. Any rename or
# reshape (which would break loading the published cifar_teachers checkpoints) changes the hash.
REFERENCE_LAYOUT = {
    "MobileNetV2": "706cec19a66f21b8", "ResNet18": "bad0f3c079fb7576", "ResNet34": "1fac94b56aadea3f",
    "ResNet50": "74254a6e49746cd1", "ShuffleV1": "d337d06f2b550000", "ShuffleV2": "b7a1d5223ee3e848",
    "resnet110": "14082e796776b460", "resnet14": "1f7917f3e9058e76", "resnet20": "892061a106f86ce0",
    "resnet32": "aa95989e7c0111bc", "resnet32x4": "5a2f4296fdc06de2", "resnet44": "3525fc1cfb28ce74",
    "resnet56": "337d9f747868f1dd", "resnet8": "1e8d9d7be7abe181", "resnet8x4": "d2115bc0725be5ea",
    "vgg11": "a940a6a922200af3", "vgg13": "1203d287d079e469", "vgg16": "d5e1b22db9c02c63",
    "vgg19": "a84ffc4efab96ae0", "vgg8": "192725c09135bb46", "wrn_16_1": "ae038b3a5a5d794f",
    "wrn_16_2": "ea6f5696b4b89500", "wrn_40_1": "ba38642fd19d1689", "wrn_40_2": "d1626a5a68f51e63",
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # Batch-2 CPU convolutions gain nothing from more threads, while OpenMP spin-waiting makes them
    # 5-10x slower whenever another process shares the 2 cores (measured: 166 s vs 18 s here).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def layout_hash(model: nn.Module) -> str:
    lines = sorted(f"{k}:{list(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def randomise_(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter and BN statistic distinct values, so a load that skips tensors shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g) * 0.1
            t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise)
    return model.eval()


# ------------------------------------------------------------------ registry / building
def test_list_models_is_sorted_and_complete() -> None:
    names = list_models()
    assert names == sorted(names)
    assert REQUIRED <= set(names), f"missing: {sorted(REQUIRED - set(names))}"
    assert names == MODELS.names()


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_model_forward_rgb32_and_gray28(name: str) -> None:
    torch.manual_seed(0)
    rgb = create_model(name, 100).eval()
    with torch.no_grad():
        logits, feat = rgb(torch.randn(2, 3, 32, 32))
        assert logits.shape == (2, 100)
        assert feat.shape == (2, rgb.feature_dim)
        # feat is the classifier's input (pre-fc) and comes after the final ReLU.
        torch.testing.assert_close(last_linear(rgb)(feat), logits)
        assert (feat >= 0).all()

    # Fashion-MNIST shape: one channel, 28x28, trained (train-mode BN, backward works).
    gray = create_model(name, 10, in_channels=1).train()
    logits, feat = gray(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10) and feat.shape == (2, gray.feature_dim)
    (logits.sum() + feat.mean()).backward()
    assert all(p.grad is not None for p in gray.parameters())

    # in_channels changes only the first conv (the head differs by num_classes).
    shapes3 = {k: v.shape for k, v in rgb.state_dict().items()}
    shapes1 = {k: v.shape for k, v in gray.state_dict().items()}
    assert shapes3.keys() == shapes1.keys()
    differing = {k for k in shapes3 if shapes3[k] != shapes1[k]}
    head = last_linear(rgb)
    first_conv = next(k for k in shapes3 if k.endswith("weight"))
    assert shapes1[first_conv][1] == 1
    head_keys = {n for n, p in rgb.named_parameters() if p is head.weight or p is head.bias}
    assert differing == {first_conv} | head_keys


@pytest.mark.parametrize("name", [n for n in IMAGENET_MODELS if n.startswith("tv_")])
def test_imagenet_model_keeps_torchvision_names_and_returns_features(name: str) -> None:
    model = create_model(name, 1000).eval()
    reference = getattr(torchvision.models, name[3:])(weights=None)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]
    with torch.no_grad():
        logits, feat = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 1000) and feat.shape == (1, model.feature_dim)
    torch.testing.assert_close(last_linear(model)(feat), logits)


def test_imagenet_model_one_channel_and_torchvision_weights_give_same_logits(tmp_path: Path) -> None:
    gray = create_model("tv_resnet18", 10, in_channels=1).eval()
    with torch.no_grad():
        assert gray(torch.randn(1, 1, 64, 64))[0].shape == (1, 10)
    assert gray.conv1.weight.shape == (64, 1, 7, 7)

    tv = randomise_(torchvision.models.resnet18(weights=None, num_classes=10), seed=1)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")  # raw torchvision state_dict
    ours = create_model("tv_resnet18", 10)
    load_pretrained(ours, tmp_path / "tv.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x)[0], tv(x))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_and_feature_dim_match_published(name: str) -> None:
    millions, dim = PUBLISHED[name]
    model = create_model(name, 100)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == millions
    assert model.feature_dim == dim


def test_imagenet_mobilenet_v1_has_the_published_size() -> None:
    # MobileNetV1 (1.0 width, 224 px): 4.23 M parameters with 1000 classes, 1024-d pooled feature.
    model = create_model("mobilenet_v1", 1000)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 4.23
    assert model.feature_dim == 1024
    assert {"model.0.0.weight", "model.13.3.weight", "fc.weight"} <= set(model.state_dict())


@pytest.mark.parametrize("name", sorted(REFERENCE_LAYOUT))
def test_state_dict_layout_matches_reference(name: str) -> None:
    assert layout_hash(create_model(name, 100)) == REFERENCE_LAYOUT[name]


@pytest.mark.parametrize(
    "name, present, absent",
    [
        ("resnet56", {"conv1.weight": (16, 3, 3, 3), "layer3.8.bn2.running_mean": (64,),
                      "layer2.0.downsample.0.weight": (32, 16, 1, 1), "fc.weight": (100, 64)},
         ["layer1.0.downsample.0.weight", "layer3.9.conv1.weight"]),
        ("resnet8x4", {"layer1.0.downsample.1.running_var": (64,), "fc.weight": (100, 256)}, []),
        ("wrn_40_2", {"block1.layer.0.bn1.weight": (16,), "block1.layer.0.conv1.weight": (32, 16, 3, 3),
                      "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
                      "block3.layer.5.conv2.weight": (128, 128, 3, 3), "bn1.running_var": (128,),
                      "fc.bias": (100,)},
         ["block1.layer.1.convShortcut.weight"]),
        ("wrn_40_1", {"block2.layer.0.convShortcut.weight": (32, 16, 1, 1)},
         ["block1.layer.0.convShortcut.weight"]),
        ("vgg13", {"block0.0.bias": (64,), "block0.3.weight": (64, 64, 3, 3),
                   "block0.4.running_mean": (64,), "block4.4.num_batches_tracked": (),
                   "classifier.weight": (100, 512)},
         ["block0.5.weight", "pool4.weight"]),
        ("MobileNetV2", {"conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
                         "blocks.6.0.conv.7.running_var": (160,), "conv2.0.weight": (1280, 160, 1, 1),
                         "classifier.0.weight": (100, 1280)}, []),
        ("ShuffleV1", {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (54, 24, 1, 1),
                       "layer1.1.conv1.weight": (60, 80, 1, 1), "layer3.3.bn3.weight": (960,),
                       "linear.weight": (100, 960)}, []),
        ("ShuffleV2", {"layer1.0.conv5.weight": (58, 58, 1, 1), "layer3.3.bn3.running_mean": (232,),
                       "conv2.weight": (1024, 464, 1, 1), "bn2.weight": (1024,), "linear.bias": (100,)}, []),
        ("ResNet50", {"layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                      "linear.weight": (100, 2048)},
         ["fc.weight", "layer1.1.shortcut.0.weight"]),
    ],
)  # fmt: skip
def test_reference_parameter_names(
    name: str, present: dict[str, tuple[int, ...]], absent: list[str]
) -> None:
    sd = create_model(name, 100).state_dict()
    for key, shape in present.items():
        assert key in sd, f"{name}: {key} missing"
        assert tuple(sd[key].shape) == shape, key
    for key in absent:
        assert key not in sd, f"{name}: unexpected {key}"


def test_custom_widths_build_a_tiny_resnet() -> None:
    model = create_model("resnet8", 10, in_channels=1, widths=[8, 16, 32, 64])
    assert model.feature_dim == 64
    sd = model.state_dict()
    assert sd["conv1.weight"].shape == (8, 1, 3, 3)
    # stem 8 -> stage 16 needs a projection
    assert sd["layer1.0.downsample.0.weight"].shape == (16, 8, 1, 1)
    assert sd["fc.weight"].shape == (10, 64)
    logits, feat = model(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10) and feat.shape == (2, 64)
    assert create_model("resnet20", 10, widths=(4, 4, 8, 8)).feature_dim == 8


@pytest.mark.parametrize("widths", [[8, 16, 32], [8, 16, 32, 0], "8,16,32,64", 64, [8.0, 16, 32, 64]])
def test_bad_widths_are_rejected(widths: object) -> None:
    with pytest.raises(ConfigError, match="widths must be a list of 4 positive integers"):
        create_model("resnet8", 10, widths=widths)


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"'width'.*valid options: widths"):
        create_model("resnet8", 10, width=[8, 16, 32, 64])
    with pytest.raises(ConfigError, match="'widths'.*takes no extra options"):
        create_model("vgg8", 10, widths=[8, 16, 32, 64])


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_model("resnet9", 10)
    message = str(info.value)
    assert "'resnet9'" in message
    for name in ("resnet8", "wrn_40_2", "ShuffleV2", "tv_resnet18"):
        assert name in message
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 10, "in_channels": 0},
                                    {"num_classes": True}, {"num_classes": 10.0}])  # fmt: skip
def test_bad_num_classes_or_channels(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="must be a positive integer"):
        create_model("resnet8", **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------ load_pretrained
def _outputs(model: nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)[0]


def test_round_trip_published_format(tmp_path: Path) -> None:
    source = randomise_(create_model("resnet8x4", 100), seed=1)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": source.state_dict(), "epoch": 240, "best_acc": 79.42}, path)

    target = create_model("resnet8x4", 100)
    assert not torch.allclose(_outputs(target), _outputs(source))
    info = load_pretrained(target, path)
    torch.testing.assert_close(_outputs(target), _outputs(source), rtol=0, atol=0)
    assert info["key"] == "model"
    assert info["metadata"] == {"epoch": 240, "best_acc": 79.42}
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []


def test_dataparallel_prefix_and_alternative_keys(tmp_path: Path) -> None:
    source = randomise_(create_model("wrn_16_1", 100), seed=2)
    wrapped = nn.DataParallel(source).state_dict()
    assert next(iter(wrapped)).startswith("module.")
    # Older training scripts store metadata as tensors or numpy scalars.
    ckpt = {"state_dict": wrapped, "best_acc": torch.tensor(75.5), "epoch": np.int64(7)}
    torch.save(ckpt, tmp_path / "dp.pth")
    target = create_model("wrn_16_1", 100)
    info = load_pretrained(target, tmp_path / "dp.pth")
    torch.testing.assert_close(_outputs(target), _outputs(source), rtol=0, atol=0)
    assert info["key"] == "state_dict"
    assert info["metadata"] == {"best_acc": pytest.approx(75.5), "epoch": 7}


def test_raw_state_dict(tmp_path: Path) -> None:
    source = randomise_(create_model("ShuffleV2", 10), seed=3)
    torch.save(source.state_dict(), tmp_path / "raw.pth")
    target = create_model("ShuffleV2", 10)
    info = load_pretrained(target, tmp_path / "raw.pth")
    torch.testing.assert_close(_outputs(target), _outputs(source), rtol=0, atol=0)
    assert info["key"] is None and info["metadata"] == {}


def test_checkpoint_with_python_objects_loads_with_a_warning(tmp_path: Path) -> None:
    source = randomise_(create_model("resnet8", 10), seed=4)
    torch.save({"model": source.state_dict(), "opt": argparse.Namespace(lr=0.05)}, tmp_path / "opt.pth")
    target = create_model("resnet8", 10)
    with pytest.raises(CheckpointError, match="argparse.Namespace.*trust_checkpoint=true"):
        load_pretrained(target, tmp_path / "opt.pth")  # weights-only unless trusted
    with pytest.warns(UserWarning, match="weights_only=False.*argparse.Namespace"):
        load_pretrained(target, tmp_path / "opt.pth", trust=True)
    torch.testing.assert_close(_outputs(target), _outputs(source), rtol=0, atol=0)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "ckpt_epoch_240.pth"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_pretrained(create_model("resnet8", 10), path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_pretrained(create_model("resnet8", 10), tmp_path)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file_is_reported_as_corrupt(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "full.pth"
    torch.save({"model": create_model("resnet8", 10).state_dict(), "epoch": 1}, path,
               _use_new_zipfile_serialization=not legacy)  # fmt: skip
    load_pretrained(create_model("resnet8", 10), path)  # the intact file (either format) loads
    data = path.read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*re-download"):
        load_pretrained(create_model("resnet8", 10), tmp_path / "half.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_pretrained(create_model("resnet8", 10), tmp_path / "empty.pth")


def test_wrong_num_classes_names_the_shapes_and_leaves_model_untouched(tmp_path: Path) -> None:
    torch.save({"model": create_model("resnet8", 100).state_dict()}, tmp_path / "c100.pth")
    target = create_model("resnet8", 10)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_pretrained(target, tmp_path / "c100.pth")
    message = str(info.value)
    assert "fc.weight: checkpoint (100, 64) vs model (10, 64)" in message
    assert "fc.bias" in message and "num_classes=100" in message
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    resnet20 = randomise_(create_model("resnet20", 100), seed=5)
    torch.save({"model": resnet20.state_dict()}, tmp_path / "r20.pth")
    with pytest.raises(CheckpointError) as info:
        load_pretrained(create_model("resnet8", 100), tmp_path / "r20.pth")
    message = str(info.value)
    unexpected = len(resnet20.state_dict()) - len(create_model("resnet8", 100).state_dict())
    assert f"{unexpected} unexpected in the checkpoint" in message
    assert "layer1.1.bn1.bias" in message and "more)" in message  # at most 10 names are listed
    assert "different architecture" in message and "strict=False" in message

    torch.save({"model": create_model("resnet8", 100).state_dict()}, tmp_path / "r8.pth")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: layer1\.1\."):
        load_pretrained(create_model("resnet20", 100), tmp_path / "r8.pth")

    torch.save({"model": create_model("vgg8", 100).state_dict()}, tmp_path / "vgg8.pth")
    with pytest.raises(CheckpointError, match="shares no parameter names"):
        load_pretrained(create_model("resnet8", 100), tmp_path / "vgg8.pth", strict=False)


def test_non_strict_loads_the_overlap_and_reports_the_rest(tmp_path: Path) -> None:
    resnet20 = randomise_(create_model("resnet20", 100), seed=6)
    torch.save({"model": resnet20.state_dict()}, tmp_path / "r20.pth")
    target = create_model("resnet8", 100)
    info = load_pretrained(target, tmp_path / "r20.pth", strict=False)
    assert info["missing_keys"] == []
    assert "layer1.1.conv1.weight" in info["unexpected_keys"]
    assert torch.equal(target.conv1.weight, resnet20.conv1.weight)
    assert torch.equal(target.layer3[0].bn2.running_var, resnet20.layer3[0].bn2.running_var)


def test_file_without_a_state_dict_is_explained(tmp_path: Path) -> None:
    torch.save({"weights": {"a": 1}, "epoch": 3}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"top-level keys are: 'weights', 'epoch'.*key="):
        load_pretrained(create_model("resnet8", 10), tmp_path / "odd.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_pretrained(create_model("resnet8", 10), tmp_path / "list.pth")
