"""Optuna studies against real storages: journal files with several worker processes, a real
PostgreSQL server, kill -9 of a worker, reaping, resume, budget, pruning, and optuna-dashboard."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from ickd.config_store import compose_run_config
from ickd.sweep.spec import load_spec
from ickd.sweep.storage import StorageError, open_storage
from ickd.sweep.studies import StudyHandle
from ickd.sweep.worker import run_worker
from tests.helpers import REPO
from tests.services import free_port, postgres_bin, postgres_server

SMOKE = REPO / "sweeps" / "synthetic_smoke.yaml"


def ickd(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ickd.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def study_file(tmp_path: Path, teacher_dir: Path, **changes) -> Path:
    """The shipped smoke study with the test's teacher and any changes."""
    spec = yaml.safe_load(SMOKE.read_text())
    # Offline from the session's trained teacher: about half the cost of the file's online peers.
    spec["base"] = [*spec["base"], "paradigm=offline", f"teacher.checkpoint={teacher_dir}"]
    for key, value in changes.items():
        spec[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trials(handle: StudyHandle) -> list[optuna.trial.FrozenTrial]:
    return handle.study().get_trials(deepcopy=False)


def counted(handle: StudyHandle) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials(handle))


@pytest.mark.slow
def test_create_run_status_best_with_journal_storage_and_two_workers(tmp_path, teacher_dir):
    root = tmp_path / "studies"
    out = ickd("sweep", "--root", str(root), "create", str(study_file(tmp_path, teacher_dir)), "--name", "smoke", "--trials", "4").stdout
    assert "study 'smoke' created" in out and (root / "smoke" / "study.yaml").is_file()
    run = ickd("sweep", "--root", str(root), "run", "smoke", "--workers", "2").stdout
    handle = StudyHandle.load("smoke", root)
    assert counted(handle) == 4
    assert (root / "smoke" / "journal.log").is_file()
    for t in trials(handle):
        if t.state == TrialState.COMPLETE:
            run_dir = Path(t.user_attrs["run_dir"])
            assert run_dir == root / "smoke" / "trials" / f"{t.number:04d}"  # named by study + trial
            history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert t.value == max(m["val/top1"] for m in history)  # objective: best val/top1
            assert sorted(t.intermediate_values) == [m["epoch"] for m in history]
    hosts = {t.user_attrs["worker_pid"] for t in trials(handle)}
    assert len(hosts) == 2  # both workers ran trials
    assert "complete 4" in run and "| trial | state |" in run
    status = ickd("sweep", "--root", str(root), "status", "smoke").stdout
    assert "complete 4 of 4" in status and "best: trial" in status
    best = ickd("sweep", "--root", str(root), "best", "smoke").stdout
    command = best.split("reproduce:\n")[1].strip()
    assert command.startswith("ickd train ")
    # The printed command composes to the best trial's parameters.
    import shlex

    cfg = compose_run_config(shlex.split(command)[2:])
    best_trial = handle.study().best_trial
    for key, value in best_trial.params.items():
        assert compose_run_config.__module__ and __import__("omegaconf").OmegaConf.select(cfg, key) == value


@pytest.mark.slow
def test_budget_is_never_exceeded_with_four_concurrent_workers(tmp_path, teacher_dir):
    root = tmp_path / "studies"
    ickd("sweep", "--root", str(root), "create", str(study_file(tmp_path, teacher_dir)), "--name", "b", "--trials", "5")
    ickd("sweep", "--root", str(root), "run", "b", "--workers", "4")
    handle = StudyHandle.load("b", root)
    all_trials = trials(handle)
    ran = [t for t in all_trials if not t.user_attrs.get("skipped")]
    assert counted(handle) == 5 and len(ran) == 5
    # A worker that raced past the budget records a skipped trial and never trains it.
    for t in all_trials:
        if t.user_attrs.get("skipped"):
            assert t.state == TrialState.FAIL and "run_dir" not in t.user_attrs


needs_postgres = pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL server binaries missing (CI installs postgresql)")


@pytest.fixture(scope="module")
def pg_url():
    """A real PostgreSQL server on a private loopback port for this module's tests."""
    with postgres_server() as url:
        yield url


