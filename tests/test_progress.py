"""Progress off a terminal: log lines at trainer.progress_interval_s with images/s and the run's ETA,
the run folder's progress.json, the same lines in a launched job's log, and the ETA columns of
`ickd jobs status` and `ickd sweep status`."""
from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ickd.engine import train
from ickd.engine.callbacks import Callback
from ickd.engine.checkpoint import atomic_write_json
from ickd.engine.progress import ProgressTracker, combined_eta, eta_now, format_duration
from ickd.sweep.progress import study_eta_of
from tests.helpers import REPO, compose_config, run_ickd, wait_for

PROGRESS_LINE = re.compile(r"\]\[ickd\.engine\.trainer\]\[INFO\] - epoch (\d+)/(\d+) batch (\d+)/(\d+) \(\d+%\) (\d+) img/s elapsed \S+ eta (\S+)")
EPOCH_LINE = re.compile(r"\]\[ickd\.engine\.trainer\]\[INFO\] - epoch (\d+)/(\d+) loss [\d.]+ test top1 [\d.]+ .* eta \S+")
KEYS = {"status", "epoch", "epochs", "batch", "batches", "images_per_s", "elapsed_s", "eta_s", "updated_at", "updated_unix"}


def seconds(text: str) -> int:
    """Inverse of format_duration for what it prints."""
    total = 0
    for number, unit in re.findall(r"(\d+)([dhms])", text):
        total += int(number) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[unit]
    return total


# --- the ETA rule, on a clock the test drives -------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_run_eta_counts_remaining_batches_epochs_and_evaluations(monkeypatch, tmp_path):
    clock = Clock()
    monkeypatch.setattr("ickd.engine.progress.time.monotonic", clock)
    lines: list[str] = []

    class Log:
        def info(self, fmt, *args):
            lines.append(fmt % args)

        warning = info

    tracker = ProgressTracker(tmp_path / "progress.json", epochs=3, eval_every=1, interval_s=5.0, log_lines=True, logger=Log(), eval_images=300)
    tracker.start(0, 10)
    tracker.epoch_started(0, 10)
    for b in range(1, 11):  # 1 s and 100 images a batch
        clock.t += 1
        tracker.batch_done(b, 100)
    # Ticks every 5 s: after batches 5 and 10 (no host sync: only the clock is read).
    assert [m.group(3) for m in map(PROGRESS_LINE.search, ("][ickd.engine.trainer][INFO] - " + x for x in lines)) if m] == ["5", "10"]
    # Before any evaluation: 20 batches (20 s) + 3 evaluations of 300 images at a third of 100 images/s (1 s each).
    assert tracker.eta() == pytest.approx(20 + 3 * 1.0)
    tracker.epoch_trained()
    tracker.phase("evaluating")
    clock.t += 2  # the evaluation takes 2 s: the measured time replaces the estimate
    tracker.eval_done()
    assert tracker.epoch_end(1) == pytest.approx(2 * 10 + 2 * 2.0)
    snap = json.loads((tmp_path / "progress.json").read_text())
    assert set(snap) == KEYS
    assert (snap["status"], snap["epoch"], snap["batch"], snap["batches"], snap["images_per_s"]) == ("training", 1, 10, 10, 100.0)
    assert snap["eta_s"] == pytest.approx(24.0) and snap["elapsed_s"] == pytest.approx(12.0)
    tracker.epoch_started(1, 10)
    for b in range(1, 6):
        clock.t += 1
        tracker.batch_done(b, 100)
    assert tracker.eta() == pytest.approx(5 + 10 + 2 * 2.0)
    snap = json.loads((tmp_path / "progress.json").read_text())
    assert (snap["status"], snap["epoch"], snap["batch"]) == ("training", 2, 5)  # the epoch in flight, 1-based
    tracker.finish("interrupted")
    assert json.loads((tmp_path / "progress.json").read_text())["eta_s"] is None


