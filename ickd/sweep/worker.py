"""A study worker: ask a trial, compose its run config, train it, report each epoch, tell the result.

Workers are independent processes (local, or SLURM array tasks) that share only the study storage.
    python -m ickd.sweep.worker STUDY [--root DIR] [--index I]
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ickd.engine import Callback, RunInfo
from ickd.errors import IckdError, NonFiniteLossError, TrialsFailedError
from ickd.naming import run_id, trial_run_name
from ickd.runs.atomic import atomic_write_json
from ickd.runs.exits import EXIT_INTERRUPTED
from ickd.runs.rundir import RunDir
from ickd.runs.signals import PreemptionGuard
from ickd.sweep.liveness import worker_identity
from ickd.sweep.reaper import enqueue_retry, reap
from ickd.sweep.space import params_to_overrides
from ickd.sweep.storage import uses_heartbeats
from ickd.sweep.studies import StudyHandle
from ickd.track.execute import run_training
from ickd.track.wandb_logger import platform_tag

log = logging.getLogger("ickd.sweep")

# Trials that use up the budget. FAIL trials do not (a failed trial is retried or reported).
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class TrialCallback(Callback):
    """Reports each epoch's objective to Optuna, prunes, keeps the heartbeat and honours SIGTERM."""

    def __init__(self, trial: optuna.Trial, handle: StudyHandle, stop: threading.Event) -> None:
        self.trial, self.handle, self.stop = trial, handle, stop
        self.pruned = False
        self.history: list[dict] = []

    def _report(self, epoch: int) -> None:
        value = self.handle.spec.objective_value(self.history)
        if value is not None:
            self.trial.report(value, epoch)

    def on_run_start(self, run: RunInfo) -> None:
        # A retried trial resumes from its checkpoint: re-report the epochs already done so the
        # pruner compares it on equal terms.
        metrics = RunDir(run.out_dir).metrics
        if run.start_epoch > 0 and metrics.is_file():
            for line in metrics.read_text().splitlines():
                self.history.append(json.loads(line))
                self._report(self.history[-1]["epoch"])

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        self._report(epoch)
        self.pruned = self.trial.should_prune()

    def should_stop(self) -> bool:
        return self.pruned or self.stop.is_set()


class Heartbeat:
    """Writes ``heartbeat_at`` (and Optuna's RDB heartbeat) every interval while a trial runs."""

    def __init__(self, study: optuna.Study, trial_id: int, interval_s: float) -> None:
        self.study, self.trial_id, self.interval = study, trial_id, interval_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ickd-heartbeat", daemon=True)

    def _beat(self) -> None:
        storage = self.study._storage
        storage.set_trial_user_attr(self.trial_id, "heartbeat_at", time.time())
        if uses_heartbeats(storage):
            storage.record_heartbeat(self.trial_id)

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self._beat()
            except Exception as exc:  # a finished trial or a storage hiccup must not kill training
                log.debug("heartbeat failed: %s", exc)

    def __enter__(self) -> "Heartbeat":
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)


class StudyDone(Exception):
    """The sampler declared the study finished (e.g. a grid sampler with no point left)."""


def tell(study: optuna.Study, trial: optuna.Trial, value: float | None = None, state: TrialState | None = None) -> None:
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:
        # GridSampler calls study.stop() once the grid is exhausted, which Optuna only allows inside
        # study.optimize; the trial's state is stored either way.
        if "Study.stop" not in str(exc):
            raise
        raise StudyDone(str(exc)) from None


def too_many_failures(study: optuna.Study, limit: int) -> bool:
    """Trials that failed by themselves (not interrupted, skipped or lost): failed trials do not use
    up the budget, so a study whose trials keep failing must stop instead of burning its nodes."""
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.user_attrs.get("failed_by_itself")]
    return len(failed) >= limit


def failure_limit(spec: Any) -> int:
    """How many trials may fail by themselves before workers stop (``retry.max_failures``)."""
    return int(spec.retry.get("max_failures") or max(3, spec.n_trials))


def stopped_for_failures(study: optuna.Study, spec: Any) -> optuna.trial.FrozenTrial | None:
    """The first trial that failed by itself, if the study's budget is not used up and its workers
    stop for failures (the limit of :func:`failure_limit` reached); else None."""
    if not budget_left(study, spec.n_trials) or not too_many_failures(study, failure_limit(spec)):
        return None
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.user_attrs.get("failed_by_itself")]
    return min(failed, key=lambda t: t.number)


