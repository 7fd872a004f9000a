"""Real services the tests start and stop themselves: a private PostgreSQL server and a private
single-node SLURM cluster (slurm/cluster.sh)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    for folder in PG_BIN_DIRS:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root; run the server as the postgres system user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start PostgreSQL on a free loopback port in a temporary folder; yield an SQLAlchemy URL
    (no password: trust authentication on 127.0.0.1 of a throwaway cluster); stop it after."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
    base = Path(tempfile.mkdtemp(prefix="ickd-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"]), check=True, capture_output=True)
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


SLURM_SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "cluster.sh"
SLURM_APT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
SLURM_PROGRAMS = ("munged", "mungekey", "munge", "unmunge", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scontrol", "scancel")


def slurm_available() -> str | None:
    """None when slurm/cluster.sh can start a cluster here, else why not (and how to fix it)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [p for p in SLURM_PROGRAMS if shutil.which(p, path=path) is None]
    if missing:
        return f"SLURM/munge programs not found ({', '.join(missing)}); install them as root: {SLURM_APT}"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd launches jobs as their user)"
    return None


@contextmanager
def slurm_cluster(base: Path | None = None) -> Iterator[dict]:
    """Start a private single-node SLURM cluster in `base` (default: a new temporary folder) and
    yield {"SLURM_CONF": path, "dir": path, "script": path, "keep": False}. At exit the cluster is
    stopped and its folder deleted, except after a failure (an exception, or the caller set
    info["keep"] = True, e.g. because tests failed): then the folder (logs) stays for reading."""
    reason = slurm_available()
    if reason:
        raise RuntimeError(reason)
    # Unix socket paths are limited to 107 bytes, so keep the folder short (not under pytest's tmp).
    folder = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="ickd-slurm-"))
    started = subprocess.run([str(SLURM_SCRIPT), "start", "--dir", str(folder)], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        raise RuntimeError(f"slurm/cluster.sh start --dir {folder} failed (exit {started.returncode}); logs kept in {folder}/log:\n"
                           f"{started.stdout}{started.stderr}")
    conf = folder / "slurm.conf"
    info = {"SLURM_CONF": str(conf), "dir": str(folder), "script": str(SLURM_SCRIPT), "keep": False}
    failed = False
    try:
        yield info
    except BaseException:
        failed = True
        raise
    finally:
        failed = failed or bool(info.get("keep"))
        stop = [str(SLURM_SCRIPT), "stop", "--dir", str(folder)] + ([] if failed else ["--purge"])
        stopped = subprocess.run(stop, capture_output=True, text=True, timeout=120)
        if stopped.returncode != 0 or failed:
            print(f"slurm cluster in {folder} stopped (exit {stopped.returncode}); logs kept in {folder}/log\n{stopped.stderr}")