@pytest.mark.slow
@needs_postgres
def test_postgresql_storage_with_three_workers_and_heartbeats(tmp_path, teacher_dir, pg_url):
    root = tmp_path / "studies"
    url = pg_url
    ickd("sweep", "--root", str(root), "create", str(study_file(tmp_path, teacher_dir)), "--name", "pg", "--trials", "6", "--storage", url)
    saved = yaml.safe_load((root / "pg" / "study.yaml").read_text())
    assert saved["storage"] == url  # no password to hide: trust auth on loopback
    ickd("sweep", "--root", str(root), "run", "pg", "--workers", "3")
    handle = StudyHandle.load("pg", root)
    assert type(handle.storage).__name__ == "RDBStorage"
    assert counted(handle) == 6
    assert len({t.user_attrs["worker_pid"] for t in trials(handle)}) >= 2
    # Optuna's own RDB heartbeats were written by the workers (its trial_heartbeats table).
    assert handle.storage.get_heartbeat_interval() == int(handle.spec.heartbeat["interval_s"])
    import sqlalchemy

    with sqlalchemy.create_engine(url).connect() as conn:
        assert conn.execute(sqlalchemy.text("select count(*) from trial_heartbeats")).scalar() >= 6


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["journal", pytest.param("postgresql", marks=needs_postgres)])
def test_killed_worker_is_reaped_and_its_trial_retried_from_the_checkpoint(tmp_path, teacher_dir, storage, request):
    root = tmp_path / "studies"
    path = study_file(tmp_path, teacher_dir)
    name = f"k{storage}"  # study names are unique per PostgreSQL database
    extra = ["--storage", request.getfixturevalue("pg_url")] if storage == "postgresql" else []
    ickd("sweep", "--root", str(root), "create", str(path), "--name", name, "--trials", "1", "-o", "trainer.epochs=12", *extra)
    handle = StudyHandle.load(name, root)
    worker = subprocess.Popen([sys.executable, "-m", "ickd.sweep.worker", str(handle.dir)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = handle.trial_dir(0)

    def epochs_done() -> int:
        f = run_dir / "metrics.jsonl"
        return len(f.read_text().splitlines()) if f.is_file() else 0

    _wait_for(lambda: epochs_done() >= 2, 300, "two epochs of trial 0")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    done_before = epochs_done()
    assert done_before < 12
    (t0,) = trials(handle)
    assert t0.state == TrialState.RUNNING  # nobody has noticed yet that the worker died

    reaped = ickd("sweep", "--root", str(root), "reap", name).stdout
    assert "trial 0: worker process" in reaped and "retried as trial 1" in reaped
    t0, t1 = trials(handle)
    assert t0.state == TrialState.FAIL and "gone" in t0.user_attrs["fail_reason"]
    assert t1.state == TrialState.WAITING and t1.params == t0.params and t1.user_attrs["run_dir"] == str(run_dir)

    run_worker(str(handle.dir))  # the retry resumes from the checkpoint in the same folder
    t0, t1 = trials(handle)
    assert t1.state == TrialState.COMPLETE
    result = json.loads((run_dir / "result.json").read_text())
    # Killed after >= 2 epochs: the retry resumes from the newest checkpoint holding the memory bank
    # (the first one always does; then every trainer.bank_checkpoint_every = 5 epochs), not epoch 0.
    assert result["resumed_from_epoch"] >= 1 and result["epochs_completed"] == 12
    epochs = [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))  # nothing lost, nothing counted twice
    assert sorted(t1.intermediate_values) == list(range(1, 13))  # re-reported after the resume
    assert f"name={name}-t0000" in t1.user_attrs["overrides"]  # the retry keeps the run's name
    assert counted(handle) == 1  # the budget of 1 is respected


@pytest.mark.slow
def test_stopped_study_resumes_with_nothing_lost_or_duplicated(tmp_path, teacher_dir):
    root = tmp_path / "studies"
    ickd("sweep", "--root", str(root), "create", str(study_file(tmp_path, teacher_dir)), "--name", "s", "--trials", "2", "-o", "trainer.epochs=10")
    handle = StudyHandle.load("s", root)
    worker = subprocess.Popen([sys.executable, "-m", "ickd.sweep.worker", str(handle.dir)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (handle.trial_dir(0) / "metrics.jsonl").is_file(), 300, "the first epoch")
    worker.send_signal(signal.SIGTERM)  # what `ickd sweep run` sends on Ctrl-C, and SLURM on cancel
    assert worker.wait(timeout=120) == 0
    states = [t.state for t in trials(handle)]
    assert states[0] == TrialState.FAIL and TrialState.WAITING in states
    ickd("sweep", "--root", str(root), "run", "s", "--workers", "1")
    assert counted(handle) == 2
    epochs = [json.loads(x)["epoch"] for x in (handle.trial_dir(0) / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 11))


def test_failing_and_nan_trials_are_failed_with_their_reason_and_the_worker_goes_on(tmp_path, teacher_dir):
    path = study_file(
        tmp_path, teacher_dir,
        space={"memory.k": "choice(4, 600)", "optim.lr": "choice(0.1, 1e30)"},
        pruner={"name": "none"},
    )
    spec = load_spec(path, name="f", n_trials=1)
    handle = StudyHandle.create(spec, tmp_path / "studies")
    study = handle.study()
    for params in ({"memory.k": 600, "optim.lr": 0.1}, {"memory.k": 4, "optim.lr": 1e30}, {"memory.k": 4, "optim.lr": 0.1}):
        study.enqueue_trial(params)
    run_worker(str(handle.dir))
    by_params = {(t.params["memory.k"], t.params["optim.lr"]): t for t in trials(handle)}
    assert len(by_params) == 3  # the worker went on after each failure until the budget (1) was met
    assert by_params[(4, 0.1)].state == TrialState.COMPLETE
    assert by_params[(600, 0.1)].state == TrialState.FAIL and "memory.k" in by_params[(600, 0.1)].user_attrs["fail_reason"]
    assert by_params[(4, 1e30)].state == TrialState.FAIL and "non-finite" in by_params[(4, 1e30)].user_attrs["fail_reason"]


def test_a_study_whose_trials_keep_failing_stops(tmp_path, teacher_dir):
    path = study_file(tmp_path, teacher_dir, space={"memory.k": "choice(600, 700)"}, sampler={"name": "random", "seed": 0})
    handle = StudyHandle.create(load_spec(path, name="g", n_trials=2), tmp_path / "studies")
    run_worker(str(handle.dir))  # returns instead of trying failing points forever
    failed = trials(handle)
    assert len(failed) == 3 and all(t.state == TrialState.FAIL for t in failed)


def test_max_failures_setting_stops_the_study_sooner(tmp_path, teacher_dir):
    path = study_file(tmp_path, teacher_dir, space={"memory.k": "choice(600, 700)"}, sampler={"name": "random", "seed": 0},
                      retry={"max_retries": 0, "max_failures": 1})
    handle = StudyHandle.create(load_spec(path, name="mf", n_trials=5), tmp_path / "studies")
    run_worker(str(handle.dir))
    assert [t.state for t in trials(handle)] == [TrialState.FAIL]


def test_a_trial_worse_than_the_median_is_pruned(tmp_path, teacher_dir):
    path = study_file(
        tmp_path, teacher_dir,
        space={"optim.lr": "choice(0.1, 1e-6)"},
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
    )
    spec = load_spec(path, name="p", n_trials=2)
    handle = StudyHandle.create(spec, tmp_path / "studies")
    study = handle.study()
    study.enqueue_trial({"optim.lr": 0.1})
    study.enqueue_trial({"optim.lr": 1e-6})  # learns nothing: below the first trial's curve
    run_worker(str(handle.dir))
    good, bad = trials(handle)
    assert good.state == TrialState.COMPLETE
    assert bad.state == TrialState.PRUNED and len(bad.intermediate_values) == 1


def test_invalid_space_is_rejected_before_any_trial(tmp_path, teacher_dir):
    path = study_file(tmp_path, teacher_dir, space={"memory.kk": "choice(4, 8)"})
    proc = ickd("sweep", "--root", str(tmp_path / "studies"), "create", str(path), "--name", "bad", check=False)
    assert proc.returncode == 2 and "memory.kk" in proc.stderr and "memory.k" in proc.stderr
    assert not (tmp_path / "studies" / "bad").exists()


@pytest.mark.parametrize("url", ["postgresql+psycopg2://me:s3cret@127.0.0.1:5/db", "postgresql+psycopg2://me@127.0.0.1:5/db?password=s3cret"])
def test_storage_urls_with_passwords_are_refused_and_never_printed(tmp_path, url):
    from ickd.sweep.storage import redact

    assert "s3cret" not in redact(url)
    with pytest.raises(StorageError) as info:
        open_storage(url, tmp_path)
    assert "s3cret" not in str(info.value) and "PGPASSWORD" in str(info.value)


def test_unreachable_storage_is_a_clear_error(tmp_path):
    port = free_port()  # nothing listens there
    start = time.time()
    with pytest.raises(StorageError) as info:
        open_storage(f"postgresql+psycopg2://me@127.0.0.1:{port}/db", tmp_path)
    assert f"127.0.0.1:{port}" in str(info.value) and "reachable" in str(info.value)
    assert time.time() - start < 30


@pytest.mark.slow
def test_dashboard_serves_the_study_on_loopback(tmp_path, teacher_dir):
    root = tmp_path / "studies"
    ickd("sweep", "--root", str(root), "create", str(study_file(tmp_path, teacher_dir)), "--name", "dash", "--trials", "1")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ickd.cli", "sweep", "--root", str(root), "dashboard", "dash", "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        body = None
        deadline = time.time() + 60
        while time.time() < deadline and body is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read().decode()
            except OSError:
                time.sleep(0.5)
        assert body is not None and "dash" in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- distinct sampler seeds, no duplicate parameters ----------------------------------------------

def _cheap_study(tmp_path: Path, teacher_dir: Path, name: str, space: dict, n_trials: int, sampler: dict | None = None) -> StudyHandle:
    """A study whose trials train one batch: enough to run the whole ask/train/tell path."""
    path = study_file(tmp_path, teacher_dir, space=space, sampler=sampler or {"name": "tpe", "seed": 0, "n_startup_trials": 10})
    spec = yaml.safe_load(path.read_text())
    spec["base"] += ["distill=kd", "trainer.epochs=1", "trainer.max_batches_per_epoch=1"]
    path.write_text(yaml.safe_dump(spec))
    return StudyHandle.create(load_spec(path, name=name, n_trials=n_trials), tmp_path / "studies")


LR_SPACE = {"optim.lr": "interval(0.01, 0.2)"}


def test_two_workers_started_with_the_same_index_sample_different_params(tmp_path, teacher_dir):
    handle = _cheap_study(tmp_path, teacher_dir, "same_index", LR_SPACE, n_trials=10)
    cmd = [sys.executable, "-m", "ickd.sweep.worker", str(handle.dir), "--index", "0", "--max-trials", "2"]
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    done = trials(handle)
    assert len(done) == 4 and all(t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs for t in done)
    assert len({t.params["optim.lr"] for t in done}) == 4  # no replayed seed stream
    slots = {t.user_attrs["worker_pid"]: (t.user_attrs["worker_slot"], t.user_attrs["sampler_seed"]) for t in done}
    assert sorted(slots.values()) == [(0, 0), (1, 1)]  # one slot each; seed = sampler.seed + slot
    assert sorted(p.name for p in (handle.dir / "workers" / "claims").iterdir()) == ["0", "1"]
    assert sum("slot 0, sampler seed 0" in log for log in logs) == 1 and sum("slot 1, sampler seed 1" in log for log in logs) == 1


def test_a_fresh_single_worker_is_reproducible_and_a_restarted_one_samples_anew(tmp_path, teacher_dir):
    first = _cheap_study(tmp_path, teacher_dir, "r1", LR_SPACE, n_trials=10)
    second = _cheap_study(tmp_path, teacher_dir, "r2", LR_SPACE, n_trials=10)
    for handle in (first, second):
        run_worker(str(handle.dir), max_trials=2)
    a, b = trials(first), trials(second)
    assert [t.params for t in a] == [t.params for t in b]  # same seed, same slot 0: same params
    assert {(t.user_attrs["worker_slot"], t.user_attrs["sampler_seed"]) for t in a + b} == {(0, 0)}
    run_worker(str(first.dir), max_trials=1)  # the same worker started again on the same study
    again = trials(first)[-1]
    assert (again.user_attrs["worker_slot"], again.user_attrs["sampler_seed"]) == (1, 1)
    assert again.state == TrialState.COMPLETE and "duplicate_of" not in again.user_attrs
    assert again.params["optim.lr"] not in {t.params["optim.lr"] for t in a}


def test_identical_params_are_never_trained_twice_but_retries_are(tmp_path, teacher_dir):
    from ickd.sweep.reaper import enqueue_retry

    handle = _cheap_study(tmp_path, teacher_dir, "dup", {"optim.lr": [0.1]}, n_trials=10)  # one point: every trial equal
    study = handle.study()
    held = study.ask(fixed_distributions=handle.spec.space)  # trial 0: another worker is training it
    run_worker(str(handle.dir), max_trials=1)
    pruned = trials(handle)[1]
    assert pruned.state == TrialState.PRUNED and pruned.user_attrs["duplicate_of"] == 0
    assert not handle.trial_dir(1).exists()  # not trained
    # Trial 0's worker dies; its retry (same params on purpose) trains, and the next equal trial
    # takes the retry's value without training.
    study.tell(held, state=TrialState.FAIL)
    enqueue_retry(study, study.trials[0], "test")
    run_worker(str(handle.dir), max_trials=2)
    _, _, retry, copy = trials(handle)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == 0 and "duplicate_of" not in retry.user_attrs
    assert (handle.trial_dir(0) / "metrics.jsonl").is_file()
    assert copy.state == TrialState.COMPLETE and copy.user_attrs["duplicate_of"] == retry.number
    assert copy.value == retry.value and not copy.intermediate_values
    assert sorted(p.name for p in (handle.dir / "trials").iterdir()) == ["0000"]
    status = ickd("sweep", "--root", str(tmp_path / "studies"), "status", "dup").stdout
    assert f"duplicate of trial {retry.number}" in status