def raise_if_stopped_for_failures(study: str | Path, root: str | Path | None = None) -> None:
    """Raise when the study stopped because its trials failed: the worker command exits 1 on it, and
    an in-process worker of a launched sweep fails its job with it (the job must not look successful)."""
    handle = StudyHandle.load(str(study), root)
    study = handle.study()
    first = stopped_for_failures(study, handle.spec)
    if first is not None:
        raise TrialsFailedError(failure_summary(study, handle.spec, first))


def failure_summary(study: optuna.Study, spec: Any, first: optuna.trial.FrozenTrial) -> str:
    """One message for a study stopped for failures: how many, the first one's reason and log."""
    n = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.user_attrs.get("failed_by_itself"))
    run_dir = first.user_attrs.get("run_dir")
    where = f"; its run folder: {run_dir}" if run_dir else ""
    return (
        f"study {spec.name} stopped: {n} trial(s) failed by themselves (limit retry.max_failures={failure_limit(spec)}) "
        f"before the budget of {spec.n_trials} was used. First failure: trial {first.number}: "
        f"{first.user_attrs.get('fail_reason', '?')}{where}. Fix the cause (see `ickd sweep status {spec.name}` and "
        "the worker logs), then `ickd sweep run` continues the study"
    )


def budget_left(study: optuna.Study, n_trials: int) -> bool:
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True  # retries are part of the budget already
    return sum(t.state in BUDGET_STATES for t in trials) < n_trials


def over_budget(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """True if ``trial`` was created after the budget was used up by a concurrent worker."""
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state in BUDGET_STATES]
    return len(earlier) >= n_trials and "retry_of" not in trial.user_attrs


def skip_duplicate(study: optuna.Study, trial: optuna.Trial) -> str | None:
    """Never train the same parameters twice (Optuna FAQ, "How can I ignore duplicated samples?").

    Params equal to a COMPLETE trial's: tell its value without training. Equal to a WAITING trial's,
    or to a RUNNING trial's that is older (or a retry, which always runs): PRUNED. Either way the
    trial gets user attribute ``duplicate_of`` and counts in the budget. Returns the state told, or
    None when the trial must be trained. Retries (``retry_of``) reuse their trial's params on purpose
    and are never duplicates; the oldest of concurrent equals trains, so two workers never prune each
    other.
    """
    if "retry_of" in trial.user_attrs:
        return None
    params = trial.params
    same = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number and t.params == params]
    done = [t for t in same if t.state == TrialState.COMPLETE and t.value is not None]
    pending = [
        t for t in same
        if t.state == TrialState.WAITING or (t.state == TrialState.RUNNING and (t.number < trial.number or "retry_of" in t.user_attrs))
    ]
    original = min(done or pending, key=lambda t: t.number, default=None)
    if original is None:
        return None
    trial.set_user_attr("duplicate_of", original.number)
    if done:
        log.info("trial %d: same params as complete trial %d; told its value %s without training", trial.number, original.number, original.value)
        tell(study, trial, original.value)
        return "COMPLETE"
    log.info("trial %d: same params as %s trial %d; pruned without training", trial.number, original.state.name.lower(), original.number)
    tell(study, trial, state=TrialState.PRUNED)
    return "PRUNED"


# A worker run by a launcher stops mid-epoch on a preemption signal and leaves its trial RUNNING and
# *suspended*; its requeued job continues the very same trial from the checkpoint.
SUSPENDED = "SUSPENDED"


