"""ETAs of a study's trials and of the study (``ickd sweep status``, ``ickd jobs status``).

A trial's ETA comes from its run folder's ``progress.json`` (written by the trainer; the folder is
the trial's ``run_dir`` user attribute). The study's follows :func:`ickd.engine.progress.combined_eta`:
the trials still to start (budget minus finished and running ones, at least the queued retries)
at the mean duration of the finished (complete or pruned) trials, plus the running trials' ETAs,
shared among the workers alive (one per running trial), and never less than the longest running
trial's ETA.
"""
from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from ickd.engine.progress import combined_eta, eta_now, format_duration, read_progress

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def trial_eta(trial: optuna.trial.FrozenTrial) -> float | None:
    """Seconds left of a running trial (None when its run has no progress.json yet)."""
    if trial.state != TrialState.RUNNING:
        return None
    return eta_now(read_progress(trial.user_attrs.get("run_dir")))


def trial_duration(trial: optuna.trial.FrozenTrial) -> float | None:
    if trial.state not in FINISHED or trial.datetime_start is None or trial.datetime_complete is None:
        return None
    if trial.user_attrs.get("duplicate_of") is not None:
        return None  # not trained: told a duplicate's value at once
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def study_eta_of(trials: list[optuna.trial.FrozenTrial], n_trials: int) -> tuple[float | None, str]:
    """(seconds left or None, how it was estimated) for a study with budget ``n_trials``."""
    trials = [t for t in trials if not t.user_attrs.get("skipped")]
    finished = sum(t.state in FINISHED for t in trials)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    queued = max(waiting, n_trials - finished - len(running))
    durations = [d for d in (trial_duration(t) for t in trials) if d is not None]
    mean = sum(durations) / len(durations) if durations else None
    eta = combined_eta([trial_eta(t) for t in running], queued, mean)
    how = f"{len(running)} running, {queued} to start"
    if queued and not running:
        how += ", no worker running"
    elif queued:
        how += f" at the mean trial's {format_duration(mean)}" if mean is not None else ", no trial finished yet to time them"
    return eta, how


def study_eta(handle: Any) -> tuple[float | None, str]:
    """:func:`study_eta_of` for a :class:`ickd.sweep.studies.StudyHandle`."""
    return study_eta_of(handle.study().get_trials(deepcopy=False), handle.spec.n_trials)
