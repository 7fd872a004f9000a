"""Is a trial's worker still alive? (journal storage has no heartbeats of its own)."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ickd.runs import slurm


def hostname() -> str:
    return socket.gethostname()


def process_start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (None if it does not exist or is a zombie).
    Recorded with the pid, so a recycled pid is not mistaken for the worker."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # zombie or dead: the process has exited
        return None
    return int(fields[19])


def worker_identity() -> dict[str, object]:
    pid = os.getpid()
    return {
        "worker_host": hostname(), "worker_pid": pid, "worker_start": process_start_ticks(pid), "heartbeat_at": time.time(),
        "worker_job": slurm.job_id(), "suspended_at": None,
    }


def worker_is_gone(user_attrs: dict, grace_s: float, started_at: float | None, now: float | None = None, suspend_grace_s: float | None = None) -> str | None:
    """Why the trial's worker is considered gone, or None while it looks alive.

    Same host: the recorded process no longer exists (immediate). Any host: no heartbeat for
    ``grace_s`` seconds (node loss, a hung or frozen worker). A trial *suspended* by a preemption
    (its job checkpointed and requeued itself) waits ``suspend_grace_s`` for the job to return.
    """
    now = time.time() if now is None else now
    suspended = user_attrs.get("suspended_at")
    if suspended is not None:
        limit = float(suspend_grace_s if suspend_grace_s is not None else grace_s)
        if now - float(suspended) > limit:
            return f"suspended by a preemption {now - float(suspended):.0f} s ago and its job has not come back (suspend_grace_s {limit:.0f} s)"
        return None
    host, pid, start = user_attrs.get("worker_host"), user_attrs.get("worker_pid"), user_attrs.get("worker_start")
    if host == hostname() and pid is not None:
        ticks = process_start_ticks(int(pid))
        if ticks is None or (start is not None and ticks != int(start)):
            return f"worker process {pid} on {host} is gone"
    beat = user_attrs.get("heartbeat_at", started_at)
    if beat is not None and now - float(beat) > grace_s:
        return f"no heartbeat from worker {pid} on {host} for {now - float(beat):.0f} s (grace {grace_s:.0f} s)"
    return None
