"""The seam between the core trainer and everything above it (tracking, sweeps, launching).

Layers above the core subclass :class:`Callback`; the trainer calls them and knows nothing of W&B,
Optuna or SLURM. A callback may raise from ``on_epoch_end`` (e.g. an Optuna prune): the epoch's
checkpoint and metrics are already on disk by then.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ickd.runs.atomic import append_line


@dataclass
class RunInfo:
    out_dir: Path
    name: str
    stage: str
    config: dict[str, Any]          # the resolved run config
    start_epoch: int = 0            # > 0 when resumed
    total_epochs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Callback:
    def on_run_start(self, run: RunInfo) -> None:
        """Before the first epoch (also after a resume)."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """After an epoch's evaluation and checkpoint."""

    def on_checkpoint(self, path: Path, epoch: int) -> None:
        """After a checkpoint file was written atomically."""

    def should_stop(self) -> bool:
        """Polled after each epoch: True ends the run cleanly after that epoch's checkpoint."""
        return False

    def interrupt_requested(self) -> bool:
        """Polled after every batch (keep it cheap): True saves a mid-epoch checkpoint at once and
        ends the run with ``status='interrupted'``; a later run of the same folder resumes from that
        batch. Launchers use it for preemption and time limits, which cannot wait for the epoch."""
        return False

    def on_run_end(self, summary: dict[str, Any]) -> None:
        """After the run ended, normally or not (``summary['status']`` says how)."""


class MetricsFile(Callback):
    """Per-epoch metrics as JSON lines, one fsync'ed line per epoch."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        # fsync'ed; no torn line (the file keeps its complete lines); a DiskWriteError naming the disk
        append_line(self.path, json.dumps(metrics, sort_keys=True) + "\n")


class CallbackList(Callback):
    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_run_start(self, run):
        for cb in self.callbacks:
            cb.on_run_start(run)

    def on_epoch_end(self, epoch, metrics):
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, metrics)

    def on_checkpoint(self, path, epoch):
        for cb in self.callbacks:
            cb.on_checkpoint(path, epoch)

    def should_stop(self):
        return any(cb.should_stop() for cb in self.callbacks)

    def interrupt_requested(self):
        return any(cb.interrupt_requested() for cb in self.callbacks)

    def on_run_end(self, summary):
        for cb in self.callbacks:
            cb.on_run_end(summary)
