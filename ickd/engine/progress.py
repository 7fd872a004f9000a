"""Progress of a run: log lines at a fixed interval and the run folder's ``progress.json``.

Off a terminal (every SLURM job, every log file) a tqdm bar is useless, so the trainer logs one line
every ``trainer.progress_interval_s`` seconds inside an epoch: epoch, batch, images/s, elapsed time
and the ETA of the whole run. The same numbers go to ``<run folder>/progress.json`` (atomically, at
each tick and epoch end), which `ickd jobs status` and `ickd sweep status` read to show ETAs.

The hot loop only pays a ``time.monotonic()`` comparison per batch: no host synchronisation.

ETA rule (docs/design.md, "Progress and ETAs"): remaining training batches (the rest of this epoch
plus the remaining epochs) at the batch rate measured in this process, plus the remaining evaluations
at their measured mean duration (before the first one: the evaluated images at a third of the time
per training image, a forward pass against forward+backward).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ickd.engine.checkpoint import atomic_write_json
from ickd.runs.rundir import RunDir

PROGRESS_FILE = RunDir.PROGRESS
# Statuses a progress.json holds while its run is alive; the run's end writes result.json's status.
LIVE_STATUSES = ("starting", "filling", "training", "evaluating")


def format_duration(seconds: float | None) -> str:
    """``95`` -> ``1m35s``, ``7300`` -> ``2h01m``, ``200000`` -> ``2d07h``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def read_progress(run_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The run folder's progress.json, or None (no folder, no file yet, unreadable)."""
    if not run_dir:
        return None
    try:
        data = json.loads(RunDir(run_dir).progress.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def eta_now(progress: dict[str, Any] | None, now: float | None = None) -> float | None:
    """Seconds left for a live run, from its progress.json: the written ETA minus the time since it
    was written (at least 0); 0 for a completed run; None when unknown or the run is not live."""
    if not progress:
        return None
    status = progress.get("status")
    if status == "completed":
        return 0.0
    eta = progress.get("eta_s")
    if status not in LIVE_STATUSES or not isinstance(eta, (int, float)):
        return None
    written = progress.get("updated_unix")
    age = (now if now is not None else time.time()) - written if isinstance(written, (int, float)) else 0.0
    return max(0.0, float(eta) - max(0.0, age))


def combined_eta(running: list[float | None], queued: int, mean_duration: float | None) -> float | None:
    """ETA of a group of runs (a launch's runs, a study's trials), from the ETAs of the running ones
    (None: not known yet), the number still to start and the mean duration of finished ones:

        max(longest running ETA, (sum of running ETAs + queued x mean duration) / running)

    i.e. the remaining work shared among as many slots as are busy now, never less than the longest
    running one. A running one without an ETA counts the mean duration. 0 when nothing is left;
    None when it cannot be known: work is queued but nothing runs (no slot to estimate from) or no
    run finished yet (no duration to estimate from)."""
    if not running and queued <= 0:
        return 0.0
    if queued > 0 and (mean_duration is None or not running):
        return None
    etas = [r if r is not None else mean_duration for r in running]
    if any(e is None for e in etas):
        return None
    longest = max(etas)  # type: ignore[type-var]
    work = sum(etas) + max(0, queued) * (mean_duration or 0.0)  # type: ignore[arg-type]
    return max(longest, work / len(etas))  # type: ignore[arg-type]


class ProgressTracker:
    """Measures throughput, estimates the run's ETA, logs progress lines and writes progress.json.

    ``path`` None (ranks other than 0) turns the file off; ``log_lines`` False turns the lines off
    (a tqdm bar shows progress, or trainer.progress=off). ``interval_s`` 0 disables the in-epoch
    ticks (progress.json is then written at phase changes and epoch ends only).
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        *,
        epochs: int,
        eval_every: int,
        interval_s: float,
        log_lines: bool,
        logger: logging.Logger,
        eval_images: int = 0,
        world_size: int = 1,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.epochs = int(epochs)
        self.eval_every = max(1, int(eval_every))
        self.interval_s = float(interval_s or 0.0)
        self.log_lines = bool(log_lines)
        self.log = logger
        self.eval_images = int(eval_images)
        self.world_size = max(1, int(world_size))
        self.active = self.path is not None or self.log_lines
        self._t0 = time.monotonic()
        self._next = math.inf
        # Measured in this process: training time and batches/images of finished epochs...
        self._train_s = 0.0
        self._train_batches = 0
        self._train_images = 0
        # ... of the epoch in flight ...
        self._epoch = 0
        self._batches = 0
        self._epoch_t0 = 0.0
        self._epoch_batches = 0
        self._epoch_images = 0
        self._batch = 0
        self._in_epoch = False
        self._evaluated = False
        # ... and of the evaluations.
        self._eval_s: list[float] = []
        self._eval_t0: float | None = None
        self._write_failed = False

    # --- phases ----------------------------------------------------------------------------------
    def start(self, epochs_done: int, batches: int) -> None:
        """The run (or its resumed part) starts after ``epochs_done`` completed epochs."""
        self._t0 = time.monotonic()
        self._epoch, self._batches, self._batch, self._in_epoch = epochs_done, batches, 0, False
        self.write("starting")

    def phase(self, status: str) -> None:
        """A phase without batch ticks (``filling``, ``evaluating``) started; written at once."""
        if status == "evaluating":
            self._eval_t0 = time.monotonic()
        self.write(status)

    def epoch_started(self, epoch: int, batches: int, first: int = 0) -> None:
        """Epoch ``epoch`` (0-based) starts, or continues after batch ``first`` (a resume)."""
        self._epoch, self._batches, self._batch, self._in_epoch, self._evaluated = epoch, batches, first, True, False
        self._epoch_batches = self._epoch_images = 0
        self._epoch_t0 = time.monotonic()
        self._next = self._epoch_t0 + self.interval_s if self.interval_s > 0 and self.active else math.inf

    def batch_done(self, batch: int, images: int) -> None:
        """After each training batch (``batch`` done in this epoch): cheap unless a tick is due."""
        self._batch = batch
        self._epoch_batches += 1
        self._epoch_images += images
        if time.monotonic() >= self._next:
            self._tick()

    def epoch_trained(self) -> None:
        """The epoch's batches are done (evaluation may follow)."""
        self._train_s += time.monotonic() - self._epoch_t0
        self._train_batches += self._epoch_batches
        self._train_images += self._epoch_images
        self._epoch_batches = self._epoch_images = 0
        self._next = math.inf

    def eval_done(self) -> None:
        if self._eval_t0 is not None:
            self._eval_s.append(time.monotonic() - self._eval_t0)
            self._eval_t0 = None
            self._evaluated = True

    def epoch_end(self, epochs_done: int) -> float | None:
        """Epoch ``epochs_done`` (1-based) is complete, checkpoint included; returns the run's ETA."""
        self._epoch, self._batch, self._in_epoch, self._evaluated = epochs_done, self._batches, False, False
        self.write("training")
        return self.eta()

    def finish(self, status: str) -> None:
        """The run ended with ``status`` (result.json's): ETA 0 when completed, else unknown."""
        self._eval_t0 = None
        self.write(status, final=True)

    # --- numbers ---------------------------------------------------------------------------------
    def _rates(self) -> tuple[float | None, float | None]:
        """(batches/s, images/s of all ranks) of training in this process so far."""
        live = time.monotonic() - self._epoch_t0 if self._epoch_batches else 0.0
        seconds = self._train_s + live
        batches = self._train_batches + self._epoch_batches
        images = self._train_images + self._epoch_images
        if batches == 0 or seconds <= 0:
            return None, None
        return batches / seconds, images * self.world_size / seconds

    def eta(self) -> float | None:
        """Seconds until the run ends (see the module docstring); None before the first batch."""
        batch_rate, image_rate = self._rates()
        if batch_rate is None:
            return None
        if self._in_epoch:
            remaining = self._batches - self._batch + self._batches * max(0, self.epochs - self._epoch - 1)
            first_eval = self._epoch + 1 if self._evaluated else self._epoch
        else:
            remaining = self._batches * max(0, self.epochs - self._epoch)
            first_eval = self._epoch
        evals = sum(1 for e in range(first_eval, self.epochs) if (e + 1) % self.eval_every == 0 or e + 1 == self.epochs)
        if self._eval_s:
            per_eval = sum(self._eval_s) / len(self._eval_s)
        else:
            per_eval = self.eval_images / (3.0 * image_rate) if image_rate else 0.0
        eta = remaining / batch_rate + evals * per_eval
        if self._eval_t0 is not None:  # the evaluation in flight has partly run
            eta -= min(per_eval, time.monotonic() - self._eval_t0)
        return max(0.0, eta)

    def snapshot(self, status: str, final: bool = False) -> dict[str, Any]:
        _, image_rate = self._rates()
        if final:
            eta = 0.0 if status == "completed" else None
        else:
            eta = self.eta()
        return {
            "status": status,
            "epoch": min(self.epochs, self._epoch + 1) if self._in_epoch else self._epoch,  # in flight (1-based), else completed
            "epochs": self.epochs,
            "batch": self._batch,
            "batches": self._batches,
            "images_per_s": round(image_rate, 1) if image_rate else None,
            "elapsed_s": round(time.monotonic() - self._t0, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "updated_unix": round(time.time(), 3),
        }

    # --- output ----------------------------------------------------------------------------------
    def write(self, status: str, final: bool = False) -> dict[str, Any] | None:
        if self.path is None:
            return None
        snap = self.snapshot(status, final)
        try:
            atomic_write_json(self.path, snap)
        except OSError as exc:  # progress is advisory: a failed write must not stop the run
            if not self._write_failed:
                self.log.warning("cannot write %s (%s); progress is not recorded there", self.path, exc)
                self._write_failed = True
        return snap

    def _tick(self) -> None:
        self._next = time.monotonic() + self.interval_s
        if self.log_lines:
            _, image_rate = self._rates()
            self.log.info(
                "epoch %d/%d batch %d/%d (%d%%) %s img/s elapsed %s eta %s",
                self._epoch + 1, self.epochs, self._batch, self._batches, 100 * self._batch // max(1, self._batches),
                f"{image_rate:.0f}" if image_rate else "-", format_duration(time.monotonic() - self._t0), format_duration(self.eta()),
            )
        self.write("training")
