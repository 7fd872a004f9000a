"""Submit runs, grids and study workers through submitit, fire-and-forget: submission returns at once
and the launch manifest records everything a later ``ickd jobs`` needs."""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ickd.config_store import compose_checked
from ickd.errors import ConfigError
from ickd.launch.manifest import Launch, new_launch_name, snapshot_code
from ickd.launch.profiles import Profile, check_against_cluster
from ickd.launch.tasks import RunSpec, SweepTask, TrainTask, WorkerSpec
from ickd.naming import launch_run_name, run_id
from ickd.redaction import scrub_overrides
from ickd.sweep.studies import StudyHandle

log = logging.getLogger("ickd.launch")


def expand_grid(overrides: list[str]) -> list[list[str]]:
    """Hydra's sweep syntax (``a=1,2 b=range(0,3)``) to the list of runs' overrides (cartesian product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as exc:  # Hydra's OverrideParseException; the message shows the offending text
        shown, reason = scrub_overrides(list(overrides), str(exc))
        raise ConfigError(f"cannot parse overrides {shown}: {reason}") from exc
    axes: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.input_line.split("=", 1)[0]
            axes.append([f"{key}={value}" for value in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(combo) for combo in itertools.product(*axes)]


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@contextmanager
def _code_on_path(code_dir: Path) -> Iterator[None]:
    """Jobs import the snapshot: sbatch and submitit's local executor pass this environment on."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{code_dir}{os.pathsep + before if before else ''}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


