"""``ickd jobs status | logs | cancel | resubmit-failed``: what became of a launch's jobs, read from
its manifest, SLURM (squeue, and sacct where accounting runs), submitit's result files and the run
folders. Works from any process on the login node, not only the one that submitted."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from ickd.engine.progress import LIVE_STATUSES, combined_eta, eta_now, format_duration, read_progress
from ickd.errors import ConfigError
from ickd.launch.manifest import Launch
from ickd.runs.rundir import RunDir
from ickd.sweep.progress import study_eta
from ickd.sweep.studies import StudyHandle

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "STOPPED", "SIGNALING", "STAGE_OUT"}
# Ended without finishing its work: resubmit-failed picks these up.
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "LOST", "INTERRUPTED"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None


def _array_master(job_id: str) -> str:
    return job_id.split("_", 1)[0]


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Live states from squeue (array tasks expanded), then sacct for finished jobs when it runs."""
    if not job_ids:
        return {}
    masters = sorted({_array_master(j) for j in job_ids})
    states: dict[str, str] = {}
    out = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(masters)])
    if out is not None and out.returncode == 0:
        for line in out.stdout.splitlines():
            if "|" in line:
                jid, state = line.strip().split("|", 1)
                states[jid] = state
    missing = [j for j in job_ids if j not in states]
    if missing:
        acct = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(sorted({_array_master(j) for j in missing}))])
        if acct is not None and acct.returncode == 0:
            for line in acct.stdout.splitlines():
                if "|" in line:
                    jid, state = line.strip().split("|", 1)
                    if jid in missing:
                        states[jid] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"))


def _result_state(launch: Launch, job_id: str) -> str | None:
    """submitit writes ``<job>_0_result.pkl`` when the callable returns or raises."""
    path = launch.submitit_dir / f"{job_id}_0_result.pkl"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            outcome = pickle.load(f)[0]
    except Exception:
        return "FAILED"
    return "COMPLETED" if outcome == "success" else "FAILED"


def job_states(launch: Launch) -> dict[str, str]:
    ids = sorted({str(j["job_id"]) for j in launch.jobs if j.get("job_id")})
    cluster = launch.data.get("profile", {}).get("cluster", "slurm")
    states = slurm_states(ids) if cluster == "slurm" else {}
    for jid in ids:
        if jid in states and states[jid] not in ("COMPLETED",):
            continue
        if cluster == "local" and jid.isdigit() and _pid_alive(int(jid)):
            states[jid] = "RUNNING"
            continue
        cancelled = any(j.get("cancelled") for j in launch.jobs if str(j.get("job_id")) == jid)
        result = _result_state(launch, jid)
        if cancelled and (result is None or result == "FAILED"):
            states[jid] = "CANCELLED"  # `ickd jobs cancel`: its runs stopped at a checkpoint
        elif result is not None:
            states[jid] = result
        elif jid not in states:
            states[jid] = "LOST"  # not queued and no result: killed (SIGKILL, OOM, node loss)
    return states


