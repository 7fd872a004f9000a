"""W&B tracking as a trainer callback: one W&B run per training run or study trial.

The core never imports wandb; this module imports it only when a run starts (``on_run_start``),
so ``logger=none`` costs nothing. Decisions (docs/design.md, "Tracking (W&B)"):

- the W&B run id is given by the layer above (sweep trial, launch) or persisted in the run folder
  (``wandb_run_id``), and ``resume="allow"``: a requeued or resumed job continues the same W&B run;
- each epoch is logged once, at ``step=epoch``; the last logged epoch is persisted
  (``wandb_last_epoch``) so a resume neither logs an epoch twice nor leaves one out;
- mode ``auto`` is online only when an API key is configured, otherwise offline (``ickd wandb sync``
  uploads later); env ``WANDB_MODE`` always wins;
- secrets never reach the W&B config (:func:`redact`).
"""
from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

from ickd.engine.callbacks import Callback, RunInfo
from ickd.engine.run import to_container
from ickd.errors import ConfigError
from ickd.runs import slurm
from ickd.runs.atomic import atomic_write_text
from ickd.runs.rundir import RunDir
from ickd.naming import slug
from ickd.redaction import REDACTED, is_secret_key, redact, redact_argv, redact_value  # noqa: F401 (re-exported)

log = logging.getLogger("ickd.track")

RUN_ID_FILE = RunDir.WANDB_RUN_ID  # the file names are RunDir's
LAST_EPOCH_FILE = RunDir.WANDB_LAST_EPOCH
MODES = ("online", "offline", "disabled")
_ENV_MODE_ALIASES = {"dryrun": "offline", "run": "online", "shared": "online"}
DEFAULT_HOST = "https://api.wandb.ai"

# --- secrets ----------------------------------------------------------------------------------

# One rule for secrets, shared with the storage URLs of studies: ickd/redaction.py (REDACTED,
# is_secret_key, redact, redact_argv, redact_value are imported from there and re-exported).


def flatten(data: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"memory": {"k": 4}}`` -> ``{"memory.k": 4}`` (lists stay values), so W&B can filter and
    group runs by any config key."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name, sep))
        else:
            out[name] = dict(value) if isinstance(value, Mapping) else value
    return out


# --- mode -------------------------------------------------------------------------------------

