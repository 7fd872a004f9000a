"""The local SLURM cluster (slurm/cluster.sh) behaves like a real one: batch jobs run, fake GPUs are
allocated one per job with CUDA_VISIBLE_DEVICES set, and a job in the `urgent` partition preempts a
`debug` job, which first receives its --signal and is then requeued and run again."""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll `predicate` until it returns a truthy value (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def slurm(*args: str) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{' '.join(args)} failed (exit {done.returncode}): {done.stderr.strip()}"
    return done.stdout


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (State, Restarts, Partition, Reason, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def state(job_id: str) -> str:
    return job_info(job_id).get("JobState", "")


def node_info() -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", slurm("scontrol", "show", "node", "-o", "localhost")))


def wait_pending_on_resources(job_id: str) -> None:
    """Wait until the scheduler has looked at a job and left it pending for lack of resources."""
    wait_for(lambda: job_info(job_id).get("Reason") == "Resources", 20, f"job {job_id} to be evaluated")
    assert state(job_id) == "PENDING"


@pytest.fixture
def submit(slurm_env, tmp_path):
    """sbatch with --parsable in tmp_path; every job a test submits is cancelled when it ends, so a
    failing test does not leave jobs holding the node for the next one."""
    ids: list[str] = []

    def _submit(*args: str) -> str:
        job_id = slurm("sbatch", "--parsable", f"--chdir={tmp_path}", *args).strip().split(";")[0]
        ids.append(job_id)
        return job_id

    yield _submit
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)
        wait_for(lambda: all(state(j) not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED") for j in ids),
                 30, f"cancelled jobs {ids} to leave the node")


def test_cluster_has_one_idle_node_with_two_gpus_and_two_partitions(slurm_env):
    assert os.environ["SLURM_CONF"] == slurm_env["SLURM_CONF"]
    assert Path(slurm_env["SLURM_CONF"]).is_file()
    parts = slurm("sinfo", "-h", "-o", "%P %a").split()
    assert parts == ["debug*", "up", "urgent", "up"]
    node = node_info()
    assert not re.search("DOWN|DRAIN|FAIL|NOT_RESPONDING", node["State"]), node["State"]
    assert node["Gres"] == "gpu:2"
    assert 1 <= int(node["CPUTot"]) <= (os.cpu_count() or 1)


def test_plain_batch_job_runs_and_writes_its_output(submit, tmp_path):
    job = submit("--output=out-%j.txt", "--wrap", "echo hello from $SLURM_JOB_ID on $SLURM_JOB_PARTITION")
    wait_for(lambda: state(job) == "COMPLETED", 30, f"job {job} to complete (state {state(job)!r})")
    assert job_info(job)["ExitCode"] == "0:0"
    assert (tmp_path / f"out-{job}.txt").read_text().strip() == f"hello from {job} on debug"


GPU_JOB = """#!/bin/bash
# Record the GPUs this job got, then hold them until the test removes the hold file (at most 60 s).
echo "${CUDA_VISIBLE_DEVICES:-unset}" > "gpus-$SLURM_JOB_ID"
for i in $(seq 1 600); do [ -e hold ] || exit 0; sleep 0.1; done
"""


def test_fake_gpus_are_allocated_one_per_job(submit, tmp_path):
    (tmp_path / "gpu.sh").write_text(GPU_JOB)
    (tmp_path / "hold").touch()
    gpus = lambda job: (tmp_path / f"gpus-{job}").read_text().strip() if (tmp_path / f"gpus-{job}").exists() else None  # noqa: E731

    # A job holding both GPUs on one CPU blocks a 1-GPU job although CPUs are free: GPUs are counted.
    both = submit("--gpus-per-node=2", "--cpus-per-task=1", "gpu.sh")
    assert wait_for(lambda: gpus(both), 30, "the 2-GPU job to start") == "0,1"
    blocked = submit("--gpus-per-node=1", "--cpus-per-task=1", "gpu.sh")
    wait_pending_on_resources(blocked)
    node = node_info()
    if int(node["CoresPerSocket"]) * int(node.get("Sockets", "1")) > 1:  # a second core is free
        assert int(node["CPUAlloc"]) < int(node["CPUTot"]), node
    (tmp_path / "hold").unlink()
    wait_for(lambda: state(both) == "COMPLETED", 30, "the 2-GPU job to end")
    wait_for(lambda: state(blocked) == "COMPLETED", 30, "the 1-GPU job to run once the GPUs are free")
    assert gpus(blocked) in ("0", "1")

    # Two 1-GPU jobs run at the same time on distinct GPUs; a third waits for one of them.
    (tmp_path / "hold").touch()
    first = submit("--gpus-per-node=1", "gpu.sh")
    second = submit("--gpus-per-node=1", "gpu.sh")
    wait_for(lambda: gpus(first) and gpus(second), 30, "two 1-GPU jobs to run together")
    assert {gpus(first), gpus(second)} == {"0", "1"}
    assert state(first) == state(second) == "RUNNING"
    third = submit("--gpus-per-node=1", "gpu.sh")
    wait_pending_on_resources(third)
    assert gpus(third) is None
    (tmp_path / "hold").unlink()
    wait_for(lambda: state(third) == "COMPLETED", 30, "the third 1-GPU job to run after the others")
    assert gpus(third) in ("0", "1")


PREEMPTIBLE_JOB = """#!/bin/bash
# One line per start; a USR2 (the preemption warning) leaves a marker; the rerun ends at once.
echo "start ${SLURM_RESTART_COUNT:-0} $(date +%s.%N)" >> starts
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then exit 0; fi
trap 'echo "usr2 $(date +%s.%N)" >> usr2' USR2
for i in $(seq 1 1200); do sleep 0.1; done   # short sleeps: bash runs the trap between them
"""


def test_urgent_job_preempts_and_requeues_a_debug_job_after_signalling_it(submit, tmp_path):
    cpus = node_info()["CPUTot"]  # both jobs need the whole node
    (tmp_path / "job.sh").write_text(PREEMPTIBLE_JOB)
    starts = tmp_path / "starts"
    low = submit("--partition=debug", f"--cpus-per-task={cpus}", "--requeue", "--signal=B:USR2@60", "job.sh")
    wait_for(lambda: starts.exists() and starts.read_text().count("start") == 1, 30, "the debug job to start")

    urgent = submit("--partition=urgent", f"--cpus-per-task={cpus}", "--output=urgent.txt",
                    "--wrap", "echo urgent $(date +%s.%N)")
    wait_for(lambda: state(urgent) == "COMPLETED", 40, f"the urgent job to run (state {state(urgent)!r})")
    usr2 = tmp_path / "usr2"
    assert usr2.exists(), "the preempted job never received its --signal (USR2)"
    # The warning came before the urgent job took the CPUs (GraceTime lets the job checkpoint).
    signalled_at = float(usr2.read_text().split()[1])
    urgent_at = float((tmp_path / "urgent.txt").read_text().split()[1])
    assert signalled_at <= urgent_at

    # Requeued, not cancelled: it runs again (after cred_expire) with a restart count of 1.
    wait_for(lambda: starts.read_text().count("start") == 2, 40, f"the requeued job to start again (state {state(low)!r})")
    assert starts.read_text().splitlines()[1].startswith("start 1 ")
    wait_for(lambda: state(low) == "COMPLETED", 30, "the requeued job to complete")
    assert job_info(low)["Restarts"] == "1"