@contextmanager
def _detached_stdio() -> Iterator[None]:
    """submitit's local executor starts its job controller with our stdout/stderr: a caller reading
    them (a pipe) would wait for the job to end. Give the controller /dev/null instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def make_executor(launch: Launch, profile: Profile, job_name: str):
    import submitit

    kwargs: dict[str, Any] = {}
    if profile.cluster == "slurm":
        kwargs["slurm_max_num_timeout"] = int(profile["max_num_timeout"])
        if profile.get("python"):
            kwargs["slurm_python"] = profile["python"]
    executor = submitit.AutoExecutor(folder=launch.submitit_dir, cluster=profile.cluster, **kwargs)
    params = profile.executor_parameters(job_name)
    if profile.cluster == "slurm":
        # The code snapshot goes first on the nodes' import path (PYTHONPATH also travels with sbatch's
        # environment; the setup line makes it visible in the job script).
        params["slurm_setup"] = [f"export PYTHONPATH={launch.code_dir}${{PYTHONPATH:+:$PYTHONPATH}}", *params.get("slurm_setup", [])]
    executor.update_parameters(**params)
    return executor


def _submit(launch: Launch, profile: Profile, tasks: list[Any], job_name: str) -> list[str]:
    executor = make_executor(launch, profile, job_name)
    detach = _detached_stdio() if profile.cluster == "local" else contextlib.nullcontext()
    with _code_on_path(launch.code_dir), detach:
        if len(tasks) == 1:
            jobs = [executor.submit(tasks[0])]
        else:
            with executor.batch():  # one job array
                jobs = [executor.submit(task) for task in tasks]
    return [str(job.job_id) for job in jobs]


def _prepare(kind: str, profile: Profile, name: str | None, root: str | None, command: list[str], **fields: Any) -> Launch:
    check_against_cluster(profile)
    launch = Launch.create(name or new_launch_name(kind), kind, root, profile=profile.to_dict(), command=command, **fields)
    launch.data["code"] = snapshot_code(launch.code_dir)
    return launch


def _run_specs(launch: Launch, grid: list[list[str]]) -> list[RunSpec]:
    runs = []
    for i, overrides in enumerate(grid):
        name = launch_run_name(launch.name, i)
        runs.append(RunSpec(i, name, run_id(launch.name, name), str(launch.dir / "runs" / name), overrides, launch.name))
    return runs


def launch_runs(kind: str, overrides: list[str], profile: Profile, name: str | None = None, root: str | None = None, dry_run: bool = False) -> Launch:
    """``ickd launch train`` (one run) and ``ickd launch grid`` (one array over the grid)."""
    grid = expand_grid(overrides) if kind == "grid" else [list(overrides)]
    if kind == "train" and len(expand_grid(overrides)) > 1:
        raise ConfigError("comma-separated values make a grid: use `ickd launch grid ...` (or quote the value)")
    for run_overrides in grid:  # every run must compose and validate before anything is submitted
        try:
            compose_checked(run_overrides)  # types, unknown keys, choices (ickd.config_schema)
        except ConfigError as exc:
            raise ConfigError(f"{exc} [run: {' '.join(run_overrides)}]") from exc
    if dry_run:
        print(f"{len(grid)} run(s) would be submitted with profile {profile.name}:")
        for run_overrides in grid:
            print("  " + " ".join(run_overrides))
        return Launch(Path("."), {"launch": "dry-run", "kind": kind, "jobs": []})
    launch = _prepare(kind, profile, name, root, ["ickd", "launch", kind, *overrides])
    runs = _run_specs(launch, grid)
    packs = _chunks(runs, profile.runs_per_job)
    tasks = [TrainTask(pack, profile.threads_per_run(len(pack))) for pack in packs]
    for run in runs:
        launch.jobs.append({
            "index": run.index, "run": run.name, "run_id": run.run_id, "wandb_run_id": run.run_id,
            "out_dir": run.out_dir, "overrides": run.overrides, "job_id": None, "attempts": [],
        })
    launch.data["status"] = "submitting"
    launch.save()
    job_ids = _submit(launch, profile, tasks, launch.name)
    for pack, job_id in zip(packs, job_ids):
        for run in pack:
            entry = launch.jobs[run.index]
            entry["job_id"] = job_id
            entry["attempts"].append(job_id)
    launch.data["status"] = "submitted"
    launch.save()
    return launch


def launch_sweep(study: str, workers: int, profile: Profile, name: str | None = None, root: str | None = None, studies_root: str | None = None) -> Launch:
    """``ickd launch sweep STUDY --workers N``: one job array of study workers; each stops when the
    study's budget is used up. With ``trials_per_gpu`` each array task runs that many workers."""
    handle = StudyHandle.load(study, studies_root)
    if workers < 1:
        raise ConfigError(f"--workers {workers}: need at least one worker")
    handle.study()  # the storage must be reachable before jobs are queued
    launch = _prepare("sweep", profile, name, root, ["ickd", "launch", "sweep", study, "--workers", str(workers)],
                      study={"name": handle.name, "dir": str(handle.dir.resolve()), "n_trials": handle.spec.n_trials})
    state_dir = launch.dir / "workers"
    state_dir.mkdir(parents=True, exist_ok=True)
    specs = [WorkerSpec(i, str(handle.dir.resolve()), str(state_dir / f"worker-{i:03d}.json")) for i in range(workers)]
    packs = _chunks(specs, profile.runs_per_job)
    tasks = [SweepTask(pack, profile.threads_per_run(len(pack))) for pack in packs]
    for i, pack in enumerate(packs):
        launch.jobs.append({"index": i, "workers": [w.index for w in pack], "job_id": None, "attempts": []})
    launch.data["status"] = "submitting"
    launch.save()
    job_ids = _submit(launch, profile, tasks, f"{launch.name}")
    for entry, job_id in zip(launch.jobs, job_ids):
        entry["job_id"] = job_id
        entry["attempts"].append(job_id)
    launch.data["status"] = "submitted"
    launch.save()
    return launch


def resubmit(launch: Launch, entries: list[dict[str, Any]], profile: Profile) -> list[str]:
    """Submit the given manifest entries again (same runs, folders, ids and code snapshot); the
    runs resume from their newest checkpoints. Entries sharing a job are resubmitted together."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(str(entry.get("job_id")), []).append(entry)
    tasks = []
    for group in groups.values():
        if launch.kind == "sweep":
            specs = [WorkerSpec(w, launch.data["study"]["dir"], str(launch.dir / "workers" / f"worker-{w:03d}.json")) for e in group for w in e["workers"]]
            tasks.append(SweepTask(specs, profile.threads_per_run(len(specs))))
        else:
            runs = [RunSpec(e["index"], e["run"], e["run_id"], e["out_dir"], e["overrides"], launch.name) for e in group]
            tasks.append(TrainTask(runs, profile.threads_per_run(len(runs))))
    job_ids = _submit(launch, profile, tasks, launch.name)
    for group, job_id in zip(groups.values(), job_ids):
        for entry in group:
            entry["job_id"] = job_id
            entry["attempts"].append(job_id)
            entry.pop("cancelled", None)
    launch.save()
    return job_ids


