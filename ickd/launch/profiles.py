"""Resource profiles: YAML files (``slurm/profiles/*.yaml``) with hydra-submitit-launcher's key names,
validated before anything is submitted, turned into submitit executor parameters.

A profile is either ``cluster: slurm`` (the default) or ``cluster: local`` (submitit's local executor:
jobs run as processes of this machine, for laptops and machines without SLURM).
"""
from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ickd.errors import ConfigError
from ickd.resources import shipped_path

# slurm/profiles in a checkout, ickd/_shipped/profiles in a wheel install (ickd.resources).
PROFILE_DIR = shipped_path("profiles")

# hydra-submitit-launcher's names (what users already write), with their types.
SLURM_KEYS: dict[str, type | tuple[type, ...]] = {
    "timeout_min": (int, float),
    "cpus_per_task": int,
    "gpus_per_node": int,
    "tasks_per_node": int,
    "mem_gb": (int, float),
    "nodes": int,
    "partition": str,
    "qos": str,
    "account": str,
    "comment": str,
    "constraint": str,
    "exclude": str,
    "gres": str,
    "cpus_per_gpu": int,
    "gpus_per_task": int,
    "mem_per_gpu": str,
    "mem_per_cpu": str,
    "signal_delay_s": int,
    "max_num_timeout": int,
    "additional_parameters": dict,
    "array_parallelism": int,
    "setup": list,
}
# ickd's own keys.
ICKD_KEYS: dict[str, type | tuple[type, ...]] = {
    "cluster": str,           # slurm | local
    "trials_per_gpu": int,    # pack this many runs/trial workers into one job (each its own process)
    "description": str,
    "python": str,            # interpreter on the nodes (default: the one running ickd)
}
DEFAULTS: dict[str, Any] = {
    "cluster": "slurm",
    "timeout_min": 240,
    "cpus_per_task": 4,
    "gpus_per_node": 0,
    "tasks_per_node": 1,
    "nodes": 1,
    "mem_gb": 16,
    "signal_delay_s": 120,
    # Time limits are requeued by default (the run resumes from its checkpoint); bounded.
    "max_num_timeout": 20,
    "array_parallelism": 256,
    "trials_per_gpu": 1,
    "additional_parameters": {},
    "setup": [],
}


