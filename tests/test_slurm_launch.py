"""`ickd launch` and `ickd jobs` against the real single-node SLURM cluster of slurm/cluster.sh:
a single run and a grid array; a run preempted by a real USR2 through SLURM (what submitit's
``job._interrupt()`` sends) and by partition-priority preemption, requeued and resumed from its
mid-epoch checkpoint; a study worker array that completes its budget while one worker is preempted
(same trial continues); a SIGKILLed worker whose trial is reaped and retried; cancel; and Hydra's own
submitit_slurm launcher."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from ickd.launch.manifest import Launch
from ickd.sweep.studies import StudyHandle
from tests.helpers import REPO, jobs_status_showing, run_ickd as ickd, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RUN = ["dataset=synthetic", "stage=teacher", "model=resnet8", "trainer.device=cpu", "trainer.progress=off", "trainer.batch_size=32"]





def profile(tmp_path: Path, **changes) -> Path:
    values = yaml.safe_load((REPO / "slurm" / "profiles" / "localcluster.yaml").read_text())
    values.update(changes)
    path = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def completed(run_dir: Path) -> bool:
    result = Path(run_dir) / "result.json"
    return result.is_file() and json.loads(result.read_text()).get("status") == "completed"


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    return set(out.split())




@pytest.fixture
def cleanup_jobs(slurm_env):
    """Cancel whatever a test left queued so the next test gets the node."""
    yield
    ids = squeue_ids()
    if ids:
        subprocess.run(["scancel", *ids], timeout=30)
        wait_for(lambda: not squeue_ids(), 60, "the queue to drain")


def assert_resumed_once(run_dir: Path, epochs: int, signal_name: str = "SIGUSR2") -> dict:
    """The run got the signal, saved a checkpoint, was requeued, and a new start resumed after the
    work already done; every epoch is in metrics.jsonl exactly once. Returns the timeline (s)."""
    ev = events(run_dir)
    kinds = [e["event"] for e in ev]
    starts = [e for e in ev if e["event"] == "start"]
    assert len(starts) >= 2, kinds
    first_signal = next(e for e in ev if e["event"] == "signal")
    checkpoint = next(e for e in ev if e["event"] == "checkpoint")
    assert first_signal["signal"] == signal_name
    assert (starts[1]["epoch"], starts[1]["batch"]) > (0, 0), starts[1]  # resumed, not restarted
    assert starts[1]["restart_count"] >= 1 and starts[1]["job_id"] == starts[0]["job_id"]  # SLURM requeued the same job
    assert [m["epoch"] for m in metrics(run_dir)] == list(range(1, epochs + 1))
    return {
        "signal_to_checkpoint_s": checkpoint["t"] - first_signal["signal_t"],
        "signal_to_restart_s": starts[1]["t"] - first_signal["signal_t"],
    }


def test_single_run_and_grid_array(slurm_env, tmp_path, cleanup_jobs):
    ickd("launch", "train", *RUN, "trainer.epochs=2", "--profile", "localcluster", "--name", "one", cwd=tmp_path)
    ickd("launch", "grid", *RUN, "trainer.epochs=2", "seed=0,1", "optim.lr=0.05,0.1", "--profile", "localcluster", "--name", "grid", cwd=tmp_path)
    one, grid = Launch.load("one", tmp_path / "launches"), Launch.load("grid", tmp_path / "launches")
    assert len(grid.jobs) == 4
    masters = {j["job_id"].split("_")[0] for j in grid.jobs}
    assert len(masters) == 1 and sorted(j["job_id"].split("_")[1] for j in grid.jobs) == ["0", "1", "2", "3"]  # one array
    assert len({j["run_id"] for j in grid.jobs}) == 4 and {tuple(j["overrides"][-2:]) for j in grid.jobs} == {
        (f"seed={s}", f"optim.lr={lr}") for s in (0, 1) for lr in (0.05, 0.1)
    }
    for launch in (one, grid):
        for job in launch.jobs:
            wait_for(lambda: completed(Path(job["out_dir"])), 300, f"{job['run']} to complete")
            assert events(Path(job["out_dir"]))[0]["code"] == str(launch.code_dir / "ickd")  # the snapshot ran
    out = jobs_status_showing("grid", ["4 COMPLETED"], tmp_path)
    assert "2/2" in out and grid.jobs[3]["run"] in out
    logs = ickd("jobs", "logs", one.jobs[0]["job_id"], cwd=tmp_path).stdout
    assert "_log.out" in logs and "Job completed successfully" in logs
    summary = ickd("jobs", "status", cwd=tmp_path).stdout
    assert "one" in summary and "grid" in summary


def test_run_preempted_by_usr2_requeues_and_resumes_from_its_checkpoint(slurm_env, tmp_path, cleanup_jobs):
    epochs = 8
    ickd("launch", "train", *RUN, f"trainer.epochs={epochs}", "--profile", "localcluster", "--name", "pre", cwd=tmp_path)
    launch = Launch.load("pre", tmp_path / "launches")
    job, run = launch.jobs[0]["job_id"], Path(launch.jobs[0]["out_dir"])
    wait_for(lambda: len(metrics(run)) >= 1, 180, "the first epoch")
    # What submitit's job._interrupt() does: USR2 through SLURM to the job's processes.
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    wait_for(lambda: completed(run), 300, "the requeued run to complete")
    timeline = assert_resumed_once(run, epochs)
    assert timeline["signal_to_checkpoint_s"] < 10
    assert [e["event"] for e in events(run)][:5] == ["start", "signal", "checkpoint", "end", "requeue"]
    assert Launch.load("pre", tmp_path / "launches").jobs[0]["run_id"] == launch.jobs[0]["run_id"]  # one run id throughout
    jobs_status_showing("pre", ["1 COMPLETED", " 2 "], tmp_path)  # the STARTS column counts both starts


def test_partition_priority_preemption_requeues_and_resumes(slurm_env, tmp_path, cleanup_jobs):
    epochs = 8
    whole_node = profile(tmp_path, cpus_per_task=2)
    ickd("launch", "train", *RUN, f"trainer.epochs={epochs}", "--profile", str(whole_node), "--name", "prio", cwd=tmp_path)
    launch = Launch.load("prio", tmp_path / "launches")
    run = Path(launch.jobs[0]["out_dir"])
    wait_for(lambda: len(metrics(run)) >= 1, 180, "the first epoch")
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-c", "2", "-o", str(tmp_path / "urgent.out"), "--wrap", "echo urgent ran"],
                            capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    wait_for(lambda: (tmp_path / "urgent.out").is_file() and "urgent ran" in (tmp_path / "urgent.out").read_text(), 120, "the urgent job")
    wait_for(lambda: completed(run), 300, "the preempted run to complete")
    assert_resumed_once(run, epochs)
    assert urgent


def write_study(tmp_path: Path, teacher_dir: Path, n_trials: int, epochs: int, **changes) -> Path:
    spec = yaml.safe_load((REPO / "sweeps" / "synthetic_smoke.yaml").read_text())
    spec["base"] = [*spec["base"], f"teacher.checkpoint={teacher_dir}", f"trainer.epochs={epochs}"]
    spec["n_trials"] = n_trials
    spec.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_study_worker_array_completes_the_budget_and_a_preempted_trial_continues(slurm_env, tmp_path, teacher_dir, cleanup_jobs):
    ickd("sweep", "--root", str(tmp_path / "studies"), "create", str(write_study(tmp_path, teacher_dir, 3, 4)), "--name", "st", cwd=tmp_path)
    ickd("launch", "sweep", "st", "--workers", "2", "--studies-root", str(tmp_path / "studies"), "--profile", "localcluster", "--name", "sw", cwd=tmp_path)
    launch = Launch.load("sw", tmp_path / "launches")
    assert len(launch.jobs) == 2 and len({j["job_id"].split("_")[0] for j in launch.jobs}) == 1  # one array
    handle = StudyHandle.load("st", tmp_path / "studies")

    def running_trial_with_an_epoch():
        for t in handle.study().get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("run_dir") and metrics(Path(t.user_attrs["run_dir"])) and t.user_attrs.get("worker_job"):
                return t
        return None

    victim = wait_for(running_trial_with_an_epoch, 240, "a trial with a finished epoch")
    subprocess.run(["scancel", "--signal=USR2", victim.user_attrs["worker_job"]], check=True, timeout=30)
    wait_for(lambda: all(j["job_id"] not in squeue_ids() for j in launch.jobs), 480, "both worker jobs to end")
    trials = handle.study().get_trials(deepcopy=False)
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 3, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert not any("retry_of" in t.user_attrs for t in trials)  # continued, not retried
    same = next(t for t in trials if t.number == victim.number)
    assert_resumed_once(Path(same.user_attrs["run_dir"]), 4)
    out = jobs_status_showing("sw", ["2 COMPLETED"], tmp_path)
    assert "3 done" in out or ("done" in out)


def test_sigkilled_worker_trial_is_reaped_and_retried_after_resubmit(slurm_env, tmp_path, teacher_dir, cleanup_jobs):
    study = write_study(tmp_path, teacher_dir, 1, 5, retry={"max_retries": 1})
    ickd("sweep", "--root", str(tmp_path / "studies"), "create", str(study), "--name", "kill", cwd=tmp_path)
    ickd("launch", "sweep", "kill", "--workers", "1", "--studies-root", str(tmp_path / "studies"), "--profile", "localcluster", "--name", "kl", cwd=tmp_path)
    handle = StudyHandle.load("kill", tmp_path / "studies")
    launch = Launch.load("kl", tmp_path / "launches")
    job = launch.jobs[0]["job_id"]

    def running():
        ts = handle.study().get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return ts[0] if ts and metrics(Path(ts[0].user_attrs.get("run_dir", "/nonexistent"))) else None

    first = wait_for(running, 240, "a running trial with an epoch done")
    # An OOM kill or a lost node: SIGKILL to the worker process, no signal handler runs, no checkpoint.
    # (scancel --signal=KILL would not do: srun turns it into a SIGTERM for the step.)
    os.kill(int(first.user_attrs["worker_pid"]), signal.SIGKILL)
    wait_for(lambda: job not in squeue_ids(), 120, "the killed job to leave the queue")
    jobs_status_showing("kl", ["1 LOST"], tmp_path, timeout=60)  # ended with no result: killed
    out = ickd("sweep", "--root", str(tmp_path / "studies"), "reap", "kill", cwd=tmp_path).stdout
    assert f"trial {first.number}" in out and "retried as trial" in out
    out = ickd("jobs", "resubmit-failed", "kl", cwd=tmp_path).stdout
    assert "resubmitted 1 entry" in out
    launch = Launch.load("kl", tmp_path / "launches")
    assert len(launch.jobs[0]["attempts"]) == 2
    wait_for(lambda: launch.jobs[0]["job_id"] not in squeue_ids() and any(
        t.state == TrialState.COMPLETE for t in handle.study().get_trials(deepcopy=False)), 300, "the retry to complete")
    trials = handle.study().get_trials(deepcopy=False)
    retry = next(t for t in trials if t.state == TrialState.COMPLETE)
    assert retry.user_attrs["retry_of"] == first.number and retry.user_attrs["run_dir"] == first.user_attrs["run_dir"]
    assert retry.user_attrs["run_id"] == first.user_attrs["run_id"]  # the same W&B run continues
    starts = [e for e in events(Path(first.user_attrs["run_dir"])) if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["epoch"] >= 1  # resumed from the last epoch checkpoint
    assert [m["epoch"] for m in metrics(Path(first.user_attrs["run_dir"]))] == [1, 2, 3, 4, 5]


def test_cancel_stops_every_job_of_a_launch(slurm_env, tmp_path, cleanup_jobs):
    ickd("launch", "grid", *RUN, "trainer.epochs=50", "seed=0,1", "--profile", "localcluster", "--name", "cx", cwd=tmp_path)
    launch = Launch.load("cx", tmp_path / "launches")
    wait_for(lambda: {j["job_id"] for j in launch.jobs} <= squeue_ids(), 30, "the jobs to be queued")
    out = ickd("jobs", "cancel", "cx", cwd=tmp_path).stdout
    assert "cancelled 2 job(s)" in out
    wait_for(lambda: not ({j["job_id"] for j in launch.jobs} & squeue_ids()), 60, "the jobs to leave the queue")
    jobs_status_showing("cx", ["2 CANCELLED"], tmp_path)


def test_hydra_submitit_slurm_launcher_path(slurm_env, tmp_path, cleanup_jobs):
    """What users already know: `ickd train -m hydra/launcher=submitit_slurm` (blocks until done)."""
    sweep_dir = tmp_path / "multirun"
    proc = subprocess.run(
        [sys.executable, "-m", "ickd.cli", "train", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
         "hydra.launcher.timeout_min=30", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", f"hydra.sweep.dir={sweep_dir}",
         *RUN, "trainer.epochs=1", "seed=0,1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted(sweep_dir.glob("*/result.json"))
    assert len(results) == 2 and all(json.loads(r.read_text())["status"] == "completed" for r in results)


def test_ddp_run_with_two_tasks_on_slurm(slurm_env, tmp_path, cleanup_jobs):
    """tasks_per_node=2: SLURM starts two ranks (srun), torch.distributed is set up from the job's
    environment (gloo on CPU), both ranks train, only rank 0 writes the run folder."""
    ddp = profile(tmp_path, tasks_per_node=2, cpus_per_task=1)
    ickd("launch", "train", *RUN, "trainer.epochs=2", "--profile", str(ddp), "--name", "ddp", cwd=tmp_path)
    launch = Launch.load("ddp", tmp_path / "launches")
    run, job = Path(launch.jobs[0]["out_dir"]), launch.jobs[0]["job_id"]
    wait_for(lambda: completed(run), 300, "the DDP run to complete")
    # result.json is written before the run-end callbacks append the "end" event: wait for both.
    wait_for(lambda: len(events(run)) >= 2, 60, "the run's end event")
    assert json.loads((run / "result.json").read_text())["world_size"] == 2
    assert [m["epoch"] for m in metrics(run)] == [1, 2]  # rank 0 alone writes each epoch once
    assert [e["event"] for e in events(run)] == ["start", "end"]
    logs = launch.submitit_dir
    wait_for(lambda: (logs / f"{job}_1_log.out").is_file(), 30, "rank 1's log")
    for rank in (0, 1):
        assert f"global_rank={rank}(2)" in (logs / f"{job}_{rank}_log.out").read_text()
    jobs_status_showing("ddp", ["1 COMPLETED"], tmp_path)