def test_eta_every_other_epoch_evaluation_and_no_ticks_when_disabled(monkeypatch, tmp_path):
    clock = Clock()
    monkeypatch.setattr("ickd.engine.progress.time.monotonic", clock)
    tracker = ProgressTracker(tmp_path / "p.json", epochs=4, eval_every=2, interval_s=0, log_lines=True, logger=None, eval_images=0)
    tracker.start(0, 4)
    tracker.epoch_started(0, 4)
    for b in range(1, 5):
        clock.t += 0.5
        tracker.batch_done(b, 10)
    assert not (tmp_path / "p.json").read_text().count('"training"')  # interval 0: no in-epoch ticks
    # 3 epochs x 4 batches at 2 batches/s; evaluations after epochs 2 and 4, estimated at 0 s.
    tracker.epoch_trained()
    assert tracker.epoch_end(1) == pytest.approx(6.0)


def test_combined_eta_rule():
    assert combined_eta([], 0, None) == 0.0
    assert combined_eta([100.0], 0, None) == 100.0
    # Remaining work shared among the busy slots, never less than the longest running one.
    assert combined_eta([100.0, 20.0], 4, 50.0) == pytest.approx((120 + 200) / 2)
    assert combined_eta([500.0, 20.0], 1, 50.0) == 500.0
    assert combined_eta([None, 20.0], 0, 50.0) == 50.0  # no progress.json yet: the mean duration
    assert combined_eta([None], 0, None) is None
    assert combined_eta([], 3, 50.0) is None  # queued but nothing runs
    assert combined_eta([10.0], 3, None) is None  # nothing finished to time the queued ones


def test_eta_now_ages_the_written_eta_and_reads_only_live_runs():
    written = {"status": "training", "eta_s": 100.0, "updated_unix": 1000.0}
    assert eta_now(written, now=1030.0) == pytest.approx(70.0)
    assert eta_now(written, now=2000.0) == 0.0
    assert eta_now({**written, "status": "completed"}) == 0.0
    assert eta_now({**written, "status": "failed"}) is None
    assert eta_now(None) is None
    assert [format_duration(s) for s in (None, 5, 95, 7300, 200000)] == ["-", "5s", "1m35s", "2h01m", "2d07h"]


def test_bad_progress_settings_are_config_errors():
    from ickd.engine.trainer import TrainerConfig
    from ickd.errors import ConfigError

    from ickd.engine.run import to_container
    from tests.helpers import compose_config

    base = {**to_container(compose_config())["trainer"], "epochs": 1, "batch_size": 8}
    with pytest.raises(ConfigError, match="trainer.progress_interval_s"):
        TrainerConfig.from_mapping({**base, "progress_interval_s": -1})
    with pytest.raises(ConfigError, match="trainer.progress="):
        TrainerConfig.from_mapping({**base, "progress": "sometimes"})
    assert TrainerConfig.from_mapping({**base, "progress": True}).progress == "on"  # YAML 1.1's bare `on`


# --- a real run ------------------------------------------------------------------------------------