def run_trial(handle: StudyHandle, study: optuna.Study, trial: optuna.Trial, stop: threading.Event, guard: Callback | None = None, state_file: Path | None = None) -> str:
    """Train one trial; returns the state it was told with (or SUSPENDED)."""
    spec = handle.spec
    # A retry keeps the identity of the trial it continues: same run folder, same run name.
    first = int(trial.user_attrs.get("first_trial", trial.number))
    run_dir = Path(trial.user_attrs.get("run_dir") or handle.trial_dir(first))
    name = trial_run_name(spec.name, first)
    wandb_id = run_id(spec.name, name)
    if first != trial.number:  # a retry keeps the first trial's id (also one from an older id scheme)
        earlier = next((t for t in study.get_trials(deepcopy=False) if t.number == first), None)
        wandb_id = (earlier.user_attrs.get("run_id") if earlier is not None else None) or wandb_id
    for key, value in {**worker_identity(), "run_dir": str(run_dir), "first_trial": first, "run_id": wandb_id}.items():
        trial.set_user_attr(key, value)
    overrides = [*spec.base, *params_to_overrides(trial.params), f"name={name}"]
    trial.set_user_attr("overrides", overrides)
    callback = TrialCallback(trial, handle, stop)
    log.info("trial %d: %s -> %s", trial.number, " ".join(params_to_overrides(trial.params)), run_dir)
    try:
        # compose -> resume artifact (trainer.resume=wandb:... in base) -> loggers -> train.
        # W&B (logger=wandb in the study's base overrides): one W&B run per trial, its id the trial's
        # run id (a retry continues it), named <study>-t<first trial>, tagged study:<name> and
        # trial:<first trial>; grouped by study and typed "trial" unless the user set logger.group /
        # logger.job_type. Its path is kept on the trial.
        tracking = {
            "run_id": wandb_id, "group": spec.name, "job_type": "trial",
            "tags": [platform_tag("study", spec.name), platform_tag("trial", first)],
            "extra": {"study": spec.name, "trial": trial.number, "first_trial": first, "params": dict(trial.params)},
            "on_init": lambda path: trial.set_user_attr("wandb_run_path", path),
        }
        summary = run_training(overrides, run_dir, callbacks=[callback, *([guard] if guard else [])], tracking=tracking,
                               context=Heartbeat(study, trial._trial_id, float(spec.heartbeat.get("interval_s", 30))))
    except Exception as exc:  # the worker goes on with the next trial
        reason = f"non-finite loss: {exc}" if isinstance(exc, NonFiniteLossError) else f"{type(exc).__name__}: {exc}"
        trial.set_user_attr("fail_reason", reason)
        trial.set_user_attr("failed_by_itself", True)
        if not isinstance(exc, IckdError):
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
        log.error("trial %d failed: %s", trial.number, reason)
        tell(study, trial, state=TrialState.FAIL)
        return "FAIL"
    if summary["status"] == "interrupted":
        requeue = bool(getattr(guard, "requeue_requested", False))
        if requeue and state_file is not None:
            # Preempted: the job requeues itself and continues this very trial (same number).
            trial.set_user_attr("suspended_at", time.time())
            atomic_write_json(state_file, {"trial_id": trial._trial_id, "number": trial.number, "study": spec.name})
            log.warning("trial %d suspended at its checkpoint; the requeued job continues it", trial.number)
            return SUSPENDED
        stop.set()  # SIGTERM: this worker is going away; another worker continues from the checkpoint
        summary["status"] = "stopped"
    if callback.pruned:
        tell(study, trial, state=TrialState.PRUNED)
        return "PRUNED"
    if summary["status"] == "stopped" and stop.is_set():
        # Interrupted (SIGTERM/SIGINT): fail it and queue a retry that resumes from the checkpoint,
        # so stopping a study loses nothing and runs nothing twice.
        trial.set_user_attr("fail_reason", "interrupted; retried from its checkpoint")
        tell(study, trial, state=TrialState.FAIL)
        enqueue_retry(study, study.trials[trial.number], "interrupted", count_as_retry=False)
        return "INTERRUPTED"
    value = spec.objective_value(callback.history)
    if value is None:
        trial.set_user_attr("fail_reason", f"objective metric {spec.objective.metric!r} never reported")
        trial.set_user_attr("failed_by_itself", True)
        tell(study, trial, state=TrialState.FAIL)
        return "FAIL"
    tell(study, trial, value)
    return "COMPLETE"


def suspended_trial(study: optuna.Study, state_file: Path | None) -> optuna.Trial | None:
    """The trial this worker suspended before its job was requeued, if it is still ours to continue."""
    if state_file is None or not Path(state_file).is_file():
        return None
    state = json.loads(Path(state_file).read_text())
    Path(state_file).unlink()
    frozen = next((t for t in study.get_trials(deepcopy=False) if t._trial_id == state["trial_id"]), None)
    if frozen is None or frozen.state != TrialState.RUNNING or frozen.user_attrs.get("suspended_at") is None:
        log.warning("trial %s was taken over while this job was away; asking for a new one", state.get("number"))
        return None
    log.info("continuing suspended trial %d", frozen.number)
    return optuna.trial.Trial(study, frozen._trial_id)