def api_key_configured(env: Mapping[str, str] | None = None) -> bool:
    """True when W&B would find an API key: WANDB_API_KEY, or a netrc entry for the W&B host
    (WANDB_BASE_URL, default api.wandb.ai; netrc file from NETRC or ~/.netrc)."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or DEFAULT_HOST).hostname or ""
    path = Path(env.get("NETRC") or Path(env.get("HOME") or Path.home()) / ".netrc")
    if not path.is_file():
        return False
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError) as exc:
        log.warning("cannot read %s (%s); assuming no W&B API key", path, exc)
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str | None = "auto", env: Mapping[str, str] | None = None) -> str:
    """online | offline | disabled. Env WANDB_MODE wins; ``auto`` is online only with an API key."""
    env = os.environ if env is None else env
    forced = (env.get("WANDB_MODE") or "").strip().lower()
    if forced:
        forced = _ENV_MODE_ALIASES.get(forced, forced)
        if forced not in MODES:
            raise ConfigError(f"WANDB_MODE={env.get('WANDB_MODE')!r} is not a W&B mode; use one of {', '.join(MODES)} or unset it")
        return forced
    mode = str(mode or "auto").strip().lower()
    if mode == "auto":
        return "online" if api_key_configured(env) else "offline"
    if mode not in MODES:
        raise ConfigError(f"logger.mode={mode!r} is not valid; use auto, {', '.join(MODES)}")
    return mode


# --- ids and provenance -----------------------------------------------------------------------

_VALID_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_run_id(run_id: str) -> str:
    if not _VALID_ID.match(run_id):
        raise ConfigError(f"W&B run id {run_id!r} is not valid: use 1-64 letters, digits, '-' or '_' (ickd.naming.run_id makes one)")
    return run_id


def read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def git_commit(out_dir: Path) -> str | None:
    """The commit the code came from: a launch's manifest (jobs run a code snapshot, not a checkout)
    above the run folder, else ``git rev-parse HEAD`` of the package's source tree."""
    for parent in [out_dir, *out_dir.parents][:6]:
        manifest = parent / "manifest.json"
        if manifest.is_file():
            try:
                commit = (json.loads(manifest.read_text()).get("code") or {}).get("git_commit")
            except (OSError, ValueError, AttributeError):
                commit = None
            if commit:
                return str(commit)
    source = Path(__file__).resolve().parent.parent.parent
    try:
        proc = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def numeric(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --- the callback -----------------------------------------------------------------------------

class WandbLogger(Callback):
    """Logs one training run to W&B (rank 0 only: the trainer calls callbacks on rank 0)."""

    def __init__(
        self,
        project: str = "ickd",
        entity: str | None = None,
        *,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        mode: str = "auto",
        run_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
        log_model: bool = False,
        log_checkpoints: bool = False,
        notes: str | None = None,
        on_init: Callable[[str], None] | None = None,
    ) -> None:
        self.project, self.entity, self.group, self.job_type = project, entity, group, job_type
        self.tags = [str(t) for t in (tags or [])]
        self.mode = mode
        self.explicit_id = check_run_id(run_id) if run_id else None
        self.extra = dict(extra or {})
        self.log_model = bool(log_model)
        self.log_checkpoints = bool(log_checkpoints)
        self.notes = notes
        self.on_init = on_init
        self.run: Any = None
        self.run_id: str | None = None
        self._run_path: str | None = None
        self.out_dir: Path | None = None
        self.last_epoch = 0

    @property
    def run_path(self) -> str | None:
        """``entity/project/id`` (``project/id`` offline without an entity), once the run started."""
        return self._run_path

    # ids ---------------------------------------------------------------------------------------
    def _choose_id(self, run: RunInfo) -> str:
        id_file = run.out_dir / RUN_ID_FILE
        stored = id_file.read_text().strip() if id_file.is_file() else None
        restarted = run.start_epoch == 0 and not run.extra.get("start_batch") and read_int(run.out_dir / LAST_EPOCH_FILE) > 0
        if self.explicit_id:
            run_id = self.explicit_id
        elif stored and not restarted:
            run_id = check_run_id(stored)
        else:  # a new run, or this folder's run started over from scratch (trainer.resume=never)
            run_id = f"{slug(run.name, 40)}-{secrets.token_hex(4)}"
        if run_id != stored:
            atomic_write_text(id_file, run_id + "\n")
        if restarted or run_id != stored:
            atomic_write_text(run.out_dir / LAST_EPOCH_FILE, "0\n")
        return run_id

    def _config(self, run: RunInfo) -> dict[str, Any]:
        config = flatten(redact(run.config))
        extra = {"run.name": run.name, "run.stage": run.stage, "run.out_dir": str(run.out_dir), **slurm.tracker_ids()}
        commit = git_commit(run.out_dir)
        if commit:
            extra["git.commit"] = commit
        extra.update(flatten(redact(self.extra)))
        return {**config, **extra}

    # callback ----------------------------------------------------------------------------------
    def on_run_start(self, run: RunInfo) -> None:
        try:
            import wandb  # lazily: only runs with logger=wandb need it
        except ImportError as exc:
            raise ConfigError(f"logger=wandb needs the wandb package ({exc}); install it with `pip install -e '.[wandb]'` or use logger=none") from exc

        self.out_dir = Path(run.out_dir)
        self.run_id = self._choose_id(run)
        self.last_epoch = read_int(self.out_dir / LAST_EPOCH_FILE)
        mode = resolve_mode(self.mode)
        kwargs = dict(
            project=self.project, entity=self.entity or None, group=self.group or None, job_type=self.job_type or run.stage,
            name=run.name, tags=self.tags or None, notes=self.notes, id=self.run_id, resume="allow", dir=str(self.out_dir),
            config=self._config(run), reinit="create_new",
        )
        # W&B records the command line (sys.argv) in the run's metadata: hide secrets given as
        # Hydra overrides there too, for the duration of init (when the settings are captured).
        argv, sys.argv = sys.argv, redact_argv(sys.argv)
        try:
            try:
                self.run = wandb.init(mode=mode, **kwargs)
            except Exception as exc:
                if mode != "online":
                    raise
                # A W&B outage must not cost a training run: keep the data locally for `ickd wandb sync`.
                log.error("W&B online init failed (%s); logging offline instead, upload later with `ickd wandb sync %s`", exc, self.out_dir)
                self.run = wandb.init(mode="offline", **kwargs)
        finally:
            sys.argv = argv
        # Plot everything against the epoch, not W&B's internal step.
        self._run_path = "/".join(p for p in (self.entity or getattr(self.run, "entity", None) or None, self.project, self.run_id) if p)
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        log.info("W&B run %s (%s) in %s", self.run_path, mode, RunDir(self.out_dir).wandb_dir)
        self._backfill(run)
        if self.on_init is not None and self.run_path:
            self.on_init(self.run_path)

    def _backfill(self, run: RunInfo) -> None:
        """Epochs in the run's metrics file (rewritten from the checkpoint on resume) that W&B has
        not seen yet, e.g. when the job died between the checkpoint and the log call."""
        metrics = RunDir(self.out_dir).metrics if self.out_dir else None
        if run.start_epoch <= self.last_epoch or metrics is None or not metrics.is_file():
            return
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            epoch = int(row.get("epoch", 0))
            if self.last_epoch < epoch <= run.start_epoch:
                self._log(epoch, row)

    def _log(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        data = numeric(metrics)
        data["epoch"] = epoch
        self.run.log(data, step=epoch)
        for key in ("step_mode", "step_fallback"):  # strings (history logs numbers): the run summary
            if isinstance(metrics.get(key), str):
                self.run.summary[key] = metrics[key]
        self.last_epoch = epoch
        atomic_write_text(self.out_dir / LAST_EPOCH_FILE, f"{epoch}\n")

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.run is None or epoch <= self.last_epoch:
            return  # already logged before an interruption (the epoch ran again after the checkpoint)
        self._log(epoch, metrics)

    # artifacts (logger.log_checkpoints, logger.log_model) ----------------------------------------
    def checkpoint_artifact_name(self) -> str:
        """``<run id>-last``: what ``trainer.resume=wandb:<entity>/<project>/<run id>-last:latest`` fetches."""
        return f"{self.run_id}-last"

    def model_artifact_name(self) -> str:
        return f"model-{self.run_id}"

    def _upload(self, path: Path, name: str, kind: str, aliases: list[str], metadata: Mapping[str, Any]) -> None:
        """Log ``path`` as version of artifact ``name``. The file is copied (staged) at once, so a
        later save to the same path does not change what is uploaded; offline runs keep the staged
        copy (under WANDB_DATA_DIR) until ``ickd wandb sync``. A failed upload never stops training."""
        import wandb

        try:
            artifact = wandb.Artifact(name, type=kind, metadata={k: v for k, v in metadata.items() if v is not None})
            artifact.add_file(str(path), name=path.name)
            self.run.log_artifact(artifact, aliases=aliases)
        except Exception as exc:
            log.warning("could not log %s as W&B artifact %s (%s); training goes on", path, name, exc)

    def on_checkpoint(self, path: Path, epoch: int) -> None:
        """``last.pt`` after each save as artifact ``<run id>-last`` (type checkpoint), aliases
        ``latest`` and ``epoch-<n>`` (n epochs completed; a mid-epoch checkpoint written at a
        preemption carries the n of the epochs before it and takes the aliases over)."""
        if self.run is None or not self.log_checkpoints or not Path(path).is_file():
            return
        self._upload(Path(path), self.checkpoint_artifact_name(), "checkpoint", ["latest", f"epoch-{int(epoch)}"],
                     {"epoch": int(epoch), "run_id": self.run_id, "run_path": self.run_path, "out_dir": str(self.out_dir)})

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        status = str(summary.get("status"))
        try:
            total = self._total_time()
            values = {
                "status": status,
                "best_top1": summary.get("best_top1"),
                "last_top1": summary.get("last_top1"),
                "last_top5": summary.get("last_top5"),
                # Holdout and test side by side (ickd.engine.trainer: val = the selection split).
                "selection_split": summary.get("selection_split"),
                "best_holdout_top1": summary.get("best_holdout_top1"),
                "last_holdout_top1": summary.get("last_holdout_top1"),
                "test_top1_at_best": summary.get("test_top1_at_best"),
                "best_test_top1": summary.get("best_test_top1"),
                "last_test_top1": summary.get("last_test_top1"),
                "epochs_completed": summary.get("epochs_completed"),
                "epochs": summary.get("epochs"),
                "wall_time_s": summary.get("wall_time_s"),  # this attempt
                "total_time_s": total,                       # all epochs, across resumes
            }
            self.run.summary.update({k: v for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))})
            best = Path(str(summary.get("best_checkpoint") or ""))
            # best.pt: with log_model when the run completed; with log_checkpoints whenever the run
            # ends (a preempted run's best is worth keeping too). One artifact either way.
            if best.is_file() and ((self.log_model and status == "completed") or self.log_checkpoints):
                self._upload(best, self.model_artifact_name(), "model", ["best", "latest"],
                             {"best_top1": summary.get("best_top1"), "status": status, "run_id": self.run_id})
            if status == "interrupted":
                self.run.mark_preempting()  # W&B shows it as preempted, not crashed; the requeue resumes it
        finally:
            self.run.finish(exit_code=0 if status in ("completed", "stopped", "interrupted") else 1)
            self.run = None

    def _total_time(self) -> float | None:
        path = RunDir(self.out_dir).metrics if self.out_dir else None
        if path is None or not path.is_file():
            return None
        total = 0.0
        for line in path.read_text().splitlines():
            try:
                total += float(json.loads(line).get("time/epoch_s") or 0.0)
            except (ValueError, TypeError, AttributeError):
                continue
        return total


