"""W&B tracking with real offline W&B runs (no W&B server can exist here, and there is no network):
runs log with WANDB_MODE=offline into their run folders, and the tests read the run files back
(``ickd.track.records``) to check what was logged. Uploading is tested with a stub ``wandb``
executable first on PATH, since a real upload needs the server."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ickd.engine import Callback, train
from ickd.errors import ConfigError
from ickd.track import loggers_for
from ickd.track.records import read_run, run_file
from ickd.track.sync import find_offline_runs
from ickd.track.wandb_logger import (
    LAST_EPOCH_FILE, RUN_ID_FILE, WandbLogger, flatten, redact, redact_argv, redact_value, resolve_mode,
)
from tests.helpers import FAST, REPO, StopAfter, compose_config, run_ickd, wait_for

PLANTED_KEY = "planted-fake-key-123"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline W&B with a planted API key in the environment (which must never reach a run file)."""
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key is set, so mode auto alone would pick online
    monkeypatch.setenv("WANDB_API_KEY", PLANTED_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def offline_runs(run_dir: Path) -> list[dict]:
    """Every offline run under ``run_dir``, once each file holds its exit record (wandb-core may
    flush a finished run's file a moment after ``run.finish()`` returns)."""
    def complete():
        files = [run_file(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]
        if None in files:
            return None
        runs = [read_run(f) for f in files]
        return runs if all(r["exit_code"] is not None for r in runs) else None

    return wait_for(complete, timeout=60, what=f"the offline W&B runs under {run_dir} to be flushed", every=0.2)


def epochs_logged(runs: list[dict]) -> list[int]:
    return sorted(row["epoch"] for run in runs for row in run["history"])


# --- redaction, flattening, modes -------------------------------------------------------------

def test_redact_hides_secret_keys_and_url_passwords_and_keeps_the_rest():
    config = {
        "logger": {"api_key": "k1", "project": "ickd"},
        "WANDB_API_KEY": "k2", "apikey": "k3", "db": {"password": "k4", "passwd": "k5", "user": "me"},
        "client_secret": "k6", "hf_token": "k7", "empty_token": None,
        "storage": "postgresql+psycopg2://me:k8@db.example:5432/optuna",
        "query": "postgresql://me@h/db?sslmode=require&password=k9",
        "urls": ["https://u:k10@example.org/x", "https://example.org/plain"],
        "memory": {"k": 4, "size": None}, "lr": 0.1,
    }
    out = redact(config)
    text = json.dumps(out)
    for i in range(1, 11):
        assert f'"k{i}"' not in text and f":k{i}@" not in text and f"=k{i}" not in text, (i, text)
    assert out["logger"] == {"api_key": "***", "project": "ickd"}
    assert out["db"]["user"] == "me" and out["empty_token"] is None
    assert out["storage"] == "postgresql+psycopg2://me:***@db.example:5432/optuna"
    assert out["query"] == "postgresql://me@h/db?sslmode=require&password=***"
    assert out["urls"] == ["https://u:***@example.org/x", "https://example.org/plain"]
    assert out["memory"] == {"k": 4, "size": None} and out["lr"] == 0.1
    assert config["db"]["password"] == "k4"  # a copy: the run's own config is untouched
    assert redact_value("postgresql://me@host/db") == "postgresql://me@host/db"  # no password, unchanged


def test_redact_argv_hides_secret_overrides():
    argv = ["ickd", "+db.password=k1", "logger.api_key=k2", "memory.k=4", "+url=postgresql://u:k3@h/db"]
    assert redact_argv(argv) == ["ickd", "+db.password=***", "logger.api_key=***", "memory.k=4", "+url=postgresql://u:***@h/db"]


def test_flatten_makes_dotted_keys():
    assert flatten({"memory": {"k": 4, "kwargs": {}}, "tags": [1, 2], "a": {"b": {"c": None}}}) == {
        "memory.k": 4, "memory.kwargs": {}, "tags": [1, 2], "a.b.c": None,
    }


def _netrc(tmp_path: Path, host: str) -> Path:
    path = tmp_path / "netrc"
    path.write_text(f"machine {host}\n  login user\n  password {'x' * 40}\n")
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return path


@pytest.mark.parametrize("env, mode, expected", [
    ({}, "auto", "offline"),
    ({"WANDB_API_KEY": "k"}, "auto", "online"),
    ({"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, "auto", "offline"),  # env WANDB_MODE wins
    ({"WANDB_MODE": "disabled"}, "online", "disabled"),
    ({"WANDB_MODE": "dryrun"}, "online", "offline"),
    ({}, "online", "online"), ({}, "offline", "offline"), ({}, "disabled", "disabled"),
    ({"WANDB_API_KEY": "k"}, "offline", "offline"),
    ({"NETRC": "{netrc:api.wandb.ai}"}, "auto", "online"),
    ({"NETRC": "{netrc:other.host}"}, "auto", "offline"),
    ({"NETRC": "{netrc:wandb.mylab.org}", "WANDB_BASE_URL": "https://wandb.mylab.org"}, "auto", "online"),
    ({"NETRC": "/nonexistent/netrc"}, "auto", "offline"),
])
def test_mode_selection(tmp_path, env, mode, expected):
    env = {"HOME": str(tmp_path), **env}
    if env.get("NETRC", "").startswith("{netrc:"):
        env["NETRC"] = str(_netrc(tmp_path, env["NETRC"][7:-1]))
    assert resolve_mode(mode, env) == expected


def test_bad_modes_are_clear_errors():
    with pytest.raises(ConfigError, match="logger.mode='sometimes'"):
        resolve_mode("sometimes", {})
    with pytest.raises(ConfigError, match="WANDB_MODE='loud'"):
        resolve_mode("auto", {"WANDB_MODE": "loud"})


# --- config group and loggers_for -------------------------------------------------------------

def test_loggers_for_reads_the_logger_group():
    assert loggers_for(compose_config(), "/tmp/x") == []  # the default: logger=none
    assert compose_config().logger == {"name": "none"}
    (logger,) = loggers_for(compose_config("logger=wandb", "logger.entity=mylab", "logger.tags=[a,b]", "logger.group=g0"), "/tmp/x")
    assert isinstance(logger, WandbLogger)
    assert (logger.project, logger.entity, logger.group, logger.tags, logger.mode) == ("ickd", "mylab", "g0", ["a", "b"], "auto")
    (logger,) = loggers_for(compose_config("logger=wandb"), "/tmp/x", run_id="s-t0001-abcd", group="study", job_type="trial")
    assert (logger.explicit_id, logger.group, logger.job_type) == ("s-t0001-abcd", "study", "trial")
    with pytest.raises(ConfigError, match="not valid"):
        loggers_for(compose_config("logger=wandb"), "/tmp/x", run_id="bad id/with slash")
    with pytest.raises(ConfigError, match="unknown logger keys"):
        loggers_for(compose_config("logger=wandb", "+logger.projct=x"), "/tmp/x")


@pytest.mark.slow
def test_logger_none_adds_no_callback_and_never_imports_wandb(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from tests.helpers import compose_config
        from ickd.engine import train
        from ickd.track import loggers_for
        cfg = compose_config("stage=teacher", "model=resnet8", "trainer.epochs=1", "trainer.max_batches_per_epoch=2")
        callbacks = loggers_for(cfg, {str(tmp_path)!r})
        assert callbacks == [], callbacks
        assert train(cfg, {str(tmp_path)!r}, callbacks=callbacks)["status"] == "completed"
        print("WANDB_IMPORTED", any(m == "wandb" or m.startswith("wandb.") for m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WANDB_IMPORTED False" in proc.stdout
    assert not (tmp_path / "wandb").exists() and not (tmp_path / RUN_ID_FILE).exists()


# --- real runs --------------------------------------------------------------------------------

@pytest.mark.slow
def test_ickd_train_logs_metrics_config_and_summary_offline_without_secrets(tmp_path, teacher_dir, offline):
    out = tmp_path / "run"
    run_ickd(
        "train", *FAST, "distill=ickd", f"teacher.checkpoint={teacher_dir}", "trainer.max_batches_per_epoch=4",
        "logger=wandb", "logger.entity=mylab", "logger.tags=[smoke]",
        # Secrets planted in the config (an unknown top-level key the trainer must ignore, and a URL).
        "+db_password=hunter2-planted-789", "+storage_url=postgresql://u:pw-planted-456@db.example/optuna",
        f"hydra.run.dir={out}", cwd=tmp_path,
    )
    assert json.loads((out / "result.json").read_text())["status"] == "completed"
    (run,) = offline_runs(out)
    assert run["id"] == (out / RUN_ID_FILE).read_text().strip()
    assert (run["project"], run["entity"], run["job_type"], run["tags"]) == ("ickd", "mylab", "student", ["smoke"])
    assert run["name"] == "ickd-offline-resnet8-synthetic"
    # Per epoch: exactly the trainer's numeric metrics (metrics.jsonl), once each, at step=epoch;
    # its strings (step_mode) go to the run summary.
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in run["history"]] == [1, 2] and [row["_step"] for row in run["history"]] == [1, 2]
    for logged, written in zip(run["history"], jsonl):
        assert {k: v for k, v in logged.items() if not k.startswith("_")} == {k: v for k, v in written.items() if not isinstance(v, str)}
    assert jsonl[-1]["step_mode"] == run["summary"]["step_mode"] == "eager"
    required = {"epoch", "lr", "train/loss", "train/ce", "train/kd", "train/picd", "train/nicd", "train/top1", "val/top1",
                "val/top5", "val/best_top1", "time/epoch_s", "time/images_per_s", "bank_retrievals", "bank_retrieval_ms_mean"}
    assert required <= set(run["history"][0])
    assert {"name": "*", "step_metric": "epoch"} in run["metrics"]
    # Config: the flattened resolved run config plus provenance, with the secrets redacted.
    config = run["config"]
    assert config["memory.k"] == 4 and config["distill.name"] == "ickd" and config["trainer.epochs"] == 2
    assert config["run.name"] == run["name"] and config["run.out_dir"] == str(out)
    assert config["db_password"] == "***" and config["storage_url"] == "postgresql://u:***@db.example/optuna"
    # Summary.
    summary = run["summary"]
    result = json.loads((out / "result.json").read_text())
    assert summary["status"] == "completed" and summary["best_top1"] == result["best_top1"] and summary["last_top1"] == result["last_top1"]
    assert summary["total_time_s"] == pytest.approx(sum(row["time/epoch_s"] for row in jsonl))
    # No planted secret in any file W&B wrote (config, metadata, console log, debug logs).
    files = [p for p in (out / "wandb").rglob("*") if p.is_file()]
    assert len(files) >= 3
    for path in files:
        data = path.read_bytes()
        for planted in (PLANTED_KEY, "hunter2-planted-789", "pw-planted-456"):
            assert planted.encode() not in data, f"{planted} leaked into {path}"


@pytest.mark.slow
def test_stopped_and_resumed_run_continues_the_same_wandb_run_without_duplicates(tmp_path, offline):
    base = ["stage=teacher", "model=resnet8", "trainer.max_batches_per_epoch=3", "logger=wandb"]
    cfg = compose_config(*base, "trainer.epochs=3")
    out = tmp_path / "run"
    first = train(cfg, out, callbacks=[StopAfter(1), *loggers_for(cfg, out)])
    assert first["status"] == "stopped" and first["epochs_completed"] == 1
    run_id = (out / RUN_ID_FILE).read_text().strip()
    second = train(cfg, out, callbacks=loggers_for(cfg, out))
    assert second["status"] == "completed" and second["resumed_from_epoch"] == 1
    runs = offline_runs(out)
    assert len(runs) == 2 and {r["id"] for r in runs} == {run_id}  # one W&B run, two offline segments
    assert [[row["epoch"] for row in r["history"]] for r in runs] == [[1], [2, 3]]
    assert epochs_logged(runs) == [1, 2, 3]
    assert runs[0]["summary"]["status"] == "stopped" and runs[1]["summary"]["status"] == "completed"
    assert (out / LAST_EPOCH_FILE).read_text().strip() == "3"
    # Starting the folder over from scratch (trainer.resume=never) is a new W&B run, not a rewrite.
    third = train(compose_config(*base, "trainer.resume=never", "trainer.epochs=1"), out, callbacks=loggers_for(cfg, out))
    assert third["status"] == "completed"
    new_id = (out / RUN_ID_FILE).read_text().strip()
    assert new_id != run_id and [r["history"][0]["epoch"] for r in offline_runs(out) if r["id"] == new_id] == [1]


@pytest.mark.slow
def test_epochs_run_again_after_an_older_checkpoint_are_not_logged_twice_and_missing_ones_are_backfilled(tmp_path, offline):
    """The logger on its own (a real offline W&B run, no training): epochs repeated after a resume
    from an older checkpoint are skipped; epochs the checkpoint has but W&B missed are logged."""
    from ickd.engine import RunInfo

    out = tmp_path / "run"
    out.mkdir()
    info = RunInfo(out, "unit", "student", {"memory": {"k": 4}}, start_epoch=0, total_epochs=4)
    a = WandbLogger(run_id="unit-run-1")
    a.on_run_start(info)
    for epoch in (1, 2):
        a.on_epoch_end(epoch, {"epoch": epoch, "val/top1": 10.0 * epoch, "note": "text is not logged"})
    a.on_run_end({"status": "interrupted"})
    # Resumed from the epoch-1 checkpoint: epoch 2 runs again and must not be logged again.
    info.start_epoch = 1
    b = WandbLogger(run_id="unit-run-1")
    b.on_run_start(info)
    for epoch in (2, 3):
        b.on_epoch_end(epoch, {"epoch": epoch, "val/top1": 99.0})
    b.on_run_end({"status": "failed"})
    # The job died after epoch 4's checkpoint but before its log call: the resume backfills it.
    (out / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "val/top1": 40.0}) + "\n" for e in range(1, 5)))
    info.start_epoch = 4
    c = WandbLogger(run_id="unit-run-1")
    c.on_run_start(info)
    c.on_run_end({"status": "completed"})
    runs = offline_runs(out)
    assert len(runs) == 3 and {r["id"] for r in runs} == {"unit-run-1"}
    assert epochs_logged(runs) == [1, 2, 3, 4]
    assert [row["val/top1"] for row in runs[0]["history"]] == [10.0, 20.0]  # the first epoch 2 stands
    assert all("note" not in row for r in runs for row in r["history"])
    assert c.run_path == "ickd/unit-run-1"


@pytest.mark.slow
def test_sweep_trial_logs_one_wandb_run_grouped_by_study(tmp_path, teacher_dir, offline):
    from ickd.sweep.spec import load_spec
    from ickd.sweep.studies import StudyHandle
    from ickd.sweep.worker import run_worker

    spec = yaml.safe_load((REPO / "sweeps" / "synthetic_smoke.yaml").read_text())
    spec["base"] = [*spec["base"], "paradigm=offline", f"teacher.checkpoint={teacher_dir}", "trainer.max_batches_per_epoch=3", "logger=wandb"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    handle = StudyHandle.create(load_spec(path, name="wb", n_trials=1), tmp_path / "studies")
    run_worker(str(handle.dir))
    (trial,) = handle.study().get_trials(deepcopy=False)
    (run,) = offline_runs(Path(trial.user_attrs["run_dir"]))
    assert run["id"] == trial.user_attrs["run_id"]
    assert trial.user_attrs["wandb_run_path"] == f"ickd/{trial.user_attrs['run_id']}"
    assert (run["group"], run["job_type"]) == ("wb", "trial")
    assert run["config"]["study"] == "wb" and run["config"]["trial"] == trial.number
    assert run["config"]["params.memory.k"] == trial.params["memory.k"]
    assert epochs_logged([run]) == [1, 2]


# --- sync -------------------------------------------------------------------------------------

def _make_offline_runs(root: Path, ids: list[str]) -> None:
    """Real offline W&B runs (one folder per entry; a repeated id is a resumed run)."""
    script = textwrap.dedent(f"""
        import time, wandb
        for i, run_id in enumerate({ids!r}):
            run = wandb.init(project="ickd", id=run_id, resume="allow", dir={str(root)!r} + "/" + run_id.split("-")[0],
                             mode="offline", reinit="create_new")
            run.log({{"epoch": i + 1}}, step=i + 1)
            run.finish()
            if {ids!r}[i + 1:i + 2] == [run_id]:
                time.sleep(1.1)  # a resumed run's folders are named by start time (seconds)
    """)
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


STUB = """#!/bin/sh
# Stub `wandb` (the W&B server cannot exist here): logs its call, waits, then marks each folder
# synced the way wandb 0.31 does (run-<id>.wandb.synced beside the run file) unless told to fail.
echo "start $(date +%s.%N) $*" >> "$STUB_LOG"
sleep 1.5
for dir in "$@"; do
  case "$dir" in
    sync|--*) continue ;;
    *"$STUB_FAIL"*) echo "upload of $dir failed: no network" >&2; echo "end $(date +%s.%N)" >> "$STUB_LOG"; exit 1 ;;
    *"$STUB_NOMARK"*) ;;
    *) for f in "$dir"/run-*.wandb; do : > "$f.synced"; done ;;
  esac
done
echo "end $(date +%s.%N)" >> "$STUB_LOG"
"""


@pytest.mark.slow
def test_wandb_sync_finds_skips_uploads_in_parallel_and_reports_failures(tmp_path, monkeypatch):
    root = tmp_path / "study"
    _make_offline_runs(root, ["a1-ok", "b1-res", "b1-res", "c1-fail", "d1-done", "e1-nomark"])
    done_file = run_file(next((root / "d1").rglob("offline-run-*")))
    done_file.with_suffix(".wandb.synced").touch()  # synced earlier
    runs = {r.run_id: r for r in find_offline_runs([root])}
    assert sorted(runs) == ["a1-ok", "b1-res", "c1-fail", "d1-done", "e1-nomark"]
    assert len(runs["b1-res"].dirs) == 2 and runs["b1-res"].dirs[0].name < runs["b1-res"].dirs[1].name
    assert runs["d1-done"].pending == []

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "wandb").write_text(STUB)
    (bin_dir / "wandb").chmod(0o755)
    log = tmp_path / "stub.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.setenv("STUB_FAIL", "c1-fail")
    monkeypatch.setenv("STUB_NOMARK", "e1-nomark")

    proc = run_ickd("wandb", "sync", str(root), "--dry-run", cwd=tmp_path)
    assert "5 offline W&B run(s) found" in proc.stdout and "1 already synced, 4 to upload" in proc.stdout and not log.exists()

    proc = run_ickd("wandb", "sync", str(root), "-j", "4", cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any("ok" in line and "a1-ok" in line for line in lines) and any("ok" in line and "b1-res" in line for line in lines)
    assert any("FAILED c1-fail" in line and "no network" in line for line in lines)
    assert any("FAILED e1-nomark" in line and "did not mark" in line for line in lines)
    assert "2 uploaded, 2 failed" in proc.stdout
    calls = [line.split() for line in log.read_text().splitlines()]
    starts = [float(c[1]) for c in calls if c[0] == "start"]
    ends = [float(c[1]) for c in calls if c[0] == "end"]
    assert len(starts) == 4 and max(starts) < min(ends)  # all four uploads ran at the same time
    resumed = next(c for c in calls if c[0] == "start" and "b1-res" in " ".join(c))
    assert len([a for a in resumed if "offline-run-" in a]) == 2  # both segments of a resumed run in one call, oldest first
    assert not any("d1-done" in line for line in log.read_text().splitlines())

    # Re-running retries only what is not synced yet.
    log.unlink()
    monkeypatch.setenv("STUB_FAIL", "nothing-fails-now")
    monkeypatch.setenv("STUB_NOMARK", "nothing-unmarked-now")
    proc = run_ickd("wandb", "sync", str(root), cwd=tmp_path)
    assert "3 already synced, 2 to upload" in proc.stdout and "2 uploaded, 0 failed" in proc.stdout
    retried = log.read_text()
    assert "c1-fail" in retried and "e1-nomark" in retried and "a1-ok" not in retried and "b1-res" not in retried
    proc = run_ickd("wandb", "sync", str(root), cwd=tmp_path)
    assert "5 already synced, 0 to upload" in proc.stdout


def test_wandb_sync_names_a_missing_path(tmp_path, capsys):
    from ickd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["wandb", "sync", str(tmp_path / "nope")])
    assert exit_info.value.code == 2 and "no such folder, study or launch" in capsys.readouterr().err


@pytest.mark.slow
def test_launched_run_uses_the_launch_run_id_and_groups_by_launch(tmp_path, offline):
    from ickd.launch.tasks import RunSpec, train_one
    from ickd.naming import launch_run_name, run_id

    name = launch_run_name("grid-x", 3)
    spec = RunSpec(3, name, run_id("grid-x", name), str(tmp_path / "runs" / name),
                   [*FAST, "stage=teacher", "model=resnet8", "trainer.epochs=1", "trainer.max_batches_per_epoch=2", "logger=wandb"], "grid-x")
    assert train_one(spec, Callback())["status"] == "completed"
    (run,) = offline_runs(Path(spec.out_dir))
    assert (run["id"], run["group"], run["job_type"], run["name"]) == (spec.run_id, "grid-x", "teacher", name)
    assert (Path(spec.out_dir) / RUN_ID_FILE).read_text().strip() == spec.run_id
