"""Fail (and retry) trials whose worker died: SIGKILL, OOM, node loss.

RDB storages use Optuna's heartbeats (``fail_stale_trials``, retried by
``RetryFailedTrialCallback``); every storage also gets our own liveness check (pid on this host,
heartbeat user attribute from anywhere), which is all journal storage has.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState, create_trial

from ickd.sweep.liveness import worker_is_gone
from ickd.sweep.storage import uses_heartbeats

log = logging.getLogger(__name__)


def retries_of(trial: optuna.trial.FrozenTrial) -> int:
    return int(trial.user_attrs.get("retry_count", 0))


def enqueue_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str, count_as_retry: bool = True) -> int:
    """Add a WAITING copy of ``trial`` (same params, same run folder, so it resumes from the
    folder's newest checkpoint); returns the new trial's number."""
    attrs: dict[str, Any] = {
        "run_dir": trial.user_attrs.get("run_dir"),
        "retry_of": trial.number,
        "retry_count": retries_of(trial) + (1 if count_as_retry else 0),
        "retry_reason": reason,
        "first_trial": trial.user_attrs.get("first_trial", trial.number),
    }
    distributions: dict[str, BaseDistribution] = trial.distributions
    study.add_trial(create_trial(state=TrialState.WAITING, params=trial.params, distributions=distributions, user_attrs=attrs))
    return max(t.number for t in study.get_trials(deepcopy=False))


def fail_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with a reason; False if it finished meanwhile (a race we lost)."""
    storage = study._storage
    try:
        # The reason first: a finished trial accepts no more attributes.
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        return bool(storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False


def reap(study: optuna.Study, grace_s: float, max_retries: int, retry: bool = True, now: float | None = None, suspend_grace_s: float | None = None) -> list[dict]:
    """Fail every RUNNING trial whose worker is gone and, within ``max_retries``, queue a retry."""
    reaped: list[dict] = []
    if uses_heartbeats(study._storage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)  # heartbeat-based; its callback queues retries
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        reaped += [{"number": n, "reason": "stale heartbeat (optuna RDB heartbeat)", "retry": None} for n in sorted(before - after)]
    now = time.time() if now is None else now
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start.timestamp() if trial.datetime_start else None
        reason = worker_is_gone(trial.user_attrs, grace_s, started, now, suspend_grace_s)
        if reason is None or not fail_trial(study, trial, reason):
            continue
        retried = None
        if retry and retries_of(trial) < max_retries:
            retried = enqueue_retry(study, trial, reason)
        log.warning("trial %d failed: %s%s", trial.number, reason, f"; retried as trial {retried}" if retried is not None else "")
        reaped.append({"number": trial.number, "reason": reason, "retry": retried})
    return reaped
