"""What a submitted job runs: one training run, a pack of runs, or study workers.

Each task object is pickled by submitit and called on the node. It is *checkpointable*: on USR2
(preemption, time limit) submitit calls ``checkpoint()``, which resubmits the same task; the task
finds its runs' newest checkpoints on disk when it starts again, so nothing is redone or lost.

A single run or worker trains in the job's own process (DDP ranks too). A pack (``trials_per_gpu``)
starts one child process per run or worker, forwards signals to them and requeues the job if any
child stopped for a signal.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ickd.errors import IckdError
from ickd.run_logging import FALLBACK_FORMAT, configure_run_logging
from ickd.runs import slurm
from ickd.runs.exits import EXIT_INTERRUPTED
from ickd.runs.rundir import RunDir
from ickd.runs.signals import REQUEUE_SIGNAL, PreemptionGuard, append_event
from ickd.sweep.worker import raise_if_stopped_for_failures, run_worker
from ickd.track.execute import run_training
from ickd.track.wandb_logger import platform_tag

log = logging.getLogger("ickd.launch")


class RunInterrupted(IckdError):
    """A run stopped for a signal with its checkpoint saved, and nothing requeued it."""


@dataclass
class RunSpec:
    """One training run of a launch: what to train, where, and under which names."""

    index: int
    name: str
    run_id: str
    out_dir: str
    overrides: list[str] = field(default_factory=list)
    launch: str | None = None  # the launch it belongs to (the W&B group)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class WorkerSpec:
    """One study worker of a launch."""

    index: int
    study_dir: str
    state_file: str


def _checkpointable(task: Any, *args: Any, **kwargs: Any):
    import submitit

    return submitit.helpers.DelayedSubmission(task, *args, **kwargs)


def _export_distributed() -> None:
    """Multi-task jobs (DDP): torch.distributed's variables from the SLURM/submitit environment."""
    if slurm.ntasks() > 1 and "WORLD_SIZE" not in os.environ:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def limit_threads() -> None:
    """One intra-op thread pool per allocated CPU: torch would otherwise size its pool to the whole
    node and oversubscribe the CPUs it shares with other jobs (several times slower)."""
    cpus = os.environ.get("OMP_NUM_THREADS") or slurm.cpus_per_task()
    if cpus and cpus.isdigit():
        import torch

        torch.set_num_threads(max(1, int(cpus)))


def train_one(run: RunSpec, guard: PreemptionGuard) -> dict[str, Any]:
    """Train ``run`` in this process (resuming from its folder's newest checkpoint)."""
    limit_threads()
    # The job's log gets exactly what `ickd train` prints (Hydra's job logging: stdout and
    # <run folder>/<stage>.log): epoch lines, progress lines (trainer.progress_interval_s), warnings.
    configure_run_logging([*run.overrides, f"name={run.name}"], run.out_dir)
    done = RunDir(run.out_dir).result
    if done.is_file() and json.loads(done.read_text()).get("status") == "completed":
        log.info("run %s already completed; nothing to do", run.name)
        return json.loads(done.read_text())
    # W&B (logger=wandb among the overrides): the launch's run id, so a requeued job continues the
    # same W&B run; tagged launch:<name> and run:<index>; grouped by launch and typed by stage unless
    # the user set logger.group / logger.job_type.
    tags = [platform_tag("launch", run.launch), platform_tag("run", run.index)] if run.launch else [platform_tag("run", run.index)]
    # compose (a ConfigError naming the key, never a raw TypeError) -> resume artifact -> loggers -> train
    return run_training([*run.overrides, f"name={run.name}"], run.out_dir, callbacks=[guard],
                        tracking=lambda cfg: {"run_id": run.run_id, "group": run.launch, "job_type": str(cfg.stage), "tags": tags})


class _Resubmittable:
    """submitit calls ``checkpoint()`` on USR2: resubmit the same task, which resumes from disk."""

    def checkpoint(self, *args: Any, **kwargs: Any):
        return _checkpointable(self, *args, **kwargs)


