"""A launch on disk: ``<root>/<launch>/`` holds ``manifest.json`` (what was submitted: job ids, runs or
trials, output folders, W&B run ids, profile, code snapshot), ``code/`` (the snapshot the jobs run),
``submitit/`` (job scripts, pickles and logs) and ``runs/`` (run folders of train and grid launches).

Any later ``ickd jobs ...`` on the login node reads the manifest; it need not be the process that
submitted. Every write of the manifest is atomic.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ickd.errors import ConfigError
from ickd.runs.atomic import atomic_write_json
from ickd.runs.roots import launches_root

MANIFEST = "manifest.json"
REPO = Path(__file__).resolve().parent.parent.parent
SNAPSHOT_ITEMS = ("ickd", "configs", "sweeps", "pyproject.toml")


def new_launch_name(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def snapshot_code(dest: Path, source: Path = REPO) -> dict[str, Any]:
    """Copy the package, configs and study files the jobs will import, so editing the checkout after
    submitting changes nothing for pending or requeued jobs. Returns provenance for the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for item in SNAPSHOT_ITEMS:
        src = source / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=ignore, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest / item)
    info: dict[str, Any] = {"snapshot": str(dest), "source": str(source)}
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


@dataclass
class Launch:
    dir: Path
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.data["launch"])

    @property
    def kind(self) -> str:
        return str(self.data["kind"])

    @property
    def jobs(self) -> list[dict[str, Any]]:
        return self.data.setdefault("jobs", [])

    @property
    def submitit_dir(self) -> Path:
        return self.dir / "submitit"

    @property
    def code_dir(self) -> Path:
        return self.dir / "code"

    def save(self) -> None:
        self.data["updated"] = time.time()
        atomic_write_json(self.dir / MANIFEST, self.data)

    @classmethod
    def create(cls, name: str, kind: str, root: str | os.PathLike | None = None, **fields: Any) -> "Launch":
        folder = launches_root(root) / name
        if (folder / MANIFEST).exists():
            raise ConfigError(f"launch {name!r} already exists in {folder}; choose another --name")
        folder.mkdir(parents=True, exist_ok=True)
        launch = cls(folder, {"launch": name, "kind": kind, "created": time.time(), "jobs": [], **fields})
        return launch

    @classmethod
    def load(cls, launch: str | os.PathLike, root: str | os.PathLike | None = None) -> "Launch":
        direct = Path(launch)
        for folder in (direct, launches_root(root) / str(launch)):
            if (folder / MANIFEST).is_file():
                return cls(folder.resolve(), json.loads((folder / MANIFEST).read_text()))
        known = ", ".join(p.parent.name for p in sorted(launches_root(root).glob(f"*/{MANIFEST}"))[-5:])
        raise ConfigError(
            f"no launch {str(launch)!r} (no {MANIFEST} in {direct} or {launches_root(root) / str(launch)}); "
            f"recent launches: {known or 'none'}. Use --root or ICKD_LAUNCHES if they live elsewhere"
        )


def all_launches(root: str | os.PathLike | None = None) -> list[Launch]:
    found = []
    for path in sorted(launches_root(root).glob(f"*/{MANIFEST}")):
        try:
            found.append(Launch(path.parent, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(found, key=lambda launch: launch.data.get("created", 0))


def find_job(job_id: str, root: str | os.PathLike | None = None) -> tuple[Launch, dict[str, Any]]:
    for launch in reversed(all_launches(root)):
        for job in launch.jobs:
            if job_id in (job.get("job_id"), *job.get("attempts", [])):
                return launch, job
    raise ConfigError(f"no launch under {launches_root(root)} submitted job {job_id}; `ickd jobs status` lists launches and their jobs")