@dataclass
class Profile:
    name: str
    source: str
    values: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    @property
    def cluster(self) -> str:
        return str(self.values["cluster"])

    @property
    def trials_per_gpu(self) -> int:
        return int(self.values.get("trials_per_gpu") or 1)

    @property
    def runs_per_job(self) -> int:
        """Runs (or study workers) packed into one job: trials_per_gpu on each of its GPUs."""
        return self.trials_per_gpu * max(1, int(self.values.get("gpus_per_node") or 0))

    def threads_per_run(self, runs_in_job: int) -> int | None:
        """Each packed process's share of the job's CPUs (None for a lone run: the job's own)."""
        if runs_in_job <= 1:
            return None
        return max(1, int(self.values["cpus_per_task"]) // runs_in_job)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, **self.values}

    def executor_parameters(self, job_name: str) -> dict[str, Any]:
        """Parameters for ``submitit.AutoExecutor.update_parameters`` (``slurm_``-prefixed where needed)."""
        v = self.values
        params: dict[str, Any] = {"name": job_name, "timeout_min": int(v["timeout_min"]), "nodes": int(v["nodes"]), "tasks_per_node": int(v["tasks_per_node"]), "cpus_per_task": int(v["cpus_per_task"])}
        if v.get("gpus_per_node"):
            params["gpus_per_node"] = int(v["gpus_per_node"])
        if self.cluster == "local":
            return params
        if v.get("mem_gb") and not (v.get("mem_per_gpu") or v.get("mem_per_cpu")):
            params["mem_gb"] = v["mem_gb"]
        for key in ("partition", "qos", "account", "comment", "constraint", "exclude", "gres", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "signal_delay_s", "array_parallelism"):
            if v.get(key) not in (None, ""):
                params[f"slurm_{key}"] = v[key]
        if v.get("additional_parameters"):
            params["slurm_additional_parameters"] = dict(v["additional_parameters"])
        if v.get("setup"):
            params["slurm_setup"] = list(v["setup"])
        if int(v["tasks_per_node"]) * int(v["nodes"]) > 1:
            # DDP: one rank failing must end the others at once, not after a collective's timeout.
            params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        return params


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_profile_path(profile: str | os.PathLike) -> Path:
    """A path, or a name in slurm/profiles (``a100`` -> slurm/profiles/a100.yaml)."""
    path = Path(profile)
    if path.is_file():
        return path
    for candidate in (PROFILE_DIR / f"{profile}.yaml", PROFILE_DIR / str(profile)):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")) if PROFILE_DIR.is_dir() else []
    raise ConfigError(f"no resource profile {str(profile)!r}: not a file, and not one of {known} in {PROFILE_DIR}. Pass --profile PATH.yaml")


def validate(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Check keys, types and requests that can never be satisfied; returns values with defaults."""
    valid = {**SLURM_KEYS, **ICKD_KEYS}
    for key, value in values.items():
        if key not in valid:
            raise ConfigError(f"{source}: unknown profile key {key!r}{_suggest(key, list(valid))}; valid keys: {', '.join(sorted(valid))}")
        kind = valid[key]
        if value is not None and not (isinstance(value, kind) and not isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise ConfigError(f"{source}: {key}={value!r} must be {names}")
    v = {**DEFAULTS, **{k: x for k, x in values.items() if x is not None}}
    if v["cluster"] not in ("slurm", "local"):
        raise ConfigError(f"{source}: cluster={v['cluster']!r}; use slurm or local")
    for key in ("timeout_min", "cpus_per_task", "tasks_per_node", "nodes", "trials_per_gpu", "array_parallelism"):
        if float(v[key]) <= 0:
            raise ConfigError(f"{source}: {key}={v[key]} must be > 0")
    for key in ("gpus_per_node", "signal_delay_s", "max_num_timeout", "mem_gb"):
        if float(v[key]) < 0:
            raise ConfigError(f"{source}: {key}={v[key]} must be >= 0")
    if v["signal_delay_s"] >= v["timeout_min"] * 60:
        raise ConfigError(
            f"{source}: signal_delay_s={v['signal_delay_s']} is not shorter than timeout_min={v['timeout_min']} minutes: the job would be "
            "signalled before it starts; lower signal_delay_s or raise timeout_min"
        )
    if v["timeout_min"] <= 10 and v["cluster"] == "slurm":
        warnings.warn(
            f"{source}: timeout_min={v['timeout_min']} <= 10: submitit treats every USR2 of such a job as a time-out "
            "(it counts against max_num_timeout); use timeout_min > 10",
            stacklevel=2,
        )
    if v.get("mem_per_gpu") and v.get("mem_per_cpu"):
        raise ConfigError(f"{source}: give mem_per_gpu or mem_per_cpu, not both (SLURM rejects the pair)")
    if v.get("mem_per_gpu") or v.get("mem_per_cpu"):
        v["mem_gb"] = 0  # SLURM rejects --mem beside --mem-per-gpu/--mem-per-cpu; the per-unit request wins over the default
    if v.get("gres") and v["gpus_per_node"]:
        raise ConfigError(f"{source}: give either gres or gpus_per_node, not both (SLURM counts them twice)")
    if v["trials_per_gpu"] > 1 and (v["tasks_per_node"] > 1 or v["nodes"] > 1):
        raise ConfigError(f"{source}: trials_per_gpu={v['trials_per_gpu']} packs single-process runs; it cannot be combined with tasks_per_node/nodes > 1 (DDP)")
    if v["tasks_per_node"] > 1 and v["gpus_per_node"] and v["gpus_per_node"] % v["tasks_per_node"] and v["tasks_per_node"] % v["gpus_per_node"]:
        raise ConfigError(f"{source}: tasks_per_node={v['tasks_per_node']} and gpus_per_node={v['gpus_per_node']}: DDP wants one task per GPU")
    if v["cluster"] == "local" and v["nodes"] > 1:
        raise ConfigError(f"{source}: the local executor runs on one machine; use nodes=1 or cluster: slurm")
    for line in v["setup"]:
        if not isinstance(line, str):
            raise ConfigError(f"{source}: setup must be a list of shell lines, got {line!r}")
    for key in v["additional_parameters"]:
        if not isinstance(key, str):
            raise ConfigError(f"{source}: additional_parameters keys must be sbatch option names")
    return v


def load_profile(profile: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Profile:
    path = resolve_profile_path(profile)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"resource profile {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"resource profile {path} must be a mapping of keys (timeout_min, gpus_per_node, ...)")
    data.update(overrides or {})
    return Profile(path.stem, str(path), validate(data, str(path)))


# --- checks against the cluster that will run it (SLURM only, best effort) --------------------------

def _sinfo(fmt: str) -> list[list[str]]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", fmt], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise ConfigError(f"cannot reach SLURM (sinfo failed: {out.stderr.strip() or out.stdout.strip()}); is SLURM_CONF set and slurmctld up? (slurm/cluster.sh status)")
    return [line.split("|") for line in out.stdout.splitlines() if line.strip()]


def _gpus_in(gres: str) -> int:
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def check_against_cluster(profile: Profile) -> None:
    """Refuse requests no node of the chosen partition can ever satisfy (SLURM would queue them forever
    or reject them with a terse message)."""
    if profile.cluster != "slurm":
        return
    if shutil.which("sinfo") is None:
        raise ConfigError("profile cluster=slurm but SLURM's commands (sinfo, sbatch) are not installed here; use a local profile (--profile local) or run on the login node")
    rows = _sinfo("%P|%c|%m|%G")
    partition = profile.get("partition")
    partitions = sorted({r[0].rstrip("*") for r in rows})
    if partition:
        rows = [r for r in rows if r[0].rstrip("*") == partition]
        if not rows:
            raise ConfigError(f"partition {partition!r} does not exist on this cluster; partitions: {', '.join(partitions)}")
    v = profile.values
    cpus_needed = int(v["cpus_per_task"]) * int(v["tasks_per_node"])
    mem_needed = int(float(v.get("mem_gb") or 0) * 1024)
    gpus_needed = int(v.get("gpus_per_node") or 0)
    fits = [r for r in rows if int(r[1]) >= cpus_needed and (not mem_needed or int(r[2]) >= mem_needed) and _gpus_in(r[3]) >= gpus_needed]
    if not fits:
        best = max(rows, key=lambda r: (int(r[1]), int(r[2]))) if rows else None
        have = f"largest node: {best[1]} CPUs, {int(best[2]) // 1024} GB, gres {best[3]}" if best else "no nodes"
        raise ConfigError(
            f"no node{' in partition ' + partition if partition else ''} can hold {cpus_needed} CPUs, {mem_needed // 1024} GB and {gpus_needed} GPUs "
            f"({have}); lower cpus_per_task/tasks_per_node, mem_gb or gpus_per_node"
        )
