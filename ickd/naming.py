"""The one place that names a run everywhere it appears: output folder, checkpoint, SLURM job,
Optuna trial and tracker (W&B) run id. A run keeps its id across requeues, retries and resubmits
because the id is a pure function of where the run belongs (launch or study) and its number."""
from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def slug(text: str, limit: int = 40) -> str:
    return _UNSAFE.sub("-", str(text)).strip("-")[:limit] or "run"


def run_id(group: str, member: str) -> str:
    """A stable id (W&B-safe: letters, digits, - and _, at most 64 characters) for run ``member`` of
    launch or study ``group``; a short hash keeps two groups with similar names apart.

    The member's number always survives: ``run_id("fmnist-picd", "fmnist-picd-t0007")`` is
    ``fmnist-picd-t0007-<hash>`` (the group prefix of the member is not repeated, and a long member
    keeps its tail, where trial/run numbers are)."""
    digest = hashlib.sha1(f"{group}/{member}".encode()).hexdigest()[:8]
    tail = member[len(group) + 1:] if member.startswith(f"{group}-") and len(member) > len(group) + 1 else member
    tail = _UNSAFE.sub("-", tail).strip("-")[-20:].strip("-") or "run"
    return f"{slug(group, 30)}-{tail}-{digest}"


def launch_run_name(launch: str, index: int) -> str:
    return f"{launch}-r{index:03d}"


def trial_run_name(study: str, first_trial: int) -> str:
    return f"{study}-t{first_trial:04d}"
