"""Checkpoints carry a memory bank only when a resume could not get it back otherwise (issue 12):
a frozen, pass-filled bank is rebuilt by the fill pass on resume (checked against a digest), and a
bank that training changes is saved every trainer.bank_checkpoint_every epochs; a resume from a
checkpoint without it restarts from checkpoints/with_bank.pt. Either way the resumed run ends with
the weights of a run that never stopped."""
from __future__ import annotations

import json

import pytest
import torch

from ickd.engine import Callback, train
from ickd.engine import trainer as trainer_mod
from ickd.errors import CheckpointError
from tests.helpers import StopAfter, compose_config


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _load(out, name="last.pt") -> dict:
    return torch.load(out / "checkpoints" / name, weights_only=True)


def _assert_same_student(a, b) -> None:
    wa, wb = _load(a)["distiller"]["student"], _load(b)["distiller"]["student"]
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


class CrashAfter(Callback):
    """A hard crash right after epoch n's checkpoint (nothing more gets saved)."""

    def __init__(self, n):
        self.n = n

    def on_epoch_end(self, epoch, metrics):
        if epoch == self.n:
            raise RuntimeError("node lost")


@pytest.mark.slow
def test_a_frozen_pass_filled_bank_is_rebuilt_on_resume_not_saved(tmp_path, teacher_dir):
    args = [f"teacher.checkpoint={teacher_dir}", "distill=ickd", "memory.update=frozen", "trainer.epochs=3", "trainer.deterministic=true"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train(compose_config(*args), straight)
    assert train(compose_config(*args), cut, callbacks=[StopAfter(1)])["status"] == "stopped"
    saved = _load(cut)["distiller"]["banks"]["teacher"]
    assert saved["rebuilt_on_resume"] and not set(trainer_mod.BANK_ENTRIES) & set(saved["state"])
    assert not (cut / "checkpoints" / trainer_mod.WITH_BANK_FILE).exists()
    done = train(compose_config(*args), cut)
    assert done["status"] == "completed" and done["resumed_from_epoch"] == 1
    _assert_same_student(straight, cut)
    assert [m["epoch"] for m in _metrics(cut)] == [1, 2, 3]
    assert _metrics(cut)[-1]["val/top1"] == _metrics(straight)[-1]["val/top1"]

    # A rebuilt bank that differs from the one trained with is refused, not silently used.
    state = _load(cut)
    state["distiller"]["banks"]["teacher"]["fingerprint"] = "0" * 64
    torch.save(state, cut / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="rebuilt by the fill pass differs"):
        train(compose_config(*args, "trainer.epochs=4"), cut)


@pytest.mark.slow
def test_a_changing_bank_is_saved_every_n_epochs_and_resume_restarts_from_it(tmp_path, teacher_dir):
    args = [f"teacher.checkpoint={teacher_dir}", "distill=ickd", "trainer.epochs=4", "trainer.deterministic=true",
            "trainer.bank_checkpoint_every=3"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(compose_config(*args), straight)
    assert "feats" in _load(straight)["distiller"]["banks"]["teacher"]  # the last epoch always has it
    with pytest.raises(RuntimeError, match="node lost"):
        train(compose_config(*args), crashed, callbacks=[CrashAfter(2)])
    # Epoch 1 carried the bank (the first checkpoint does), epoch 2 did not (2 - 1 < 3).
    last, full = _load(crashed), _load(crashed, trainer_mod.WITH_BANK_FILE)
    assert last["epoch"] == 2 and last["distiller"]["banks"]["teacher"] == {"saved_in": trainer_mod.WITH_BANK_FILE}
    assert full["epoch"] == last["bank_epoch"] == 1 and "feats" in full["distiller"]["banks"]["teacher"]
    done = train(compose_config(*args), crashed)
    assert done["status"] == "completed" and done["resumed_from_epoch"] == 1  # epoch 2 trained again
    _assert_same_student(straight, crashed)
    assert [m["epoch"] for m in _metrics(crashed)] == [1, 2, 3, 4]
    assert [m["train/loss"] for m in _metrics(crashed)] == [m["train/loss"] for m in _metrics(straight)]


@pytest.mark.slow
def test_a_checkpoint_without_its_bank_and_without_with_bank_pt_is_refused(tmp_path, teacher_dir):
    args = [f"teacher.checkpoint={teacher_dir}", "distill=ickd", "trainer.epochs=3", "trainer.bank_checkpoint_every=5"]
    with pytest.raises(RuntimeError, match="node lost"):
        train(compose_config(*args), tmp_path, callbacks=[CrashAfter(2)])
    (tmp_path / "checkpoints" / trainer_mod.WITH_BANK_FILE).unlink()
    with pytest.raises(CheckpointError, match="holds no memory bank.*missing: the run cannot be resumed exactly"):
        train(compose_config(*args), tmp_path)