class ProgressReader(Callback):
    """Reads progress.json at every epoch end (what `ickd jobs status` sees mid-run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[dict] = []

    def on_epoch_end(self, epoch, metrics):
        self.seen.append(json.loads(self.path.read_text()))


@pytest.mark.slow
def test_progress_json_is_written_atomically_during_and_after_a_run(tmp_path):
    out = tmp_path / "run"
    reader = ProgressReader(out / "progress.json")
    torn: list[str] = []
    reads = [0]
    stop = threading.Event()

    def poll():  # a reader racing the writer never sees a partial file
        while not stop.is_set():
            try:
                text = (out / "progress.json").read_text()
            except FileNotFoundError:
                continue
            try:
                assert set(json.loads(text)) == KEYS
                reads[0] += 1
            except (ValueError, AssertionError):
                torn.append(text)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        summary = train(compose_config("trainer.progress_interval_s=0.001", "trainer.epochs=2", "distill=ce"), out, callbacks=[reader])
    finally:
        stop.set()
        thread.join()
    assert summary["status"] == "completed"
    assert not torn and reads[0] > 0
    assert not list(out.glob(".progress.json.*"))  # no temporary file left behind
    [mid, _] = reader.seen
    assert mid["status"] in ("training", "evaluating") and mid["epoch"] == 1 and mid["epochs"] == 2
    assert mid["batches"] == 16 and mid["eta_s"] > 0 and mid["images_per_s"] > 0
    final = json.loads((out / "progress.json").read_text())
    assert (final["status"], final["epoch"], final["batch"], final["eta_s"]) == ("completed", 2, 16, 0.0)


TRAIN = ["dataset=synthetic", "stage=teacher", "model=resnet8", "trainer.device=cpu", "trainer.batch_size=32", "trainer.epochs=2"]


@pytest.mark.slow
def test_ickd_train_off_a_terminal_logs_progress_lines_at_the_interval(tmp_path):
    # stdout/stderr are pipes here (not a TTY), as in every SLURM job: trainer.progress=auto logs lines.
    proc = run_ickd("train", *TRAIN, "trainer.progress_interval_s=0.02", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    lines = [m for m in map(PROGRESS_LINE.search, proc.stdout.splitlines()) if m]
    assert len(lines) >= 2, proc.stdout + proc.stderr
    assert {m.group(1) for m in lines} == {"1", "2"} and all(m.group(2) == "2" and m.group(4) == "16" for m in lines)
    assert all(int(m.group(5)) > 0 for m in lines)
    assert len([x for x in proc.stdout.splitlines() if EPOCH_LINE.search(x)]) == 2
    assert "it/s" not in proc.stderr  # no tqdm bar off a terminal
    # The same lines are in the run's log file (Hydra's job logging).
    assert PROGRESS_LINE.search((tmp_path / "a" / "teacher.log").read_text())
    # trainer.progress=off: neither bar nor lines; progress.json is still written.
    proc = run_ickd("train", *TRAIN, "trainer.progress=off", "trainer.progress_interval_s=0.02", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert not PROGRESS_LINE.search(proc.stdout) and EPOCH_LINE.search(proc.stdout)
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["status"] == "completed"


# --- a real launch through submitit's local executor -----------------------------------------------

@pytest.mark.slow
def test_local_launch_log_has_epoch_and_progress_lines_and_status_shows_etas(tmp_path):
    from ickd.launch.jobs import rows
    from ickd.launch.manifest import Launch

    out = run_ickd("launch", "train", *TRAIN, "trainer.epochs=6", "trainer.progress_interval_s=0.2", "--profile", "local", "--name", "prog", cwd=tmp_path).stdout
    assert "launch prog" in out
    launch = Launch.load("prog", tmp_path / "launches")
    [entry] = launch.jobs
    run_dir = Path(entry["out_dir"])

    def running_with_eta():
        [row] = rows(Launch.load("prog", tmp_path / "launches"))
        return row if row["state"] == "RUNNING" and isinstance(row["eta"], float) and row["eta"] > 0 else None

    row = wait_for(running_with_eta, 240, "the running job's ETA from its progress.json", every=0.2)
    assert row["progress"]["epochs"] == 6
    wait_for((run_dir / "result.json").is_file, 300, "the local job's result")
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    logs = run_ickd("jobs", "logs", str(entry["job_id"]), "--tail", "0", cwd=tmp_path).stdout
    assert [m.group(1) for m in map(EPOCH_LINE.search, logs.splitlines()) if m] == [str(e) for e in range(1, 7)], logs
    assert PROGRESS_LINE.search(logs), logs
    assert "][submitit][" not in logs  # submitit's own lines once, not again through the run's handlers
    assert (run_dir / "teacher.log").is_file() and EPOCH_LINE.search((run_dir / "teacher.log").read_text())

    def completed_status():
        out = run_ickd("jobs", "status", "prog", cwd=tmp_path).stdout
        return out if "COMPLETED" in out else None

    status = wait_for(completed_status, 120, "`ickd jobs status prog` to show COMPLETED", every=2)
    header = next(x for x in status.splitlines() if x.startswith("JOB"))
    assert "ETA" in header.split()
    row_line = next(x for x in status.splitlines() if "prog-r000" in x)
    assert row_line.split()[header.split().index("ETA")] == "done"
    assert "eta: done (every run completed)" in status


# --- studies ---------------------------------------------------------------------------------------

def frozen(number: int, state: TrialState, duration_s: float | None = None, **attrs) -> optuna.trial.FrozenTrial:
    start = dt.datetime(2026, 1, 1, 12, 0, 0)
    return optuna.trial.FrozenTrial(
        number=number, state=state, value=1.0 if state == TrialState.COMPLETE else None, values=None,
        datetime_start=start, datetime_complete=start + dt.timedelta(seconds=duration_s) if duration_s is not None else None,
        params={}, distributions={}, user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=number,
    )


def live_progress(folder: Path, eta_s: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "progress.json", {
        "status": "training", "epoch": 3, "epochs": 10, "batch": 5, "batches": 16, "images_per_s": 500.0,
        "elapsed_s": 60.0, "eta_s": eta_s, "updated_at": "", "updated_unix": time.time(),
    })
    return folder


def test_study_eta_from_running_trials_and_mean_finished_duration(tmp_path):
    run = live_progress(tmp_path / "t2", 600.0)
    trials = [
        frozen(0, TrialState.COMPLETE, 100), frozen(1, TrialState.PRUNED, 200),
        frozen(2, TrialState.RUNNING, run_dir=str(run)), frozen(3, TrialState.FAIL, 5),
        frozen(4, TrialState.COMPLETE, 0, duplicate_of=0),  # not trained: not a duration
        frozen(5, TrialState.FAIL, skipped=True),
    ]
    eta, how = study_eta_of(trials, n_trials=6)
    # 6 - 3 finished - 1 running = 2 to start at the mean 150 s, plus the running one's ~600 s, on 1 worker.
    assert eta == pytest.approx(600 + 2 * 150, abs=5)
    assert "1 running, 2 to start" in how
    eta, how = study_eta_of(trials[:2], n_trials=6)
    assert eta is None and "no worker running" in how
    assert study_eta_of(trials[:2], n_trials=2)[0] == 0.0


@pytest.mark.slow
def test_sweep_status_prints_trial_and_study_etas(tmp_path):
    root = tmp_path / "studies"
    run_ickd("sweep", "--root", str(root), "create", str(REPO / "sweeps" / "synthetic_smoke.yaml"), "--name", "eta", "--trials", "5", cwd=tmp_path)
    from ickd.sweep.studies import StudyHandle

    handle = StudyHandle.load("eta", root)
    study = handle.study()
    for number, duration in ((0, 100), (1, 300)):
        study.add_trial(frozen(number, TrialState.COMPLETE, duration))
    running = study.ask()
    running.set_user_attr("run_dir", str(live_progress(tmp_path / "live", 900.0)))
    out = run_ickd("sweep", "--root", str(root), "status", "eta", cwd=tmp_path).stdout
    [line] = [x for x in out.splitlines() if x.startswith("eta: ")]
    # 5 - 2 finished - 1 running = 2 to start at the mean 200 s + the running trial's ~900 s, 1 worker.
    assert abs(seconds(line.split()[1]) - (900 + 2 * 200)) <= 30, out
    assert "1 running, 2 to start" in line
    header = next(x for x in out.splitlines() if x.startswith("| trial |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert "eta" in cols
    rows = [[c.strip() for c in x.strip("|").split("|")] for x in out.splitlines() if re.match(r"\| \d+ \|", x)]
    cells = {int(r[0]): r for r in rows}
    assert cells[0][cols.index("eta")] == "done"
    assert 800 <= seconds(cells[2][cols.index("eta")]) <= 900
