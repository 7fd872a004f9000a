"""Issue 11, reliability: a torn journal is repaired (a real study, real trials), CLI values are
checked before study.yaml is written, a study stopped for failures exits 1, a given dataset.root
must exist (real `ickd train`), and files honour the user's umask (real runs and studies)."""
from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from ickd.engine.checkpoint import atomic_write_json, atomic_write_text, current_umask
from ickd.sweep.storage import JOURNAL_FILE, TORN_SUFFIX, JournalCorruptError, open_storage, repair_journal
from ickd.sweep.studies import StudyHandle
from tests.helpers import REPO

# A study whose trials are 1-epoch ResNet8 teachers on the synthetic data (no teacher checkpoint needed).
BASE = [
    "dataset=synthetic", "stage=teacher", "model=resnet8", "trainer.epochs=1", "trainer.batch_size=64",
    "trainer.eval_batch_size=128", "trainer.device=cpu", "trainer.progress=off", "dataset.holdout=64",
]


def ickd(*args: str, cwd: Path = REPO, umask: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "ickd.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env, preexec_fn=preexec)


def write_spec(tmp_path: Path, name: str, space: dict, n_trials: int = 1, **extra) -> Path:
    spec = {
        "name": name, "base": BASE, "objective": {"metric": "holdout/top1", "mode": "best", "direction": "maximize"},
        "space": space, "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"}, "n_trials": n_trials, **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def create(tmp_path: Path, name: str, space: dict, **extra) -> Path:
    root = tmp_path / "studies"
    proc = ickd("sweep", "--root", str(root), "create", str(write_spec(tmp_path, name, space, **extra)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


# --- journal repair ---------------------------------------------------------------------------

def _trivial_study(folder: Path, n: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=open_storage(None, folder), load_if_exists=True)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)
    return study


def _repair(path: str, queue) -> None:
    queue.put(repair_journal(path))


def test_torn_tail_is_cut_once_under_the_journal_lock_even_with_two_processes(tmp_path):
    _trivial_study(tmp_path, 2)
    journal = tmp_path / JOURNAL_FILE
    good = journal.read_bytes()
    torn = b'{"op_code":5,"worker_id":"half-a-line'
    journal.write_bytes(good + torn)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_repair, args=(str(journal), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    cut = sorted(queue.get(timeout=5) for _ in procs)
    assert cut == [0, len(torn)]  # exactly one of the two repaired
    assert journal.read_bytes() == good
    assert (tmp_path / (JOURNAL_FILE + TORN_SUFFIX)).read_bytes() == torn + b"\n"
    assert not Path(str(journal) + ".lock").exists()  # Optuna's lock file was released
    study = _trivial_study(tmp_path, 1)  # appends go on, and every trial is readable
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3


def test_an_append_after_a_torn_line_is_salvaged_and_torn_bytes_accumulate(tmp_path):
    """The state an older ickd left: a torn line with the next operation appended to it."""
    _trivial_study(tmp_path, 1)
    journal = tmp_path / JOURNAL_FILE
    with open(journal, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"w')  # torn create-trial
    repair_journal(journal)
    with open(journal, "ab") as f:
        f.write(b'{"op_code":5,"wor')  # torn again ...
    lines = journal.read_bytes()
    with open(journal, "ab") as f:  # ... and a later process appended a complete operation after it
        f.write(lines.splitlines(keepends=True)[1] * 2)  # copies of the first create-trial operation
    with pytest.raises(json.JSONDecodeError):
        list(optuna.storages.journal.JournalFileBackend(str(journal)).read_logs(0))  # unreadable as it is
    study = _trivial_study(tmp_path, 0)
    assert len(study.trials) == 3  # the complete operation appended to the torn one was kept
    assert (tmp_path / (JOURNAL_FILE + TORN_SUFFIX)).read_bytes() == b'{"op_code":4,"worker_id":"w\n{"op_code":5,"wor\n'


def test_a_bad_line_in_the_middle_is_an_error_with_repair_instructions(tmp_path):
    _trivial_study(tmp_path, 2)
    journal = tmp_path / JOURNAL_FILE
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([*lines[:2], b"not json at all\n", *lines[2:]]))
    with pytest.raises(JournalCorruptError) as info:
        open_storage(None, tmp_path)
    message = str(info.value)
    assert f"line 3 of {len(lines) + 1}" in message and f"sed -i '3d' {journal}" in message and ".bak" in message
    assert TORN_SUFFIX in message


@pytest.mark.slow
def test_a_real_torn_journal_is_repaired_and_every_command_explains_a_corrupt_one(tmp_path):
    root = create(tmp_path, "torn", {"optim.lr": "choice(0.05, 0.1)"})
    first = ickd("sweep", "--root", str(root), "run", "torn")
    assert first.returncode == 0, first.stdout + first.stderr
    journal = root / "torn" / JOURNAL_FILE
    torn = b'{"op_code":6,"worker_id":"ab12","trial_id":0,"user_attr":{"heartbeat_at":1'  # a full disk's half line
    with open(journal, "ab") as f:
        f.write(torn)
    again = ickd("sweep", "--root", str(root), "run", "torn", "--trials", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "repaired the study journal" in again.stderr and str(journal) + TORN_SUFFIX in again.stderr
    assert (root / "torn" / (JOURNAL_FILE + TORN_SUFFIX)).read_bytes() == torn + b"\n"
    study = StudyHandle.load("torn", root).study()
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]  # trial 0 kept
    # A bad line in the middle: exit 2 with instructions, never a traceback, for every command.
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([lines[0], b"\x00\x00garbage\n", *lines[1:]]))
    for command in (["sweep", "--root", str(root), "status", "torn"], ["sweep", "--root", str(root), "best", "torn"],
                    ["sweep", "--root", str(root), "run", "torn"], ["report", "torn", "--root", str(root)],
                    ["compare", "torn", "--root", str(root)]):
        proc = ickd(*command)
        assert proc.returncode == 2, (command, proc.stdout + proc.stderr)
        assert "line 2 of" in proc.stderr and f"sed -i '2d' {journal}" in proc.stderr, (command, proc.stderr)
        assert "Traceback" not in proc.stderr and "JSONDecodeError" not in proc.stderr, (command, proc.stderr)


# --- `sweep run` values, failures -------------------------------------------------------------

def test_bad_run_values_are_refused_before_study_yaml_is_written(tmp_path):
    root = create(tmp_path, "vals", {"optim.lr": "choice(0.05, 0.1)"})
    spec_file = root / "vals" / "study.yaml"
    before = spec_file.read_bytes()
    for args, option in ((["--trials", "0"], "--trials"), (["--trials", "-3"], "--trials"), (["--workers", "0"], "--workers"),
                         (["--workers", "-1", "--trials", "5"], "--workers"), (["--stop-timeout", "-1"], "--stop-timeout")):
        proc = ickd("sweep", "--root", str(root), "run", "vals", *args)
        assert proc.returncode == 2, (args, proc.stdout + proc.stderr)
        assert f"{option} must be >= " in proc.stderr and "Traceback" not in proc.stderr
        assert spec_file.read_bytes() == before  # nothing written
    assert not (root / "vals" / "trials").exists() and not (root / "vals" / "workers").exists()
    status = ickd("sweep", "--root", str(root), "status", "vals")
    assert status.returncode == 0 and "of 1" in status.stdout  # the study is still usable


@pytest.mark.slow
def test_a_study_stopped_for_failures_exits_1_naming_the_first_failure(tmp_path):
    # lr=1e30 makes the loss non-finite in the first epoch: every trial fails by itself.
    root = create(tmp_path, "fails", {"optim.lr": "choice(1e30, 1e31)"}, retry={"max_retries": 0, "max_failures": 2})
    proc = ickd("sweep", "--root", str(root), "run", "fails", "--trials", "3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "study fails stopped: 2 trial(s) failed by themselves" in proc.stderr
    assert "First failure: trial 0: non-finite loss" in proc.stderr
    assert str(root / "fails" / "trials" / "0000") in proc.stderr and str(root / "fails" / "workers") in proc.stderr
    log = (root / "fails" / "workers" / "worker-0.log").read_text()
    assert "study fails stopped" in log  # the worker itself (e.g. a SLURM job) exits 1 too and says why
    study = StudyHandle.load("fails", root).study()
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]


# --- dataset.root -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar100", "imagenet"])
def test_a_given_dataset_root_that_does_not_exist_is_an_error(tmp_path, dataset):
    missing = tmp_path / "no" / "such" / "folder"
    out = tmp_path / "run"
    proc = ickd("train", f"dataset={dataset}", f"dataset.root={missing}", "model=resnet8", "stage=teacher",
                "trainer.epochs=1", "trainer.device=cpu", "trainer.progress=off", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = proc.stdout + proc.stderr  # `ickd train` logs through Hydra's job logging (stdout)
    assert f"dataset.root={missing} does not exist" in said and "dataset.root=null" in said
    assert "Traceback" not in said


@pytest.mark.slow
def test_a_given_fashion_mnist_root_without_the_files_never_falls_back(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = ickd("train", "dataset=fashion_mnist", f"dataset.root={empty}", "model=resnet8", "stage=teacher",
                "trainer.epochs=1", "trainer.device=cpu", "trainer.progress=off", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # /usr/share/datasets/fashion-mnist has the files
    assert f"dataset.root={empty} is set, so only it was searched" in proc.stdout + proc.stderr


# --- permissions ------------------------------------------------------------------------------

def test_atomic_writes_get_the_mode_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(mask)
            assert current_umask() == mask
            atomic_write_text(tmp_path / f"{mask:o}" / "a.txt", "x")
            atomic_write_json(tmp_path / f"{mask:o}" / "b.json", {})
            assert stat.S_IMODE(os.stat(tmp_path / f"{mask:o}" / "a.txt").st_mode) == mode
            assert stat.S_IMODE(os.stat(tmp_path / f"{mask:o}" / "b.json").st_mode) == mode
            assert stat.S_IMODE(os.stat(tmp_path / f"{mask:o}").st_mode) == 0o777 & ~mask
    finally:
        os.umask(old)


@pytest.mark.slow
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_runs_and_studies_honour_the_umask(tmp_path, mask, mode):
    out = tmp_path / "run"
    proc = ickd("train", *BASE, "trainer.max_batches_per_epoch=2", f"hydra.run.dir={out}", cwd=tmp_path, umask=mask)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = [out / "result.json", out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt", out / "metrics.jsonl"]
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, path
    for folder in (out, out / "checkpoints"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~mask, folder
    root = tmp_path / "studies"
    proc = ickd("sweep", "--root", str(root), "create", str(write_spec(tmp_path, "perm", {"optim.lr": "choice(0.05, 0.1)"})), umask=mask)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in (root / "perm" / "study.yaml", root / "perm" / JOURNAL_FILE):
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, path
    assert stat.S_IMODE(os.stat(root / "perm").st_mode) == 0o777 & ~mask


def test_a_read_only_journal_of_someone_else_is_checked_not_repaired(tmp_path, monkeypatch):
    """A labmate reading your study (no write permission there): no lock file, no repair, no error.
    os.access is made to say "not writable" because these tests run as root, who may write anywhere."""
    _trivial_study(tmp_path, 1)
    journal = tmp_path / JOURNAL_FILE
    with open(journal, "ab") as f:
        f.write(b'{"op_code":5')
    before = journal.read_bytes()
    import ickd.sweep.storage as storage

    monkeypatch.setattr(storage.os, "access", lambda path, mode: False)
    assert repair_journal(journal) == 0
    assert len(optuna.load_study(study_name="s", storage=open_storage(None, tmp_path)).trials) == 1
    assert journal.read_bytes() == before and not (tmp_path / (JOURNAL_FILE + TORN_SUFFIX)).exists()
    monkeypatch.undo()
    assert repair_journal(journal) == len(b'{"op_code":5')  # its owner repairs it


@pytest.mark.slow
def test_a_launched_single_worker_job_fails_when_its_study_stopped_for_failures(tmp_path):
    # The job body of `ickd launch sweep` with one worker per job runs the worker in-process (no exit
    # code of its own): it must raise, so submitit/SLURM mark the job failed instead of done.
    root = create(tmp_path, "fails", {"optim.lr": "choice(1e30, 1e31)"}, retry={"max_retries": 0, "max_failures": 2})
    code = (
        "import sys\n"
        "from ickd.launch.tasks import SweepTask, WorkerSpec\n"
        "from ickd.errors import TrialsFailedError\n"
        f"task = SweepTask([WorkerSpec(0, {str(root / 'fails')!r}, {str(tmp_path / 'w0.json')!r})])\n"
        "try:\n"
        "    task()\n"
        "except TrialsFailedError as exc:\n"
        "    print('RAISED', exc)\n"
        "    sys.exit(7)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert "study fails stopped: 2 trial(s) failed by themselves" in proc.stdout
