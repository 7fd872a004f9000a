"""``ickd wandb sync [PATH ...] [-j N] [--dry-run]``: upload offline W&B runs.

Runs log offline where there is no API key or no network (compute nodes); this finds every
``wandb/offline-run-*`` folder below the given paths (a study folder or name, a launch folder or
name, a run folder, any folder), skips the ones already uploaded (``wandb sync`` leaves a
``run-<id>.wandb.synced`` file beside the run file) and uploads the rest with ``wandb sync``, several
runs at a time. The offline folders of one W&B run (a resumed run writes one per start) go to one
``wandb sync`` call, oldest first, so their history joins up. Re-running it continues where it
stopped: finished uploads are skipped.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ickd.runs.roots import launches_root, studies_root

SYNCED_SUFFIX = ".wandb.synced"


@dataclass
class OfflineRun:
    """All offline folders of one W&B run id (one per start of the run), oldest first."""

    run_id: str
    dirs: list[Path] = field(default_factory=list)

    @property
    def pending(self) -> list[Path]:
        return [d for d in self.dirs if not is_synced(d)]


def run_files(offline_dir: Path) -> list[Path]:
    return sorted(offline_dir.glob("run-*.wandb"))


def is_synced(offline_dir: Path) -> bool:
    files = run_files(offline_dir)
    return bool(files) and all(f.with_suffix(SYNCED_SUFFIX).exists() for f in files)


def run_id_of(offline_dir: Path) -> str:
    # offline-run-YYYYMMDD_HHMMSS-<id>; the id may itself contain '-'.
    parts = offline_dir.name.split("-", 3)
    return parts[3] if len(parts) == 4 else offline_dir.name


def resolve_path(path: str) -> Path:
    """A folder, or the name of a study (``sweeps/studies``-style roots) or launch."""
    direct = Path(path)
    if direct.exists():
        return direct
    candidates = [launches_root() / path, studies_root() / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    where = ", ".join(str(c) for c in candidates) or "nowhere else"
    raise FileNotFoundError(f"{path}: no such folder, study or launch (looked in {where})")


def find_offline_runs(paths: list[Path]) -> list[OfflineRun]:
    """Every offline run folder below ``paths``, grouped by W&B run id."""
    seen: set[Path] = set()
    by_id: dict[str, OfflineRun] = {}
    for root in paths:
        candidates = [root] if root.name.startswith("offline-run-") else root.rglob("offline-run-*")
        for d in candidates:
            d = d.resolve()
            explicit = d == root.resolve()
            if d in seen or not d.is_dir() or not (explicit or d.parent.name == "wandb") or not run_files(d):
                continue
            seen.add(d)
            run_id = run_id_of(d)
            by_id.setdefault(run_id, OfflineRun(run_id)).dirs.append(d)
    for run in by_id.values():
        run.dirs.sort(key=lambda d: d.name)  # the folder name starts with its start time
    return sorted(by_id.values(), key=lambda r: r.dirs[0].name)


def wandb_executable() -> str:
    """``wandb`` on PATH, else the one installed beside this Python (an un-activated venv)."""
    found = shutil.which("wandb")
    if found:
        return found
    beside = Path(sys.executable).parent / "wandb"
    if beside.is_file():
        return str(beside)
    raise FileNotFoundError("the `wandb` command is not installed; `pip install -e '.[wandb]'` installs it")


def sync_one(run: OfflineRun, exe: str, extra_args: list[str], timeout: float | None) -> tuple[bool, str]:
    """Upload the run's pending folders in one ``wandb sync`` call; success means the command
    succeeded *and* marked every folder synced."""
    dirs = run.pending
    try:
        proc = subprocess.run([exe, "sync", *extra_args, *map(str, dirs)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    except OSError as exc:
        return False, str(exc)
    output = (proc.stdout + proc.stderr).strip()
    unmarked = [d for d in dirs if not is_synced(d)]
    if proc.returncode != 0:
        return False, f"wandb sync exited {proc.returncode}: {output[-500:] or 'no output'}"
    if unmarked:
        return False, f"wandb sync exited 0 but did not mark {len(unmarked)} folder(s) synced: {output[-500:] or 'no output'}"
    return True, f"{len(dirs)} folder(s) uploaded"


def sync(paths: list[str], jobs: int = 4, dry_run: bool = False, entity: str | None = None, project: str | None = None,
         timeout: float | None = None, out=print) -> int:
    """Upload the offline runs below ``paths``; returns the number of runs that failed."""
    roots = [resolve_path(p) for p in (paths or ["."])]
    runs = find_offline_runs(roots)
    pending = [r for r in runs if r.pending]
    done = len(runs) - len(pending)
    out(f"{len(runs)} offline W&B run(s) found below {', '.join(map(str, roots))}: {done} already synced, {len(pending)} to upload")
    if dry_run or not pending:
        for r in pending:
            out(f"  would upload {r.run_id}: {', '.join(str(d) for d in r.pending)}")
        return 0
    exe = wandb_executable()
    extra_args = [*(["--entity", entity] if entity else []), *(["--project", project] if project else [])]
    failed = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = pool.map(lambda r: (r, *sync_one(r, exe, extra_args, timeout)), pending)
        for run, ok, message in results:
            failed += not ok
            out(f"  {'ok    ' if ok else 'FAILED'} {run.run_id}: {message}")
    out(f"{len(pending) - failed} uploaded, {failed} failed" + ("; run the same command again to retry the failed ones" if failed else ""))
    return failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ickd wandb", description="W&B tracking utilities")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{sync}")
    p = sub.add_parser("sync", help="upload offline W&B runs below the given folders (skips synced ones)",
                       description="Upload every wandb/offline-run-* folder below PATH (a study, launch, run or any folder; "
                                   "default: the current folder) with `wandb sync`, skipping the ones already uploaded.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="folders to search for offline runs (default: the current folder)")
    p.add_argument("-j", "--jobs", type=int, default=min(8, os.cpu_count() or 1), help="runs uploaded in parallel")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded and upload nothing")
    p.add_argument("--entity", default=None, help="upload to this entity instead of the one the runs were logged with")
    p.add_argument("--project", default=None, help="upload to this project instead of the one the runs were logged with")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per run's upload")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        failed = sync(args.paths, args.jobs, args.dry_run, args.entity, args.project, args.timeout)
    except FileNotFoundError as exc:
        print(f"ickd wandb sync: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if failed else 0)