class TrainTask(_Resubmittable):
    """Train one run, or a pack of runs side by side (each in its own process)."""

    def __init__(self, runs: list[RunSpec], threads_per_run: int | None = None) -> None:
        self.runs = list(runs)
        self.threads_per_run = threads_per_run

    def __call__(self) -> Any:
        if len(self.runs) == 1:
            run = self.runs[0]
            _export_distributed()
            guard = PreemptionGuard().install()
            summary = train_one(run, guard)
            if summary.get("status") == "interrupted":
                guard.hand_over(run.out_dir)  # under submitit and USR2: requeues and exits
                raise RunInterrupted(
                    f"run {run.name} stopped for {guard.signal_name} with its checkpoint saved in {run.out_dir}; "
                    "`ickd jobs resubmit-failed LAUNCH` continues it"
                )
            return summary
        children = [
            ChildSpec([sys.executable, "-m", "ickd.launch.child", "run", run.to_json()], RunDir(run.out_dir).job_log, run.out_dir)
            for run in self.runs
        ]
        return run_children(children, self.threads_per_run)


class SweepTask(_Resubmittable):
    """Study workers: one in this process, or several packed on the job's GPU(s)."""

    def __init__(self, workers: list[WorkerSpec], threads_per_run: int | None = None) -> None:
        self.workers = list(workers)
        self.threads_per_run = threads_per_run

    def __call__(self) -> Any:
        if len(self.workers) == 1:
            spec = self.workers[0]
            limit_threads()
            guard = PreemptionGuard().install()
            counts = run_worker(spec.study_dir, index=spec.index, guard=guard, state_file=spec.state_file)
            if guard.requeue_requested:
                guard.hand_over(None)
            elif not guard.interrupt_requested():
                raise_if_stopped_for_failures(spec.study_dir)
            return counts
        children = [
            ChildSpec(
                [sys.executable, "-m", "ickd.sweep.worker", w.study_dir, "--index", str(w.index), "--state-file", w.state_file],
                Path(w.state_file).with_suffix(".log"),
                None,
            )
            for w in self.workers
        ]
        return run_children(children, self.threads_per_run)


# --- packs of child processes ---------------------------------------------------------------------

@dataclass
class ChildSpec:
    argv: list[str]
    log_file: Path
    out_dir: str | None


def run_children(children: list[ChildSpec], threads: int | None) -> dict[str, Any]:
    """Run the children side by side; forward USR2/TERM to them; requeue if any stopped for one."""
    guard = PreemptionGuard().install()
    procs: list[subprocess.Popen] = []
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    for i, child in enumerate(children):
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # packed processes must not oversubscribe the CPUs
        if visible:
            env["CUDA_VISIBLE_DEVICES"] = visible[i % len(visible)]  # round-robin over the job's GPUs
        child.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(child.log_file, "ab") as logf:
            procs.append(subprocess.Popen(child.argv, env=env, stdout=logf, stderr=subprocess.STDOUT))
    forwarded: set[int] = set()
    codes: list[int | None] = [None] * len(procs)
    while any(c is None for c in codes):
        if guard.signum is not None and guard.signum not in forwarded:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(guard.signum)
            forwarded.add(guard.signum)
        for i, p in enumerate(procs):
            if codes[i] is None:
                try:
                    codes[i] = p.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
    interrupted = [c.log_file for c, code in zip(children, codes) if code == EXIT_INTERRUPTED]
    failed = [(c.log_file, code) for c, code in zip(children, codes) if code not in (0, EXIT_INTERRUPTED)]
    if interrupted and guard.requeue_requested:
        guard.hand_over(None)  # requeues the whole pack; finished children find their results and return
    if failed:
        raise IckdError("packed process(es) failed: " + "; ".join(f"exit {code}, log {path}" for path, code in failed))
    if interrupted:
        raise RunInterrupted(f"{len(interrupted)} packed process(es) stopped for {guard.signal_name} with checkpoints saved; `ickd jobs resubmit-failed LAUNCH` continues them")
    return {"children": len(children), "exit_codes": codes}


def child_main(argv: list[str]) -> None:
    """``python -m ickd.launch.child run RUNSPEC_JSON``: one packed run."""
    # Until train_one applies the run's Hydra job logging (same format).
    logging.basicConfig(level=logging.INFO, format=FALLBACK_FORMAT, stream=sys.stdout)
    if len(argv) != 2 or argv[0] != "run":
        print("usage: python -m ickd.launch.child run RUNSPEC_JSON", file=sys.stderr)
        sys.exit(2)
    run = RunSpec(**json.loads(argv[1]))
    guard = PreemptionGuard(signals=(REQUEUE_SIGNAL, signal.SIGTERM)).install()
    try:
        summary = train_one(run, guard)
    except IckdError as exc:
        log.error("%s", exc)
        append_event(run.out_dir, "error", error=str(exc))
        sys.exit(2)
    if summary.get("status") == "interrupted":
        sys.exit(EXIT_INTERRUPTED)
