"""The fast path must not change what is learned: the device and classic input pipelines, and the
CUDA-graph step versus the eager one, give the same training curves on the same seed (CPU, fp32).

CUDA graphs cannot exist on this machine, so the graph tests swap in :class:`ReplayingGraphStep`,
the package's stand-in for the two CUDA calls of :class:`ickd.engine.step.CudaGraphStep` (capture and
replay; :mod:`ickd.engine.cpu_graph`) that re-runs the captured body on the static inputs,
overwriting the gradients as a replayed backward does. Everything around it (warm-up, recapture on a new signature, eager fallbacks, gradient
ownership, in-graph meters) is the real code. The real capture is checked by bench/gpu_check.sh.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from ickd.engine import train
from ickd.engine import step as step_mod
from ickd.engine import trainer as trainer_mod
from ickd.engine.cpu_graph import CpuReplayGraphStep
from ickd.engine.step import EpochMeters
from ickd.errors import ConfigError
from tests.helpers import compose_config


class ReplayingGraphStep(CpuReplayGraphStep):
    """The package's CPU stand-in (see the module docstring), registering every instance."""

    instances: list["ReplayingGraphStep"] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ReplayingGraphStep.instances.append(self)


@pytest.fixture
def graph_on_cpu(monkeypatch):
    ReplayingGraphStep.instances = []
    monkeypatch.setattr(step_mod, "CudaGraphStep", ReplayingGraphStep)
    monkeypatch.setattr(trainer_mod.Trainer, "resolve_step_mode", lambda self: "graph")
    return ReplayingGraphStep.instances


