"""A CUDA-graph capture that fails must not end the run, and the graph must own the gradients the
optimiser steps on. CPU stand-in for the two CUDA calls (capture, replay): tests/test_fast_path.py's
:class:`ReplayingGraphStep`; everything else (fallback, ownership, meters) is the real code."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from ickd.engine import train
from ickd.engine import step as step_mod
from ickd.engine import trainer as trainer_mod
from tests.helpers import compose_config
from ickd.engine.cpu_graph import ReplayGraph
from tests.test_fast_path import ICKD, ReplayingGraphStep, assert_same_curves, assert_same_weights, curve


class CaptureFails(ReplayingGraphStep):
    """Capture raises part-way: after dropping the gradients, as a capture that hit an unsupported op."""

    def _capture(self, x, y, idx, epoch):
        self.static = (x.clone(), y.clone(), idx.clone())
        self.zero_grad(True)
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line of the cause")


class _FailingReplay(ReplayGraph):
    def replay(self) -> None:
        super().replay()  # the body ran: meters, BN statistics and the bank were written once...
        raise RuntimeError("CUDA error: an illegal instruction was encountered")  # ...then it failed


class FirstReplayFails(ReplayingGraphStep):
    def _capture(self, x, y, idx, epoch):
        super()._capture(x, y, idx, epoch)
        self.graph = _FailingReplay(self, epoch)


def _use(monkeypatch, cls):
    ReplayingGraphStep.instances = []  # every stand-in registers there
    monkeypatch.setattr(step_mod, "CudaGraphStep", cls)
    monkeypatch.setattr(trainer_mod.Trainer, "resolve_step_mode", lambda self: "graph")
    return ReplayingGraphStep.instances


@pytest.mark.slow
@pytest.mark.parametrize("cls, cause", [
    (CaptureFails, "RuntimeError: operation not permitted when stream is capturing"),
    (FirstReplayFails, "RuntimeError: CUDA error: an illegal instruction was encountered"),
])
def test_a_failed_capture_falls_back_to_the_eager_step_and_trains_identically(tmp_path, teacher_dir, monkeypatch, caplog, cls, cause):
    args = [*ICKD, f"teacher.checkpoint={teacher_dir}"]
    instances = _use(monkeypatch, cls)
    with caplog.at_level(logging.WARNING, logger="ickd.engine.step"):
        fell_back = train(compose_config(*args), tmp_path / "fallback")
    (step,) = instances
    monkeypatch.setattr(trainer_mod.Trainer, "resolve_step_mode", lambda self: "eager")
    eager = train(compose_config(*args), tmp_path / "eager")
    assert fell_back["status"] == eager["status"] == "completed"
    # One line with the cause (its first line), then never another capture.
    lines = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert lines == [f"CUDA graph capture failed ({cause}); training continues with the eager step"]
    assert (step.captures, step.replays, step.mode, step.fallback) == (1 if cls is FirstReplayFails else 0, 0, "eager-fallback", cause)
    # Same learning as an eager run: meters, BN statistics, bank and gradients were left intact.
    assert_same_curves(curve(tmp_path / "fallback"), curve(tmp_path / "eager"))
    assert_same_weights(tmp_path / "fallback", tmp_path / "eager")
    metrics = curve(tmp_path / "fallback")
    assert [m["step_mode"] for m in metrics] == ["eager-fallback"] * 3
    assert all(m["step_fallback"] == cause and m["step/fallback"] == 1 for m in metrics)
    assert [m["step_mode"] for m in curve(tmp_path / "eager")] == ["eager"] * 3


@pytest.mark.slow
def test_the_optimiser_steps_on_the_graph_owned_gradients(tmp_path, teacher_dir, monkeypatch):
    """A live graph writes its gradients into the tensors it captured; an eager step in between (the
    short last batch) or the next epoch's replays must leave the optimiser stepping on exactly
    those tensors (a dropped gradient, ``set_to_none=True``, would leave the graph writing into
    memory no parameter reads)."""
    instances = _use(monkeypatch, ReplayingGraphStep)
    finish = step_mod.TrainStep.finish
    seen: list[tuple[str, int, bool]] = []  # (kind of step, epoch's capture, same tensors as the graph's)
    owned: dict[int, list[int]] = {}

    def checked_finish(self):
        graph = self.graph
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        ptrs = [p.grad.data_ptr() if p.grad is not None else None for p in params]
        if graph.graph is not None:
            if graph.captures not in owned:  # the capture's first replay: these tensors are the graph's
                owned[graph.captures] = ptrs
            seen.append(("eager" if graph._eager_now else "replay", graph.captures, ptrs == owned[graph.captures]))
        finish(self)

    monkeypatch.setattr(step_mod.TrainStep, "finish", checked_finish)
    eager = step_mod.TrainStep.eager

    def marked_eager(self, *args):
        self.graph._eager_now = True
        try:
            return eager(self, *args)
        finally:
            self.graph._eager_now = False

    monkeypatch.setattr(step_mod.TrainStep, "eager", marked_eager)
    monkeypatch.setattr(ReplayingGraphStep, "_eager_now", False, raising=False)
    summary = train(compose_config(*ICKD, f"teacher.checkpoint={teacher_dir}"), tmp_path)
    (step,) = instances
    assert summary["status"] == "completed" and step.captures >= 1
    # Every optimiser step once a graph exists was checked: the replays, and each epoch's short last
    # batch (eager, 10 full batches of 48 + 32 samples), and at least once the same graph replayed on
    # after a short batch into the next epoch (2 if a ramp recaptures in epoch 2, else 3 times).
    kinds = [(k, c) for k, c, _ in seen]
    assert kinds.count(("eager", step.captures)) >= 1 and sum(k == "eager" for k, _ in kinds) == 3
    assert sum(k == "replay" for k, _ in kinds) == step.replays
    assert any(kinds[i][0] == "eager" and kinds[i + 1] == ("replay", kinds[i][1]) for i in range(len(kinds) - 1))
    assert all(same for _, _, same in seen), [s for s in seen if not s[2]]


def test_the_step_falls_back_once_and_stays_eager_fast():
    """The state machine alone (no training run): a capture that raises is logged once, its batch
    and all later ones run eagerly with fresh gradients, and the meters' snapshot is restored."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: list[str] = []
    restored: list[bool] = []

    def body(x, y, idx, epoch):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        calls.append("body")
        return loss.detach(), {}, {}, x

    def eager(x, y, idx, epoch):
        opt.zero_grad(set_to_none=True)
        calls.append("eager")
        return body(x, y, idx, epoch)

    owner = SimpleNamespace(body=body, finish=opt.step, eager=eager, zero_grad=lambda none: opt.zero_grad(set_to_none=none),
                            snapshot=lambda: (lambda: restored.append(True)))  # what a TrainStep gives its graph
    step = CaptureFails(owner, batch_size=4, warmup_steps=1)
    x, y, idx = torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.arange(4)
    (_, counted) = step(x, y, idx, 0, "sig", None)  # warm-up
    assert counted and step.mode == "graph"
    (_, counted) = step(x, y, idx, 0, "sig", None)  # capture raises: this batch runs eagerly
    assert not counted and step.mode == "eager-fallback" and step.fallback.startswith("RuntimeError: operation not permitted")
    assert restored == [True] and step.graph is None and not step.holds_grads
    for _ in range(3):  # never tries again, not even for a new signature
        (_, counted) = step(x, y, idx, 1, "another", None)
        assert not counted
    assert step.captures == 0 and step.replays == 0 and step.eager_steps == 1 + 1 + 3
    assert calls.count("eager") == 4
