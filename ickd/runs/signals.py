"""Cooperative preemption: a signal asks the trainer to stop after the current batch.

submitit's own USR2 handler checkpoints and requeues *at once*, in the middle of whatever the
process is doing. ickd's guard takes the signal instead, lets the trainer finish its batch and save
a mid-epoch checkpoint, and only then hands over to submitit's handler (captured at install time),
which requeues the job. SIGTERM (``scancel``, a bare ``scontrol requeue``) also gets a checkpoint
but no requeue from us: SLURM decides what happens next, and every start resumes from disk anyway.
Every step is appended to the run folder's events file (``RunDir.events``): the preemption timeline.

Neutral (below the core): the guard implements the trainer's callback protocol
(:class:`ickd.engine.Callback`'s methods) without importing the engine; the trainer only calls
those methods.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ickd
from ickd.runs import slurm
from ickd.runs.rundir import RunDir

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR2


def slurm_context() -> dict[str, Any]:
    return {"job_id": slurm.job_id(), "restart_count": slurm.restart_count(), "host": os.uname().nodename, "pid": os.getpid()}


def append_event(folder: str | os.PathLike | None, event: str, **fields: Any) -> None:
    if folder is None:
        return
    RunDir(folder).append_event({"event": event, "t": time.time(), **slurm_context(), **fields})


class PreemptionGuard:
    """Install in the process that trains; pass to ``train(..., callbacks=[guard])``."""

    def __init__(self, signals: tuple[int, ...] = (REQUEUE_SIGNAL, signal.SIGTERM)) -> None:
        self.signals = signals
        self.previous: dict[int, Any] = {}
        self.signum: int | None = None
        self.signal_time: float | None = None
        self.out_dir: Path | None = None
        self._pending: list[tuple[int, float]] = []

    # --- signals --------------------------------------------------------------------------------
    def install(self) -> "PreemptionGuard":
        for sig in self.signals:
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only note it: the training loop polls interrupt_requested() after every batch.
        if self.signum is None or signum == REQUEUE_SIGNAL:
            self.signum, self.signal_time = signum, time.time()
        self._pending.append((signum, time.time()))

    @property
    def requeue_requested(self) -> bool:
        return self.signum == REQUEUE_SIGNAL

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    # --- trainer callback -----------------------------------------------------------------------
    def on_run_start(self, run: Any) -> None:
        self.out_dir = Path(run.out_dir)
        # code: which code this start runs (the launch's snapshot, not a later edit of the checkout)
        append_event(self.out_dir, "start", epoch=run.start_epoch, batch=int(run.extra.get("start_batch", 0)), code=str(Path(ickd.__file__).parent))
        self._flush_signals()

    def _flush_signals(self) -> None:
        while self._pending and self.out_dir is not None:
            signum, at = self._pending.pop(0)
            append_event(self.out_dir, "signal", signal=signal.Signals(signum).name, signal_t=at)

    def interrupt_requested(self) -> bool:
        return self.signum is not None

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def on_checkpoint(self, path: Path, epoch: int) -> None:
        if self.signum is not None:
            self._flush_signals()
            append_event(self.out_dir, "checkpoint", epoch=epoch, path=str(path))

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self._flush_signals()
        append_event(self.out_dir, "end", status=summary.get("status"), epochs_completed=summary.get("epochs_completed"))

    # --- after the run --------------------------------------------------------------------------
    def hand_over(self, folder: str | os.PathLike | None = None) -> None:
        """After an interrupted run: let submitit's USR2 handler (if one was installed before us)
        checkpoint the job's callable and requeue; it exits the process. Without one (not under
        submitit, or SIGTERM) this returns and the caller decides."""
        handler: Callable | Any = self.previous.get(REQUEUE_SIGNAL)
        if self.requeue_requested and callable(handler):
            append_event(folder or self.out_dir, "requeue")
            log.warning("requeueing after %s", self.signal_name)
            try:
                handler(REQUEUE_SIGNAL, None)
            except subprocess.CalledProcessError as exc:
                # Partition-priority preemption requeues the job itself; `scontrol requeue` then fails.
                log.warning("scontrol requeue failed (%s): SLURM is requeueing the job itself", exc)
                sys.exit(1)