def curve(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_curves(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for ma, mb in zip(a, b):
        for key in ma:
            if key.startswith(("train/", "val/")):
                assert math.isclose(ma[key], mb[key], rel_tol=1e-6, abs_tol=1e-9), (key, ma[key], mb[key])


def student_weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=False)["distiller"]["student"]


def assert_same_weights(a, b) -> None:
    wa, wb = student_weights(a), student_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# IC-KD with a 2-epoch ramp (the loss constants change between epochs 1 and 2) and batch 48 over
# 512 samples: 10 full batches and a short one, which a graph of batch 48 cannot take.
ICKD = ["distill=ickd", "distill.warmup_epochs=2", "trainer.epochs=3", "trainer.batch_size=48"]


@pytest.mark.slow
def test_classic_and_device_pipelines_train_identically(tmp_path, teacher_dir):
    args = [*ICKD, f"teacher.checkpoint={teacher_dir}"]
    device = train(compose_config(*args, "trainer.pipeline=device"), tmp_path / "device")
    classic = train(compose_config(*args, "trainer.pipeline=classic", "trainer.num_workers=2"), tmp_path / "classic")
    assert device["status"] == classic["status"] == "completed"
    assert_same_curves(curve(tmp_path / "device"), curve(tmp_path / "classic"))
    assert_same_weights(tmp_path / "device", tmp_path / "classic")


@pytest.mark.slow
def test_graph_step_trains_exactly_like_the_eager_step(tmp_path, teacher_dir, graph_on_cpu, monkeypatch):
    args = [*ICKD, f"teacher.checkpoint={teacher_dir}"]
    graph = train(compose_config(*args), tmp_path / "graph")
    (step,) = graph_on_cpu
    graph_on_cpu.clear()
    monkeypatch.setattr(trainer_mod.Trainer, "resolve_step_mode", lambda self: "eager")
    eager = train(compose_config(*args), tmp_path / "eager")
    assert not graph_on_cpu and graph["status"] == eager["status"] == "completed"
    assert_same_curves(curve(tmp_path / "graph"), curve(tmp_path / "eager"))
    assert_same_weights(tmp_path / "graph", tmp_path / "eager")
    # The ramp (0.5, then 1.0) is a device scalar the graph reads (ickd.fastpath "device_ramp"): one
    # capture for all 3 epochs (before issue 12: one per ramp value, 2). Per epoch: 10 full batches
    # and 1 short one; warm-up = 3 eager steps before the capture.
    assert step.captures == 1
    assert step.replays == 3 * 10 - 3
    assert step.eager_steps == 3 + 3


@pytest.mark.slow
def test_graph_step_waits_while_an_online_bank_fills(tmp_path, graph_on_cpu, monkeypatch):
    args = ["distill=ickd", "paradigm=online", "trainer.epochs=2", "trainer.batch_size=64"]
    graph = train(compose_config(*args), tmp_path / "graph")
    (step,) = graph_on_cpu
    assert graph["status"] == "completed"
    # Epoch 1 fills the banks online: all 8 steps eager; epoch 2: 3 warm-up steps, then the graph.
    assert (step.captures, step.replays, step.eager_steps) == (1, 5, 8 + 3)
    graph_on_cpu.clear()
    monkeypatch.setattr(trainer_mod.Trainer, "resolve_step_mode", lambda self: "eager")
    train(compose_config(*args), tmp_path / "eager")
    assert_same_curves(curve(tmp_path / "graph"), curve(tmp_path / "eager"))


def test_step_modes_resolve_and_graph_needs_cuda(tmp_path):
    with pytest.raises(ConfigError, match="trainer.step=graph needs a CUDA device"):
        train(compose_config("stage=teacher", "trainer.step=graph"), tmp_path / "a")
    with pytest.raises(ConfigError, match="trainer.step='captured' is not valid"):
        train(compose_config("stage=teacher", "trainer.step=captured"), tmp_path / "b")
    with pytest.raises(ConfigError, match="trainer.pipeline='fast' is not available.*device, classic"):
        train(compose_config("stage=teacher", "trainer.pipeline=fast"), tmp_path / "c")


def test_meters_find_the_first_nonfinite_batch_without_host_sync_per_step():
    meters = EpochMeters(torch.device("cpu"))
    meters.reset()
    logits, labels = torch.eye(3), torch.tensor([0, 1, 1])

    def add(ce: float, kd: float) -> None:
        losses = {"ce": torch.tensor(ce), "kd": torch.tensor(kd)}
        meters.add(losses["ce"] + losses["kd"], losses, {"pos_frac": torch.tensor(0.5)}, logits, labels)

    add(1.0, 2.0)
    add(1.0, 2.0)
    assert meters.nonfinite() is None
    add(1.0, float("nan"))
    add(float("inf"), 1.0)  # a later bad batch does not move the first one
    assert meters.nonfinite() == (2, ["kd"])
    assert meters.correct.item() == 4 * 2 and meters.sums["pos_frac"].item() == 2.0
    assert meters.sums["ce"].item() == math.inf
    meters.reset({"step": 7, "sums": {"ce": 3.0}, "correct": 5, "seen": 9})
    assert meters.nonfinite() is None and meters.step.item() == 7 and meters.sums["ce"].item() == 3.0
    assert meters.sums["kd"].item() == 0.0 and meters.correct.item() == 5


def test_ickd_losses_are_fp32_under_the_trainers_bf16_autocast():
    """The fast path runs the networks under bf16 autocast; retrieval and every loss must still be
    computed in fp32 from the (bf16) logits, exactly as outside autocast."""
    from ickd.engine.run import to_container
    from ickd.methods import StepOutputs, create_method
    from tests.helpers import compose_config
    from ickd.distill.paradigms import OfflineDistiller, RetrievalSpec
    from ickd.memory import MemoryBank

    g = torch.Generator().manual_seed(0)
    n, d, c, b = 400, 32, 10, 48
    bank = MemoryBank(n, d, c, retriever="torch")
    labels = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, d, generator=g)
    feats = centres[labels] + 0.5 * torch.randn(n, d, generator=g)
    bank.fill(torch.arange(n), feats, torch.randn(n, c, generator=g) * 3, labels)
    cfg = to_container(compose_config("distill=ickd").distill)
    distiller = OfflineDistiller(torch.nn.Identity(), create_method(cfg), RetrievalSpec(k=16), teacher=None, bank=None)
    idx = torch.arange(b)
    logits = (torch.randn(b, c, generator=g) * 3).to(torch.bfloat16)
    teacher_logits = torch.randn(b, c, generator=g) * 3
    # Reference: the method on fp32 logits, no autocast anywhere.
    neighbours = bank.retrieve(feats[idx], 16, labels[idx], exclude_indices=idx)
    plain = distiller.method(StepOutputs(logits.float(), teacher_logits, labels[idx], idx, 1, neighbours))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, _ = distiller.distil(logits, teacher_logits, feats[idx], labels[idx], idx, 1, bank)
    assert set(plain) == {"ce", "kd", "picd", "nicd"}
    for key in plain:
        assert inside[key].dtype == torch.float32 and torch.equal(inside[key], plain[key]), key
