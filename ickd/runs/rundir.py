"""RunDir: the one owner of a run folder's file names and of their reads and writes.

Modelled on submitit's ``JobPaths``: an object built from a folder that answers "where is X of this
run". No other module spells these names (``tests/test_rundir.py`` checks the package source). A new
file of a run folder is one constant and one property here.

A run folder (``ickd train``'s ``hydra.run.dir``, a launch's ``runs/<run>``, a study's
``trials/<n>``, a compare's ``<row>/seed-<s>``)::

    config.yaml          the resolved run config (written at the start)
    metrics.jsonl        one JSON line per epoch (fsync'ed)
    result.json          the run's summary when it ended (status, best/last top-1, ...)
    progress.json        live epoch/batch, throughput and ETA
    events.jsonl         the preemption timeline (signals, checkpoints, requeues)
    <stage>.log          Hydra's job log (the job name is the stage)
    job.log / train.log  stdout+stderr of a packed child (launch) / a compare run started here
    checkpoints/         last.pt, best.pt, with_bank.pt; wandb/<artifact>/ (downloaded resumes)
    wandb/               the W&B run files; wandb_run_id, wandb_last_epoch: its id and last step

Standard library only (besides ``ickd.runs.atomic``), so the core's trainer uses it too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ickd.runs.atomic import append_line, atomic_write_json, atomic_write_text


class RunDir:
    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    RESULT = "result.json"
    PROGRESS = "progress.json"
    EVENTS = "events.jsonl"
    JOB_LOG = "job.log"
    TRAIN_LOG = "train.log"
    CHECKPOINTS = "checkpoints"
    LAST = "last.pt"
    BEST = "best.pt"
    WITH_BANK = "with_bank.pt"
    WANDB = "wandb"
    WANDB_RUN_ID = "wandb_run_id"
    WANDB_LAST_EPOCH = "wandb_last_epoch"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"RunDir({str(self.folder)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.folder)

    # --- paths ------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.folder / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.folder / self.METRICS

    @property
    def result(self) -> Path:
        return self.folder / self.RESULT

    @property
    def progress(self) -> Path:
        return self.folder / self.PROGRESS

    @property
    def events(self) -> Path:
        return self.folder / self.EVENTS

    @property
    def job_log(self) -> Path:
        return self.folder / self.JOB_LOG

    @property
    def train_log(self) -> Path:
        return self.folder / self.TRAIN_LOG

    def stage_log(self, stage: str) -> Path:
        """Hydra's job log of ``ickd train`` (the job is named after the stage)."""
        return self.folder / f"{stage}.log"

    @property
    def checkpoints(self) -> Path:
        return self.folder / self.CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / self.LAST

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / self.BEST

    @property
    def with_bank_checkpoint(self) -> Path:
        return self.checkpoints / self.WITH_BANK

    @property
    def wandb_dir(self) -> Path:
        return self.folder / self.WANDB

    @property
    def wandb_run_id(self) -> Path:
        return self.folder / self.WANDB_RUN_ID

    @property
    def wandb_last_epoch(self) -> Path:
        return self.folder / self.WANDB_LAST_EPOCH

    @property
    def downloads(self) -> Path:
        """Where resumes from W&B artifacts are downloaded (``checkpoints/wandb``)."""
        return self.checkpoints / self.WANDB

    # --- reads --------------------------------------------------------------------------------------
    def read_result(self) -> dict[str, Any] | None:
        """result.json, or None when it is missing or unreadable."""
        return _read_json(self.result)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The epochs of metrics.jsonl (a torn last line is skipped)."""
        return read_json_lines(self.metrics)

    def read_config(self) -> dict[str, Any]:
        """config.yaml as plain data ({} when missing or unreadable)."""
        import yaml  # pyyaml: a dependency of hydra/omegaconf; imported here, not by the core's import

        try:
            data = yaml.safe_load(self.config.read_text())
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    def status(self) -> str | None:
        return (self.read_result() or {}).get("status")

    def is_completed(self) -> bool:
        return self.status() == "completed"

    def has_started(self) -> bool:
        """Anything of a run here: its config, a metrics line or a checkpoint."""
        return self.config.exists() or self.metrics.exists() or self.last_checkpoint.exists()

    # --- writes -------------------------------------------------------------------------------------
    def write_result(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.result, summary)

    def write_metrics(self, text: str) -> None:
        """Replace metrics.jsonl (atomically) with ``text`` (JSON lines)."""
        atomic_write_text(self.metrics, text)

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        """One fsync'ed line; never a torn line (see :func:`ickd.runs.atomic.append_line`)."""
        append_line(self.metrics, json.dumps(metrics, sort_keys=True) + "\n")

    def append_event(self, record: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.events, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_json_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
