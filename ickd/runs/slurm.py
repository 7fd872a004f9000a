"""The SLURM environment: the one module that reads ``SLURM_*`` (and submitit's ``SUBMITIT_*``)
variables. Everything takes an optional mapping (default ``os.environ``) so tests can pass their own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

JOB_ID = "SLURM_JOB_ID"
ARRAY_JOB_ID = "SLURM_ARRAY_JOB_ID"
ARRAY_TASK_ID = "SLURM_ARRAY_TASK_ID"
RESTART_COUNT = "SLURM_RESTART_COUNT"
PROCID = "SLURM_PROCID"
NTASKS = "SLURM_NTASKS"
LOCALID = "SLURM_LOCALID"
JOB_NODELIST = "SLURM_JOB_NODELIST"
NODELIST = "SLURM_NODELIST"
CPUS_PER_TASK = "SLURM_CPUS_PER_TASK"
SUBMITIT_EXECUTOR = "SUBMITIT_EXECUTOR"
SUBMITIT_LOCAL_NTASKS = "SUBMITIT_LOCAL_NTASKS"


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def job_id(env: Mapping[str, str] | None = None) -> str | None:
    """This process's SLURM job as `ickd jobs` and squeue name it: ``<array job>_<task>`` for an
    array task, else the job id; None outside SLURM."""
    env = _env(env)
    if env.get(ARRAY_JOB_ID):
        return f"{env[ARRAY_JOB_ID]}_{env.get(ARRAY_TASK_ID)}"
    return env.get(JOB_ID)


def restart_count(env: Mapping[str, str] | None = None) -> int:
    return int(_env(env).get(RESTART_COUNT, 0) or 0)


def under_scheduler(env: Mapping[str, str] | None = None) -> bool:
    """Inside a SLURM job, or a submitit job (Hydra's submitit launcher, submitit's local executor)."""
    env = _env(env)
    return bool(env.get(JOB_ID) or env.get(SUBMITIT_EXECUTOR))


def ntasks(env: Mapping[str, str] | None = None) -> int:
    """Tasks of this job (DDP ranks): SLURM's or submitit's local executor's count, else 1."""
    env = _env(env)
    return int(env.get(NTASKS) or env.get(SUBMITIT_LOCAL_NTASKS) or 1)


def cpus_per_task(env: Mapping[str, str] | None = None) -> str | None:
    return _env(env).get(CPUS_PER_TASK)


def tracker_ids(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The job's ids for a tracker's run config (``slurm.job_id``, ...): only those that are set."""
    env = _env(env)
    keys = {JOB_ID: "slurm.job_id", ARRAY_JOB_ID: "slurm.array_job_id", ARRAY_TASK_ID: "slurm.array_task_id",
            RESTART_COUNT: "slurm.restart_count"}
    return {name: env[k] for k, name in keys.items() if env.get(k)}


@dataclass(frozen=True)
class SlurmTask:
    """The raw variables of one SLURM task (``srun``): strings as SLURM sets them, or None. Each
    field's variable name is ``VARIABLES[field]`` (for error messages)."""

    procid: str | None
    ntasks: str | None
    localid: str | None
    nodelist: str | None
    job_id: str | None

    VARIABLES = {"procid": PROCID, "ntasks": NTASKS, "localid": LOCALID, "nodelist": JOB_NODELIST, "job_id": JOB_ID}


def task(env: Mapping[str, str] | None = None) -> SlurmTask | None:
    """This process's SLURM task, or None outside one (SLURM_PROCID unset)."""
    env = _env(env)
    if env.get(PROCID) in (None, ""):
        return None
    return SlurmTask(procid=env.get(PROCID), ntasks=env.get(NTASKS), localid=env.get(LOCALID),
                     nodelist=env.get(JOB_NODELIST) or env.get(NODELIST), job_id=env.get(JOB_ID))
