"""End-to-end training through the real Hydra configs on the synthetic dataset (CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ickd.distill import build_distiller
from ickd.engine import Callback, train
from ickd.engine.run import build_data_from_config, to_container
from ickd.errors import CheckpointError, ConfigError, DatasetNotFoundError, NonFiniteLossError, UnknownNameError
from tests.helpers import REPO, StopAfter, compose_config


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_teacher_stage_writes_config_metrics_checkpoints_and_learns(teacher_dir):
    metrics = _metrics(teacher_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["val/top1"] > 30.0  # 10 classes: chance is 10%
    assert "train/ce" in metrics[0] and "val/top5" in metrics[0]
    result = json.loads((teacher_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["best_top1"] == max(m["val/top1"] for m in metrics)
    assert "stage: teacher" in (teacher_dir / "config.yaml").read_text()
    best = torch.load(teacher_dir / "checkpoints" / "best.pt", weights_only=True)
    assert set(best) == {"model", "epoch", "best_acc"}  # the published teacher format


@pytest.mark.parametrize(
    "overrides",
    [
        ["distill=ce"],
        ["distill=kd"],
        ["distill=dkd", "distill.warmup_epochs=2"],
        ["distill=ickd"],
        ["distill=ickd", "memory.split=separate", "memory.k_pos=2", "memory.k_neg=2"],
        ["distill=ickd", "memory.backend=faiss_flat", "memory.update=momentum"],
        ["distill=ickd", "memory.size=256", "memory.subset=fifo", "memory.fill=online"],
        ["distill=ickd", "paradigm=online", "teacher=resnet8"],
        ["distill=ickd", "paradigm=teacher_free", "paradigm.bank_source=ema"],
        ["distill=ickd", "paradigm=teacher_free", "paradigm.bank_source=self"],
        ["distill=kd", "paradigm=online"],
    ],
    ids=lambda o: "-".join(x.split("=")[-1] for x in o),
)
def test_every_method_and_paradigm_trains_end_to_end(tmp_path, teacher_dir, overrides):
    cfg = compose_config(f"teacher.checkpoint={teacher_dir}", *overrides)
    summary = train(cfg, tmp_path)
    assert summary["status"] == "completed"
    metrics = _metrics(tmp_path)
    assert len(metrics) == 2
    for m in metrics:
        assert all(v == v for v in m.values() if isinstance(v, float)), m  # no NaN anywhere
    last = metrics[-1]
    name = cfg.distill.name
    expected = {"ce": ["train/ce"], "kd": ["train/kd"], "dkd": ["train/dkd"], "ickd": ["train/kd", "train/picd", "train/nicd", "train/pos_frac", "train/nb_sim"]}[name]
    for key in expected:
        assert key in last, (key, sorted(last))
    if name == "ickd":
        assert 0.0 <= last["train/pos_frac"] <= 1.0
        banks = ["peer", "student"] if cfg.paradigm.name == "online" else [""]
        for bank in banks:
            prefix = f"bank_{bank}_" if bank else "bank_"
            assert last[prefix + "entries"] == (cfg.memory.size or 512) and last[prefix + "bytes"] > 0  # full bank
            assert last[prefix + "retrieval_ms_mean"] > 0
    if cfg.paradigm.name == "online":
        assert "val_peer/top1" in last and "train/peer_ce" in last


def test_ickd_retrieval_finds_same_class_neighbours_from_a_trained_teacher(tmp_path, teacher_dir):
    cfg = compose_config(f"teacher.checkpoint={teacher_dir}", "distill=ickd", "trainer.epochs=1")
    train(cfg, tmp_path)
    last = _metrics(tmp_path)[-1]
    # A teacher above 30% accuracy on 10 classes has far more than 10% same-class neighbours.
    assert last["train/pos_frac"] > 0.3


def test_only_the_student_gets_gradients(teacher_dir):
    cfg = to_container(compose_config(f"teacher.checkpoint={teacher_dir}", "distill=ickd"))
    data = build_data_from_config(cfg)
    distiller = build_distiller(cfg, data.num_classes, data.in_channels, data.num_train, torch.device("cpu"))
    loader = data.train_loader(64, shuffle=False, augment=False, device="cpu")
    loader.set_epoch(0)
    with torch.no_grad():
        distiller.fill_banks(loader)
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    distiller.train()
    x, y, idx = next(iter(loader))
    out = distiller.forward_train(x, y, idx, epoch=0)
    sum(out.losses.values()).backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert all(not p.requires_grad for p in distiller.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
    assert not distiller.teacher.training  # frozen BN even in train mode
    for k, v in distiller.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # BN running stats untouched
    ids = {id(p) for p in distiller.trainable_parameters()}
    assert not ids & {id(p) for p in distiller.teacher.parameters()}


@pytest.mark.parametrize("paradigm", ["offline", "teacher_free"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, teacher_dir, paradigm):
    args = [f"teacher.checkpoint={teacher_dir}", "distill=ickd", f"paradigm={paradigm}", "trainer.epochs=4", "trainer.deterministic=true"]
    straight = tmp_path / "straight"
    train(compose_config(*args), straight)

    # Interrupt a second run after epoch 2 (a callback asks to stop), then resume it.
    partial = tmp_path / "partial"
    stopper_cfg = compose_config(*args)
    stopped = train(stopper_cfg, partial, callbacks=[StopAfter(2)])
    assert stopped["status"] == "stopped" and stopped["epochs_completed"] == 2
    done = train(compose_config(*args), partial)  # trainer.resume=auto picks up last.pt
    assert done["status"] == "completed" and done["resumed_from_epoch"] == 2

    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["distiller"]["student"]
    b = torch.load(partial / "checkpoints" / "last.pt", weights_only=True)["distiller"]["student"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["epoch"] for m in _metrics(partial)] == [1, 2, 3, 4]  # nothing counted twice
    assert _metrics(partial)[-1]["val/top1"] == _metrics(straight)[-1]["val/top1"]


def test_interrupted_mid_epoch_resumes_from_that_batch_with_the_same_weights(tmp_path, teacher_dir):
    """A preemption cannot wait for the epoch to end: the run checkpoints after the current batch
    and a rerun continues from the next batch, ending exactly where an uninterrupted run ends."""
    args = [f"teacher.checkpoint={teacher_dir}", "distill=ickd", "trainer.epochs=3", "trainer.deterministic=true"]
    straight = tmp_path / "straight"
    train(compose_config(*args), straight)

    class InterruptAt(Callback):  # asks once, after the 5th batch of epoch 2
        def __init__(self):
            self.polls = None

        def on_epoch_end(self, epoch, metrics):
            self.polls = -1 if epoch == 1 else None  # the trainer also polls once at the epoch's end

        def interrupt_requested(self):
            if self.polls is None:
                return False
            self.polls += 1
            return self.polls == 5

    cut = tmp_path / "cut"
    first = train(compose_config(*args), cut, callbacks=[InterruptAt()])
    assert first["status"] == "interrupted" and first["epochs_completed"] == 1
    state = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["partial"]["epoch"] == 1 and state["partial"]["step"] == 5

    class Seen(Callback):
        def on_run_start(self, run):
            self.start = (run.start_epoch, run.extra["start_batch"])

    seen = Seen()
    done = train(compose_config(*args), cut, callbacks=[seen])
    assert done["status"] == "completed" and seen.start == (1, 5)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["distiller"]["student"]
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["distiller"]["student"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ms, mc = _metrics(straight), _metrics(cut)
    assert [m["epoch"] for m in mc] == [1, 2, 3]
    # the interrupted epoch's train loss averages all 16 batches, not only those after the resume
    assert mc[1]["train/loss"] == pytest.approx(ms[1]["train/loss"], rel=1e-6)
    assert mc[-1]["val/top1"] == ms[-1]["val/top1"]


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (["student=resnet_nope"], Exception, "resnet_nope"),
        (["distill.name=nope"], UnknownNameError, "valid distill method names"),
        (["dataset.name=nope"], UnknownNameError, "valid dataset names"),
        (["paradigm.name=nope", "distill=kd"], UnknownNameError, "valid paradigm names"),
        (["distill=ickd", "memory.k=600"], ConfigError, "memory.k"),
        (["distill=ickd", "memory.k=0"], ConfigError, "k"),
        (["distill=ickd", "memory.size=100000"], ConfigError, "larger than the training set"),
        (["distill=ickd", "memory.size=8", "memory.k=8"], ConfigError, "memory.size"),
        (["distill=ickd", "distill.nicd_weight=-1"], ConfigError, "negative"),
        (["distill=kd", "distill.temperature=0"], ConfigError, "temperature"),
        (["distill=kd", "teacher.checkpoint=null"], ConfigError, "stage=teacher"),
        (["stage=nope"], ConfigError, "stage=student"),
        (["trainer.epochs=0"], ConfigError, "epochs"),
        (["dataset=cifar100", "dataset.root={tmp}"], DatasetNotFoundError, "cifar-100-python"),
        (["dataset=imagenet", "dataset.root={tmp}"], DatasetNotFoundError, "train"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, teacher_dir, overrides, error, words):
    if overrides == ["student=resnet_nope"]:
        # Hydra itself rejects an unknown option of a config group and lists the valid ones.
        from hydra.errors import ConfigCompositionException

        with pytest.raises(ConfigCompositionException, match="resnet32x4"):
            compose_config(*overrides)
        return
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose_config(f"teacher.checkpoint={teacher_dir}", *(o.replace("{tmp}", str(empty)) for o in overrides))
    with pytest.raises(error) as info:
        train(cfg, tmp_path / "run")
    assert words in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained on bad input


def test_unknown_model_name_in_code_lists_valid_names(tmp_path, teacher_dir):
    cfg = compose_config(f"teacher.checkpoint={teacher_dir}", "student.name=resnet_nope", "distill=kd")
    with pytest.raises(UnknownNameError, match="resnet32x4"):
        train(cfg, tmp_path)


def test_teacher_checkpoint_of_another_architecture_names_the_mismatch(tmp_path, teacher_dir):
    cfg = compose_config(f"teacher.checkpoint={teacher_dir}", "teacher=resnet20", "distill=kd")
    with pytest.raises(CheckpointError, match="layer1"):
        train(cfg, tmp_path)


def test_corrupt_resume_checkpoint_is_reported_and_left_in_place(tmp_path, teacher_dir):
    cfg = compose_config(f"teacher.checkpoint={teacher_dir}", "distill=kd", "trainer.epochs=1")
    train(cfg, tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(compose_config(f"teacher.checkpoint={teacher_dir}", "distill=kd", "trainer.epochs=2"), tmp_path)
    assert last.read_bytes() == data[: len(data) // 2]  # nothing deleted behind the user's back


def test_resuming_with_another_student_names_the_mismatch(tmp_path, teacher_dir):
    train(compose_config(f"teacher.checkpoint={teacher_dir}", "distill=kd", "trainer.epochs=1"), tmp_path)
    with pytest.raises(CheckpointError, match="does not match"):
        train(compose_config(f"teacher.checkpoint={teacher_dir}", "distill=kd", "student=resnet20", "trainer.epochs=2"), tmp_path)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, teacher_dir):
    # A schedule that multiplies the learning rate by 1e30 after epoch 1 makes the weights
    # explode during epoch 2: epoch 1 is good and checkpointed, epoch 2 goes NaN/inf.
    args = [f"teacher.checkpoint={teacher_dir}", "distill=kd", "optim=sgd", "optim.milestones=[1]", "optim.gamma=1e30", "trainer.epochs=3"]
    last = tmp_path / "checkpoints" / "last.pt"

    class KeepEpochOne(Callback):
        def on_checkpoint(self, path, epoch):
            self.saved = (epoch, path.read_bytes())

    keeper = KeepEpochOne()
    with pytest.raises(NonFiniteLossError, match="NaN/inf"):
        train(compose_config(*args), tmp_path, callbacks=[keeper])
    epoch, good = keeper.saved
    assert epoch == 1
    assert last.read_bytes() == good
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "nonfinite"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ickd.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_train_runs_and_nan_exits_with_distinct_code(tmp_path, teacher_dir):
    ok = _cli("train", "dataset=synthetic", "stage=teacher", "model=resnet8", "trainer.epochs=1", "trainer.device=cpu",
              "trainer.progress=off", f"hydra.run.dir={tmp_path / 'ok'}", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "ok" / "checkpoints" / "best.pt").is_file()
    assert (tmp_path / "ok" / ".hydra" / "overrides.yaml").is_file()
    bad = _cli("train", "dataset=synthetic", "distill=kd", "student=resnet8", "teacher=resnet8", f"teacher.checkpoint={teacher_dir}",
               "optim=sgd", "optim.lr=1e30", "trainer.epochs=2", "trainer.device=cpu", "trainer.progress=off", f"hydra.run.dir={tmp_path / 'nan'}", cwd=tmp_path)
    assert bad.returncode == 3, bad.stderr
    assert "NaN/inf" in bad.stderr + bad.stdout
    cfgjob = _cli("train", "distill=ickd", "--cfg", "job", cwd=tmp_path)
    assert cfgjob.returncode == 0 and "picd_weight" in cfgjob.stdout
    helped = _cli("train", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "resnet32x4" in helped.stdout and "teacher_free" in helped.stdout


@pytest.mark.parametrize("experiment", sorted(p.relative_to(REPO / "configs" / "experiment").with_suffix("").as_posix() for p in (REPO / "configs" / "experiment").rglob("*.yaml")))
def test_every_experiment_composes_with_every_method(experiment):
    for distill in ("ce", "kd", "dkd", "ickd"):
        cfg = compose_config(f"experiment={experiment}", f"distill={distill}", base=[])
        assert cfg.teacher.name and cfg.student.name and cfg.dataset.name in ("cifar100", "imagenet", "fashion_mnist")
        if distill == "dkd":
            # pair is typed (ickd.config_schema.PairSchema): null unless the experiment sets it
            assert cfg.distill.beta == (cfg.pair.dkd_beta if cfg.pair is not None else 8.0)


# --- resume safety ---------------------------------------------------------------------------

def _one_epoch_run(out: Path, teacher_dir: Path, *overrides: str) -> bytes:
    """A finished 1-epoch run in ``out``; returns its last.pt bytes."""
    assert train(compose_config(f"teacher.checkpoint={teacher_dir}", "trainer.epochs=1", *overrides), out)["status"] == "completed"
    return (out / "checkpoints" / "last.pt").read_bytes()


def test_resuming_a_run_folder_with_another_method_or_lr_is_refused_and_names_the_keys(tmp_path, teacher_dir):
    last = _one_epoch_run(tmp_path, teacher_dir, "distill=ce")
    label = (tmp_path / "config.yaml").read_text()
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["run_config"]
    assert saved["distill"]["name"] == "ce" and saved["trainer"]["epochs"] == 1  # the resolved config
    with pytest.raises(CheckpointError) as info:
        train(compose_config(f"teacher.checkpoint={teacher_dir}", "distill=kd", "trainer.epochs=2"), tmp_path)
    message = str(info.value)
    assert "distill.name: 'ce' -> 'kd'" in message
    # ce's schema declares temperature (null: ce ignores it, ickd.config_schema.CESchema)
    assert message.index("distill.name") < message.index("distill.temperature: None -> 4.0")  # the headline first
    assert "trainer.epochs" not in message  # may change across a resume
    assert "trainer.resume=never" in message and "trainer.resume_config_check=false" in message and "hydra.run.dir" in message
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.1 -> 0\.05"):
        train(compose_config(f"teacher.checkpoint={teacher_dir}", "distill=ce", "optim.lr=0.05", "trainer.epochs=2"), tmp_path)
    # Refused before anything changed: the folder keeps its label, checkpoint and metrics.
    assert (tmp_path / "config.yaml").read_text() == label
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == last
    assert [m["epoch"] for m in _metrics(tmp_path)] == [1]


def test_resume_differences_are_listed_up_to_ten_then_counted():
    from ickd.engine.trainer import config_differences, format_differences

    old = {"optim": {f"k{i:02d}": i for i in range(13)}, "trainer": {"epochs": 1, "max_batches_per_epoch": None}, "logger": {"name": "none"}}
    new = {"optim": {f"k{i:02d}": i + 1 for i in range(13)}, "trainer": {"epochs": 9, "max_batches_per_epoch": 2}, "logger": {"name": "wandb"}}
    diffs = config_differences(old, new)
    assert [k for k, _, _ in diffs] == [f"optim.k{i:02d}" for i in range(13)] + ["trainer.max_batches_per_epoch"]
    text = format_differences(diffs)
    assert text.count(" -> ") == 10 and text.endswith("and 4 more")


def test_resuming_with_more_epochs_and_other_mutable_keys_continues(tmp_path, teacher_dir):
    _one_epoch_run(tmp_path, teacher_dir, "distill=ce")
    cfg = compose_config(f"teacher.checkpoint={teacher_dir}", "distill=ce", "trainer.epochs=2", "trainer.eval_batch_size=64",
                         "memory.backend=faiss_flat", "name=renamed")
    done = train(cfg, tmp_path)
    assert done["status"] == "completed" and done["resumed_from_epoch"] == 1
    assert [m["epoch"] for m in _metrics(tmp_path)] == [1, 2]
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["run_config"]
    assert saved["trainer"]["epochs"] == 2 and saved["name"] == "renamed"  # now records the resumed config
    assert "epochs: 2" in (tmp_path / "config.yaml").read_text()


def test_resume_config_check_false_continues_with_a_warning_and_keeps_the_original_label(tmp_path, teacher_dir, caplog):
    _one_epoch_run(tmp_path, teacher_dir, "distill=ce")
    label = (tmp_path / "config.yaml").read_text()
    cfg = compose_config(f"teacher.checkpoint={teacher_dir}", "distill=ce", "optim.lr=0.05", "trainer.epochs=2",
                         "trainer.resume_config_check=false")
    with caplog.at_level("WARNING", logger="ickd.engine.trainer"):
        done = train(cfg, tmp_path)
    assert done["status"] == "completed" and done["resumed_from_epoch"] == 1
    assert "optim.lr: 0.1 -> 0.05" in caplog.text and "resume_config_check=false" in caplog.text
    assert (tmp_path / "config.yaml").read_text() == label  # still labelled as the run it started as
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["run_config"]
    assert saved["optim"]["lr"] == 0.1


def test_checkpoint_without_a_run_config_resumes_with_a_warning(tmp_path, teacher_dir, caplog):
    _one_epoch_run(tmp_path, teacher_dir, "distill=ce")
    path = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["run_config"]  # as written before checkpoints recorded their config
    torch.save(state, path)
    with caplog.at_level("WARNING", logger="ickd.engine.trainer"):
        done = train(compose_config(f"teacher.checkpoint={teacher_dir}", "distill=ce", "optim.lr=0.05", "trainer.epochs=2"), tmp_path)
    assert done["status"] == "completed" and done["resumed_from_epoch"] == 1
    assert "records no run config" in caplog.text


def test_cli_resume_with_another_config_exits_2_and_names_the_key(tmp_path):
    args = ["train", "dataset=synthetic", "stage=teacher", "model=resnet8", "trainer.device=cpu", "trainer.progress=off",
            f"hydra.run.dir={tmp_path / 'run'}"]
    train(compose_config(*args[1:-1], "trainer.epochs=1", base=[]), tmp_path / "run")
    bad = _cli(*args, "trainer.epochs=2", "optim.lr=0.2", cwd=tmp_path)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "optim.lr: 0.05 -> 0.2" in bad.stderr + bad.stdout and "trainer.resume_config_check=false" in bad.stderr + bad.stdout


# ---------------------------------------------------------------- holdout vs test evaluation


def _accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    hit = total = 0
    with torch.no_grad():
        for x, y, _ in loader:
            logits, _ = model(x)
            hit += int((logits.argmax(1) == y).sum())
            total += y.shape[0]
    return 100.0 * hit / total


def test_holdout_selects_best_and_the_test_split_is_reported_beside_it(tmp_path):
    # Online IC-KD: two peers, each with a memory bank, so the extra model's metrics are covered too.
    cfg = compose_config("distill=ickd", "paradigm=online", "teacher=resnet8", "dataset.holdout=64",
                         "trainer.epochs=2", "trainer.max_batches_per_epoch=4", "trainer.amp=off")
    summary = train(cfg, tmp_path)
    metrics = _metrics(tmp_path)
    assert summary["status"] == "completed" and len(metrics) == 2  # one metrics line per epoch
    for m in metrics:
        for key in ("test/top1", "test/top5", "holdout/top1", "holdout/top5", "val/top1", "val/top5", "val/best_top1",
                    "test/best_top1", "holdout/best_top1", "val_peer/top1", "test_peer/top1"):
            assert key in m, (key, sorted(m))
        assert (m["val/top1"], m["val/top5"]) == (m["holdout/top1"], m["holdout/top5"])  # selection = holdout
        assert 0 < m["bank_student_entries"] <= 448 and 0 < m["bank_peer_entries"] <= 448
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == summary
    holdout, test = [m["holdout/top1"] for m in metrics], [m["test/top1"] for m in metrics]
    selected = holdout.index(max(holdout))  # the first epoch with the best holdout top-1
    assert result["selection_split"] == "holdout" and result["num_holdout"] == 64
    assert result["best_top1"] == result["best_holdout_top1"] == max(holdout)
    assert result["last_top1"] == result["last_holdout_top1"] == holdout[-1]
    assert result["last_test_top1"] == test[-1] and result["best_test_top1"] == max(test)
    assert result["test_top1_at_best"] == test[selected]
    assert metrics[-1]["test/best_top1"] == max(test) and metrics[-1]["holdout/best_top1"] == max(holdout)
    # The numbers are what best.pt scores on the two splits: holdout = held-out train images, test = test set.
    data = build_data_from_config(to_container(cfg))
    assert (data.num_train, data.num_holdout) == (448, 64)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == selected + 1 and best["best_acc"] == max(holdout)
    distiller = build_distiller(to_container(cfg), data.num_classes, data.in_channels, data.num_train, torch.device("cpu"))
    # The memory banks are addressed by the 448 training samples only: the 64 held out never enter them.
    assert sorted(distiller.banks) == ["peer", "student"] and all(b.num_samples == 448 for b in distiller.banks.values())
    distiller.student.load_state_dict(best["model"])
    assert _accuracy(distiller.student, data.holdout_loader(128)) == pytest.approx(holdout[selected], abs=1e-9)
    assert _accuracy(distiller.student, data.val_loader(128)) == pytest.approx(test[selected], abs=1e-9)


def test_without_holdout_selection_is_on_the_test_split_as_in_the_literature(tmp_path):
    summary = train(compose_config("stage=teacher", "model=resnet8", "trainer.epochs=1", "trainer.max_batches_per_epoch=2"), tmp_path)
    (m,) = _metrics(tmp_path)
    assert "holdout/top1" not in m and "test_student/top1" not in m
    assert (m["val/top1"], m["val/top5"]) == (m["test/top1"], m["test/top5"])
    assert summary["selection_split"] == "test" and summary["num_holdout"] == 0
    assert summary["best_holdout_top1"] is None and summary["last_holdout_top1"] is None
    assert summary["best_top1"] == summary["best_test_top1"] == summary["test_top1_at_best"] == summary["last_test_top1"] == m["test/top1"]
