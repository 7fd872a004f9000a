"""A study on disk: ``<root>/<name>/`` holds ``study.yaml`` (the frozen study spec), the journal
storage (by default), one folder per trial (``trials/<number>``), the workers' logs and their slot
claims (``workers/claims/<slot>``)."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from ickd.errors import ConfigError
from ickd.redaction import redact_argv
from ickd.runs.atomic import atomic_write_text
from ickd.runs.roots import studies_root  # noqa: F401  (sweep's callers find the root here)
from ickd.sweep.spec import StudySpec, load_spec
from ickd.sweep.storage import open_storage, redact

SPEC_FILE = "study.yaml"


def resolve_study_dir(study: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """STUDY may be a study folder or a study name under the studies root."""
    direct = Path(study)
    if (direct / SPEC_FILE).is_file():
        return direct
    candidate = studies_root(root) / str(study)
    if (candidate / SPEC_FILE).is_file():
        return candidate
    raise ConfigError(
        f"no study {str(study)!r}: neither {direct}/{SPEC_FILE} nor {candidate}/{SPEC_FILE} exists. "
        "Create it with `ickd sweep create sweeps/<file>.yaml` (or pass --root / set ICKD_STUDIES)"
    )


@dataclass
class StudyHandle:
    dir: Path
    spec: StudySpec
    _storage: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def storage(self):
        if self._storage is None:
            self._storage = open_storage(self.spec.storage, self.dir, self.spec.heartbeat, self.spec.retry)
        return self._storage

    @property
    def storage_label(self) -> str:
        return redact(self.spec.storage) if self.spec.storage else f"journal file {self.dir / 'journal.log'}"

    def study(self, seed_offset: int = 0) -> optuna.Study:
        return optuna.load_study(
            study_name=self.name,
            storage=self.storage,
            sampler=self.spec.build_sampler(seed_offset),
            pruner=self.spec.build_pruner(),
        )

    def claim_worker_slot(self, start: int = 0) -> int:
        """Claim the lowest free worker slot >= ``start`` for this process, for good.

        A worker seeds its sampler with ``sampler.seed + slot``: two workers started with the same
        index, or a restarted/requeued worker, must not replay the same seed stream (and so the same
        parameters). ``O_CREAT | O_EXCL`` on ``workers/claims/<slot>`` makes the claim atomic across
        processes and hosts (also on NFS v3+, where study folders of SLURM jobs live). The first
        worker of a fresh study with index 0 gets slot 0, so a single-worker study stays reproducible.
        """
        claims = self.dir / "workers" / "claims"
        claims.mkdir(parents=True, exist_ok=True)
        slot = max(0, int(start))
        while True:
            try:
                fd = os.open(claims / str(slot), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # minus the umask
            except FileExistsError:
                slot += 1
                continue
            with os.fdopen(fd, "w") as f:  # who claimed it, for people reading the folder
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "index": int(start)}, f)
            return slot

    def trial_dir(self, number: int) -> Path:
        return self.dir / "trials" / f"{number:04d}"

    def save_spec(self) -> None:
        atomic_write_text(self.dir / SPEC_FILE, yaml.safe_dump(self.spec.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, study: str | os.PathLike, root: str | os.PathLike | None = None) -> "StudyHandle":
        folder = resolve_study_dir(study, root)
        return cls(folder, load_spec(folder / SPEC_FILE))

    @classmethod
    def create(cls, spec: StudySpec, root: str | os.PathLike | None = None, exist_ok: bool = False) -> "StudyHandle":
        folder = studies_root(root) / spec.name
        if (folder / SPEC_FILE).exists() and not exist_ok:
            raise ConfigError(
                f"study {spec.name!r} already exists in {folder}; continue it with "
                f"`ickd sweep run {shlex.quote(spec.name)}{f' --root {shlex.quote(str(root))}' if root else ''}`, "
                "choose another --name, or delete the folder to start over"
            )
        folder.mkdir(parents=True, exist_ok=True)
        handle = cls(folder, spec)
        study = optuna.create_study(
            study_name=spec.name,
            storage=handle.storage,
            direction=spec.objective.direction,
            load_if_exists=exist_ok,
        )
        describe_study(study, spec)
        handle.save_spec()
        return handle


def spec_hash(spec: StudySpec) -> str:
    """A short hash of what makes trials comparable: base overrides, objective, space, sampler and
    pruner (not the budget, storage, retry or heartbeat settings, which may change on the way)."""
    data = spec.to_dict()
    content = {k: data[k] for k in ("base", "objective", "space", "sampler", "pruner")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_study(study: optuna.Study, spec: StudySpec) -> None:
    """What optuna-dashboard and ``optuna.load_study`` users see without study.yaml: the objective's
    name as the study's metric name (not "Objective 0"), and user attrs ``objective`` (metric, mode,
    direction), ``direction``, ``base_overrides`` (secrets hidden), ``spec_name`` and ``spec_hash``."""
    with warnings.catch_warnings():  # set_metric_names is marked experimental (since Optuna 3.2)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([spec.objective.metric])
    attrs = {
        "objective": asdict(spec.objective),
        "direction": spec.objective.direction,
        "base_overrides": redact_argv(list(spec.base)),
        "spec_name": spec.name,
        "spec_hash": spec_hash(spec),
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)