# --- from the run config ----------------------------------------------------------------------

def logger_section(config: Mapping[str, Any]) -> dict[str, Any]:
    section = to_container(config).get("logger") or {}
    if isinstance(section, str):  # logger=wandb given as a plain value somewhere
        section = {"name": section}
    return dict(section)


def loggers_for(
    config: Mapping[str, Any],
    out_dir: str | os.PathLike | None = None,
    *,
    run_id: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    on_init: Callable[[str], None] | None = None,
) -> list[Callback]:
    """The tracking callbacks the run config asks for (its ``logger`` group): ``[]`` for
    ``logger=none`` (or no logger key), ``[WandbLogger]`` for ``logger=wandb``. ``run_id``, ``group``,
    ``job_type`` and ``tags`` come from the layer above (sweep trial, launch): the run id is theirs,
    but the user's ``logger.group`` / ``logger.job_type`` win (the platform's values only fill them
    when they are null) and the platform's tags are added to the user's ``logger.tags``.
    ``on_init(run_path)`` is called once the W&B run started. ``out_dir`` is where the run trains
    (the logger takes it from the trainer; accepted for symmetry and checks)."""
    section = logger_section(config)
    name = str(section.get("name") or "none").lower()
    if name in ("none", "null", "off", "false"):
        return []
    if name != "wandb":
        raise ConfigError(f"logger.name={name!r} is unknown; use logger=none or logger=wandb")
    known = {"name", "project", "entity", "group", "tags", "mode", "job_type", "log_model", "log_checkpoints", "notes"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"unknown logger keys {unknown}; valid keys: {sorted(known)}")
    return [
        WandbLogger(
            project=str(section.get("project") or "ickd"),
            entity=section.get("entity") or None,
            group=section.get("group") or group or None,
            job_type=section.get("job_type") or job_type or None,
            tags=list(dict.fromkeys([*(str(t) for t in section.get("tags") or []), *(tags or [])])),
            mode=str(section.get("mode") or "auto"),
            run_id=run_id,
            extra=extra,
            log_model=bool(section.get("log_model", False)),
            log_checkpoints=bool(section.get("log_checkpoints", False)),
            notes=section.get("notes") or None,
            on_init=on_init,
        )
    ]


def platform_tag(key: str, value: Any) -> str:
    """``study:<name>``, ``trial:<n>``, ``launch:<name>``, ``run:<i>``: how the platform marks the runs
    it starts (W&B tags are at most 64 characters)."""
    return f"{key}:{value}"[:64]