def run_worker(
    study: str, root: str | None = None, index: int = 0, max_trials: int | None = None,
    guard: Callback | None = None, state_file: str | Path | None = None,
) -> dict[str, int]:
    """Run trials until the study's budget is used up (or ``max_trials`` here, or SIGTERM).

    With a ``guard`` (a launcher's preemption guard) a signal stops the trial mid-epoch; with a
    ``state_file`` a preempted trial is suspended there and continued when the worker restarts.
    """
    handle = StudyHandle.load(study, root)
    spec = handle.spec
    stop = threading.Event()
    state_path = Path(state_file) if state_file else None

    def on_signal(signum, frame):  # finish the current epoch, checkpoint, then stop
        log.warning("worker %d: signal %d, stopping after this epoch", index, signum)
        stop.set()

    if guard is None:
        signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A slot of its own (>= index) for this process: concurrent, restarted and requeued workers never
    # share a sampler seed stream, while a fresh study's single worker 0 stays reproducible (slot 0).
    slot = handle.claim_worker_slot(index)
    base_seed = spec.sampler.get("seed")
    sampler_seed = None if base_seed is None else int(base_seed) + slot
    log.info("worker %d: slot %d, sampler seed %s", index, slot, sampler_seed)
    optuna_study = handle.study(seed_offset=slot)
    counts: dict[str, int] = {}
    grace = float(spec.heartbeat.get("grace_s", 120))
    suspend_grace = float(spec.heartbeat.get("suspend_grace_s", 1800))
    max_retries = int(spec.retry.get("max_retries", 0))
    max_failures = failure_limit(spec)
    resumed = suspended_trial(optuna_study, state_path)
    if resumed is not None:
        state = run_trial(handle, optuna_study, resumed, stop, guard, state_path)
        counts[state] = counts.get(state, 0) + 1
    while not stop.is_set() and SUSPENDED not in counts and (max_trials is None or sum(counts.values()) < max_trials):
        if guard is not None and guard.interrupt_requested():
            break
        reap(optuna_study, grace, max_retries, suspend_grace_s=suspend_grace)
        if not budget_left(optuna_study, spec.n_trials):
            break
        if too_many_failures(optuna_study, max_failures):
            log.error("stopping: %d trials failed by themselves; see `ickd sweep status %s`", max_failures, spec.name)
            break
        trial = optuna_study.ask(fixed_distributions=spec.space)
        trial.set_user_attr("worker_slot", slot)
        trial.set_user_attr("sampler_seed", sampler_seed)
        try:
            if over_budget(optuna_study, trial, spec.n_trials):
                trial.set_user_attr("fail_reason", "not run: the study's budget was used up by other workers")
                trial.set_user_attr("skipped", True)
                tell(optuna_study, trial, state=TrialState.FAIL)
                break
            state = skip_duplicate(optuna_study, trial) or run_trial(handle, optuna_study, trial, stop, guard, state_path)
        except StudyDone:
            break
        counts[state] = counts.get(state, 0) + 1
    log.info("worker %d (slot %d) done: %s", index, slot, counts or "no trial left")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ickd.sweep.worker", description="run trials of a study until its budget is used up")
    parser.add_argument("study")
    parser.add_argument("--root", default=None)
    parser.add_argument("--index", type=int, default=0, help="worker index: the first worker slot it tries to claim (its sampler seed is sampler.seed + the claimed slot)")
    parser.add_argument("--max-trials", type=int, default=None)
    parser.add_argument("--state-file", default=None, help="(launchers) where a preempted trial is suspended; enables mid-epoch stops on USR2/TERM")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker{args.index} %(levelname)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    guard = None
    if args.state_file:
        guard = PreemptionGuard().install()
    try:
        counts = run_worker(args.study, args.root, args.index, args.max_trials, guard=guard, state_file=args.state_file)
    except IckdError as exc:
        log.error("%s", exc)
        sys.exit(2)
    interrupted = guard is not None and guard.interrupt_requested()
    if not interrupted:
        try:
            raise_if_stopped_for_failures(args.study, args.root)
        except TrialsFailedError as exc:  # exit 1: the trials failed (exit 2 is for errors in the user's input)
            log.error("%s", exc)
            sys.exit(1)
    if interrupted:
        sys.exit(EXIT_INTERRUPTED if SUSPENDED in counts or guard.requeue_requested else 0)


if __name__ == "__main__":
    main()