def _run_progress(out_dir: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if not out_dir:
        return info
    folder = Path(out_dir)
    run_dir = RunDir(folder)
    metrics = run_dir.metrics
    if metrics.is_file():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        if lines:
            info["epoch"] = lines[-1].get("epoch")
            info["best_top1"] = lines[-1].get("val/best_top1")  # the selection split: holdout if any, else test
            info["test_top1"] = lines[-1].get("test/top1")       # the latest epoch's test top-1 (shown beside it)
    result = run_dir.result
    if result.is_file():
        summary = json.loads(result.read_text())
        info["run_status"] = summary.get("status")
        info["epochs"] = summary.get("epochs")
        info["wall_time_s"] = summary.get("wall_time_s")
    progress = read_progress(folder)  # the trainer's progress.json: live epoch/batch and ETA
    if progress is not None:
        info["progress"] = progress
        info.setdefault("epochs", progress.get("epochs"))
    events = run_dir.events
    if events.is_file():
        info["starts"] = sum(1 for x in events.read_text().splitlines() if '"event": "start"' in x)
    return info


def _trials_by_job(launch: Launch) -> dict[str, list[Any]]:
    handle = StudyHandle.load(launch.data["study"]["dir"])
    found: dict[str, list[Any]] = {}
    for t in handle.study().get_trials(deepcopy=False):
        job = t.user_attrs.get("worker_job")
        if job:
            found.setdefault(str(job), []).append(t)
    return found


def rows(launch: Launch) -> list[dict[str, Any]]:
    states = job_states(launch)
    table = []
    trials = _trials_by_job(launch) if launch.kind == "sweep" else {}
    for entry in launch.jobs:
        jid = str(entry.get("job_id"))
        row = {"job": jid, "state": states.get(jid, "UNSUBMITTED"), "attempts": len(entry.get("attempts", []))}
        if launch.kind == "sweep":
            mine = trials.get(jid, [])
            running = [t for t in mine if t.state.name == "RUNNING"]
            row["workers"] = entry.get("workers")
            row["trials"] = f"{sum(t.state.name in ('COMPLETE', 'PRUNED') for t in mine)} done" + (f", running {running[0].number}" if running else "")
            if running:
                row["run_id"] = running[0].user_attrs.get("run_id")
                row.update(_run_progress(running[0].user_attrs.get("run_dir")))
        else:
            row.update({"run": entry["run"], "run_id": entry.get("wandb_run_id"), "out_dir": entry["out_dir"]})
            row.update(_run_progress(entry["out_dir"]))
        row["eta"] = _row_eta(row, launch.kind)
        table.append(row)
    return table


def _row_eta(row: dict[str, Any], kind: str) -> float | str | None:
    """'done' for a completed run, the seconds left of a running one (its progress.json), else None."""
    if kind != "sweep" and row.get("run_status") == "completed":
        return "done"
    if row["state"] == "RUNNING":
        return eta_now(row.get("progress"))
    return None


def launch_eta(launch: Launch, table: list[dict[str, Any]]) -> tuple[float | None, str]:
    """(seconds, how) for the whole launch: :func:`ickd.engine.progress.combined_eta` over its runs
    (a study launch: over the study's trials, as `ickd sweep status` shows it)."""
    if launch.kind == "sweep":
        return study_eta(StudyHandle.load(launch.data["study"]["dir"]))
    running = [r["eta"] if isinstance(r["eta"], (int, float)) else None for r in table if r["state"] == "RUNNING" and r["eta"] != "done"]
    queued = sum(1 for r in table if r["eta"] != "done" and r["state"] != "RUNNING" and (r["state"] in ACTIVE or r["state"] == "UNSUBMITTED"))
    durations = [float(r["wall_time_s"]) for r in table if r["eta"] == "done" and isinstance(r.get("wall_time_s"), (int, float))]
    mean = sum(durations) / len(durations) if durations else None
    eta = combined_eta(running, queued, mean)
    if not running and not queued:
        unfinished = sum(1 for r in table if r["eta"] != "done")
        if unfinished:
            return None, f"nothing running or queued; {unfinished} run(s) did not finish: `ickd jobs resubmit-failed {launch.name}`"
        return eta, "every run completed"
    how = f"{len(running)} running, {queued} queued"
    if queued:
        how += f", queued runs at the mean finished run's {format_duration(mean)}" if mean is not None else ", no run finished yet to time the queued ones"
    return eta, how


def print_status(launch: Launch) -> None:
    print(f"launch {launch.name} ({launch.kind}, profile {launch.data.get('profile', {}).get('name')}, {launch.dir})")
    if launch.kind == "sweep":
        study = launch.data["study"]
        print(f"study {study['name']} ({study['dir']}), budget {study['n_trials']} trials; `ickd sweep status {study['dir']}` for the trials")
    table = rows(launch)
    counts: dict[str, int] = {}
    for row in table:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    print("jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if launch.kind == "sweep":
        header = ["job", "state", "workers", "trials", "epoch", "eta", "run_id"]
    else:
        header = ["job", "state", "run", "epoch", "eta", "best_top1", "test_top1", "starts", "run_id", "out_dir"]
    cells = [[_fmt(row, key) for key in header] for row in table]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(header, widths)))
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
    eta, how = launch_eta(launch, table)
    print(f"eta: {'done' if eta == 0 else format_duration(eta) if eta is not None else 'unknown'} ({how})")


def _fmt(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "epoch" and row.get("state") == "RUNNING" and row.get("progress", {}).get("status") in LIVE_STATUSES:
        live = row["progress"]  # the epoch in flight and its batch, from progress.json
        return f"{live.get('epoch')}/{live.get('epochs')} b{live.get('batch')}/{live.get('batches')}"
    if key == "epoch" and value is not None and row.get("epochs"):
        return f"{value}/{row['epochs']}"
    if key == "eta":
        return value if isinstance(value, str) else format_duration(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def log_paths(launch: Launch, job_id: str) -> list[Path]:
    paths = sorted(launch.submitit_dir.glob(f"{job_id}_*_log.out")) + sorted(launch.submitit_dir.glob(f"{job_id}_*_log.err"))
    for entry in launch.jobs:
        if str(entry.get("job_id")) == job_id and entry.get("out_dir"):
            child = RunDir(entry["out_dir"]).job_log
            if child.is_file():
                paths.append(child)
    return paths


def cancel(launch: Launch, job_ids: list[str] | None = None) -> list[str]:
    targets = sorted({str(j["job_id"]) for j in launch.jobs if j.get("job_id")} if not job_ids else set(job_ids))
    if launch.data.get("profile", {}).get("cluster", "slurm") == "slurm":
        out = _run(["scancel", *targets])
        if out is None:
            raise ConfigError("scancel not found: cancel from a machine with SLURM's commands")
        if out.returncode != 0:
            raise ConfigError(f"scancel failed: {out.stderr.strip()}")
    else:
        for jid in targets:
            if jid.isdigit() and _pid_alive(int(jid)):
                os.kill(int(jid), signal.SIGTERM)
    for entry in launch.jobs:
        if str(entry.get("job_id")) in targets:
            entry["cancelled"] = True
    launch.save()
    return targets


def failed_entries(launch: Launch) -> list[dict[str, Any]]:
    """Entries whose job ended without finishing its work (and whose run is not complete)."""
    states = job_states(launch)
    picked = []
    for entry in launch.jobs:
        state = states.get(str(entry.get("job_id")))
        if state in ACTIVE or state is None:
            continue
        done = _run_progress(entry.get("out_dir")).get("run_status") == "completed" if entry.get("out_dir") else False
        if state in FAILED and not done:
            picked.append(entry)
        elif state == "COMPLETED" and entry.get("out_dir") and not done:
            picked.append(entry)  # the job returned but its run did not finish (e.g. interrupted)
    return picked
