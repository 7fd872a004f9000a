"""The launch layer without a cluster: resource profiles, grid expansion, stable run ids, a
preempted study trial that is suspended and continued by the same worker slot, and a real launch
through submitit's local executor (processes of this machine)."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from ickd.errors import ConfigError
from ickd.launch.manifest import Launch
from ickd.launch.profiles import PROFILE_DIR, load_profile
from ickd.launch.submit import expand_grid
from ickd.naming import run_id
from ickd.sweep.studies import StudyHandle
from ickd.sweep.worker import SUSPENDED, run_worker
from ickd.sweep.spec import load_spec
from tests.helpers import REPO, jobs_status_showing, run_ickd as ickd, wait_for


def write_profile(tmp_path: Path, **values) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


# --- profiles ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(PROFILE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_is_valid(path):
    profile = load_profile(path)
    params = profile.executor_parameters("job")
    assert params["timeout_min"] > 10  # submitit would count every preemption as a time-out otherwise
    if profile.cluster == "slurm":
        assert params["slurm_signal_delay_s"] < params["timeout_min"] * 60


def test_profile_maps_launcher_keys_to_submitit_parameters(tmp_path):
    profile = load_profile(write_profile(
        tmp_path, partition="gpu", gpus_per_node=2, tasks_per_node=2, cpus_per_task=6, mem_gb=40, timeout_min=120,
        account="lab", qos="high", constraint="a100", exclude="node7", signal_delay_s=90, array_parallelism=8,
        additional_parameters={"mail-type": "END"}, setup=["module load cuda"],
    ))
    p = profile.executor_parameters("myjob")
    assert p["name"] == "myjob" and p["gpus_per_node"] == 2 and p["tasks_per_node"] == 2 and p["mem_gb"] == 40
    assert p["slurm_partition"] == "gpu" and p["slurm_account"] == "lab" and p["slurm_qos"] == "high"
    assert p["slurm_constraint"] == "a100" and p["slurm_exclude"] == "node7" and p["slurm_signal_delay_s"] == 90
    assert p["slurm_array_parallelism"] == 8 and p["slurm_additional_parameters"] == {"mail-type": "END"}
    assert p["slurm_setup"] == ["module load cuda"]
    local = load_profile(PROFILE_DIR / "local.yaml").executor_parameters("j")
    assert not any(k.startswith("slurm_") for k in local)


@pytest.mark.parametrize(
    "values, words",
    [
        ({"gpus_per_nod": 1}, ["gpus_per_nod", "did you mean 'gpus_per_node'"]),
        ({"gpus_per_node": "two"}, ["gpus_per_node", "int"]),
        ({"timeout_min": 20, "signal_delay_s": 1200}, ["signal_delay_s", "timeout_min"]),
        ({"gres": "gpu:1", "gpus_per_node": 1}, ["gres", "gpus_per_node"]),
        ({"trials_per_gpu": 4, "tasks_per_node": 2}, ["trials_per_gpu", "DDP"]),
        ({"cluster": "local", "nodes": 2}, ["local", "nodes=1"]),
        ({"cluster": "pbs"}, ["cluster", "slurm or local"]),
        ({"cpus_per_task": 0}, ["cpus_per_task", "> 0"]),
        ({"mem_per_gpu": "8G", "mem_per_cpu": "2G"}, ["mem_per_gpu", "not both"]),
    ],
)
def test_bad_profiles_are_refused_before_submission(tmp_path, values, words):
    with pytest.raises(ConfigError) as err:
        load_profile(write_profile(tmp_path, **values))
    for word in words:
        assert word in str(err.value)


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="localcluster"):
        load_profile("nope-profile")


def test_short_time_limits_warn_about_submitit_timeout_accounting(tmp_path):
    with pytest.warns(UserWarning, match="timeout_min > 10"):
        load_profile(write_profile(tmp_path, timeout_min=5, signal_delay_s=60))


# --- grids and names -----------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_of_hydra_sweep_values():
    grid = expand_grid(["experiment=cifar100/res32x4_res8x4", "distill=kd,dkd,ickd", "seed=range(0,2)", "+tag=x"])
    assert len(grid) == 6
    assert grid[0] == ["experiment=cifar100/res32x4_res8x4", "distill=kd", "seed=0", "+tag=x"]
    assert {tuple(g[1:3]) for g in grid} == {(f"distill={d}", f"seed={s}") for d in ("kd", "dkd", "ickd") for s in (0, 1)}


def test_run_ids_are_stable_distinct_and_wandb_safe():
    a, b = run_id("grid-20261127", "grid-20261127-r001"), run_id("grid-20261127", "grid-20261127-r002")
    assert a == run_id("grid-20261127", "grid-20261127-r001") and a != b
    long = run_id("x" * 200, "weird name/with:chars")
    assert len(long) <= 64 and all(c.isalnum() or c in "-_" for c in long)


# --- a preempted trial continues as the same Optuna trial ------------------------------------------

class FakeGuard:
    """Stands in for the launcher's signal guard (no signal is sent): asks the trainer to stop
    after the 3rd batch and reports that the stop was a preemption (USR2), as PreemptionGuard does."""

    requeue_requested = True
    signal_name = "SIGUSR2"

    def __init__(self, after_batches: int | None) -> None:
        self.after, self.polls = after_batches, 0

    def on_run_start(self, run): ...
    def on_epoch_end(self, epoch, metrics): ...
    def on_checkpoint(self, path, epoch): ...
    def should_stop(self): return False
    def on_run_end(self, summary): ...

    def interrupt_requested(self):
        if self.after is None:
            return False
        self.polls += 1
        return self.polls >= self.after


@pytest.mark.slow
def test_preempted_trial_is_suspended_then_continued_as_the_same_trial(tmp_path, teacher_dir):
    spec_file = tmp_path / "s.yaml"
    spec = yaml.safe_load((REPO / "sweeps" / "synthetic_smoke.yaml").read_text())
    spec["base"] = [*spec["base"], f"teacher.checkpoint={teacher_dir}"]
    spec["n_trials"] = 1
    spec_file.write_text(yaml.safe_dump(spec))
    handle = StudyHandle.create(load_spec(spec_file), tmp_path / "studies")
    state = tmp_path / "worker-000.json"

    counts = run_worker(str(handle.dir), index=0, guard=FakeGuard(3), state_file=state)
    assert counts == {SUSPENDED: 1}
    [trial] = handle.study().get_trials(deepcopy=False)
    assert trial.state == TrialState.RUNNING and trial.user_attrs["suspended_at"] is not None
    assert json.loads(state.read_text())["number"] == trial.number
    # A suspended trial is not reaped while its job is away (the pid is gone, the grace is not over).
    from ickd.sweep.reaper import reap

    assert reap(handle.study(), grace_s=120, max_retries=1, suspend_grace_s=600) == []

    counts = run_worker(str(handle.dir), index=0, guard=FakeGuard(None), state_file=state)
    assert counts == {"COMPLETE": 1}
    trials = handle.study().get_trials(deepcopy=False)
    assert len(trials) == 1 and trials[0].number == trial.number and trials[0].state == TrialState.COMPLETE
    metrics = [json.loads(x) for x in (Path(trials[0].user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert not state.exists()
    assert trials[0].user_attrs["run_id"] == run_id("synthetic_smoke", "synthetic_smoke-t0000")


def test_suspended_trial_is_reaped_after_its_grace(tmp_path):
    from ickd.sweep.liveness import worker_is_gone

    attrs = {"worker_host": "elsewhere", "worker_pid": 1, "heartbeat_at": 0.0, "suspended_at": 1000.0}
    assert worker_is_gone(attrs, grace_s=10, started_at=0.0, now=1500.0, suspend_grace_s=600) is None
    assert "suspended" in worker_is_gone(attrs, grace_s=10, started_at=0.0, now=1700.0, suspend_grace_s=600)


# --- a real launch with submitit's local executor --------------------------------------------------






TEACHER_RUN = ["dataset=synthetic", "stage=teacher", "model=resnet8", "trainer.device=cpu", "trainer.progress=off", "trainer.batch_size=32"]


@pytest.mark.slow
def test_local_executor_launch_is_fire_and_forget_with_manifest_and_snapshot(tmp_path):
    start = time.time()
    out = ickd("launch", "train", *TEACHER_RUN, "trainer.epochs=2", "--profile", "local", "--name", "loc", cwd=tmp_path).stdout
    assert "launch loc: 1 run(s)" in out
    launch = Launch.load("loc", tmp_path / "launches")
    [entry] = launch.jobs
    assert entry["job_id"] and entry["run_id"] == entry["wandb_run_id"] == run_id("loc", "loc-r000")
    assert launch.data["code"]["snapshot"] == str(launch.code_dir) and (launch.code_dir / "ickd" / "engine" / "trainer.py").is_file()
    assert (launch.code_dir / "configs" / "train.yaml").is_file()
    assert "git_commit" in launch.data["code"]
    result = Path(entry["out_dir"]) / "result.json"
    wait_for(result.is_file, 240, "the local job's result")
    assert json.loads(result.read_text())["status"] == "completed"
    events = [json.loads(x) for x in (Path(entry["out_dir"]) / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["code"] == str(launch.code_dir / "ickd")  # ran the snapshot
    status = jobs_status_showing("loc", ["COMPLETED"], tmp_path)
    assert "loc-r000" in status and "2/2" in status
    assert time.time() - start < 300


def test_launch_refuses_a_bad_run_before_submitting(tmp_path):
    proc = ickd("launch", "train", *TEACHER_RUN, "model=resnet_nope", "--profile", "local", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "resnet_nope" in proc.stderr
    assert not (tmp_path / "launches").exists()  # nothing submitted, no manifest
    proc = ickd("launch", "train", *TEACHER_RUN, "seed=0,1", "--profile", "local", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "ickd launch grid" in proc.stderr


def test_jobs_commands_name_missing_launches(tmp_path):
    proc = ickd("jobs", "status", "nope", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "no launch 'nope'" in proc.stderr
    proc = ickd("jobs", "logs", "12345_0", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "12345_0" in proc.stderr


@pytest.mark.slow
def test_local_pack_runs_each_run_in_its_own_process_and_requeues_on_usr2(tmp_path):
    """trials_per_gpu packs runs into one job. USR2 to the job (what SLURM's --signal sends before a
    time limit or preemption) reaches every packed run: each saves a mid-epoch checkpoint, the job
    requeues itself (submitit's local executor restarts it), and each run resumes from its batch."""
    profile = write_profile(tmp_path, cluster="local", timeout_min=60, cpus_per_task=2, trials_per_gpu=2, signal_delay_s=30)
    ickd("launch", "grid", *TEACHER_RUN, "trainer.epochs=6", "seed=0,1", "--profile", str(profile), "--name", "pack", cwd=tmp_path)
    launch = Launch.load("pack", tmp_path / "launches")
    assert len(launch.jobs) == 2 and len({j["job_id"] for j in launch.jobs}) == 1  # two runs, one job
    runs = [Path(j["out_dir"]) for j in launch.jobs]
    wait_for(lambda: all((r / "metrics.jsonl").is_file() for r in runs), 240, "both packed runs to finish an epoch")
    # The local executor's controller (the job id) does not forward USR2; SLURM signals the job's
    # process, so do the same: signal the controller's child.
    import os

    controller = int(launch.jobs[0]["job_id"])
    children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGUSR2)
    for run in runs:
        result = run / "result.json"
        wait_for(lambda: result.is_file() and json.loads(result.read_text())["status"] == "completed", 240, f"{run.name} to complete")
        events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
        kinds = [e["event"] for e in events]
        assert kinds[:5] == ["start", "signal", "checkpoint", "end", "start"], kinds
        assert events[1]["signal"] == "SIGUSR2" and events[3]["status"] == "interrupted"
        assert events[0]["pid"] != events[4]["pid"]  # a new process...
        assert (events[4]["epoch"], events[4]["batch"]) > (0, 0)  # ...that resumed where the first stopped
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == list(range(1, 7))
    assert "no failed job" in ickd("jobs", "resubmit-failed", "pack", cwd=tmp_path).stdout


@pytest.mark.slow
def test_local_packed_study_workers_share_one_job_and_complete_the_budget(tmp_path, teacher_dir):
    """`ickd launch sweep` with trials_per_gpu=2: one job runs two study workers, each its own
    process with its share of the CPUs; together they complete the study's budget and stop."""
    spec = yaml.safe_load((REPO / "sweeps" / "synthetic_smoke.yaml").read_text())
    spec["base"] = [*spec["base"], f"teacher.checkpoint={teacher_dir}"]
    spec["n_trials"] = 3
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    ickd("sweep", "--root", str(tmp_path / "studies"), "create", str(tmp_path / "s.yaml"), "--name", "pk", cwd=tmp_path)
    profile = write_profile(tmp_path, cluster="local", timeout_min=60, cpus_per_task=2, trials_per_gpu=2)
    out = ickd("launch", "sweep", "pk", "--workers", "2", "--studies-root", str(tmp_path / "studies"), "--profile", str(profile), "--name", "pks", cwd=tmp_path).stdout
    assert "2 worker(s) in 1 job(s)" in out
    launch = Launch.load("pks", tmp_path / "launches")
    assert launch.jobs[0]["workers"] == [0, 1]
    handle = StudyHandle.load("pk", tmp_path / "studies")
    jobs_status_showing("pks", ["1 COMPLETED"], tmp_path, timeout=400)
    trials = handle.study().get_trials(deepcopy=False)
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 3
    assert {t.user_attrs["worker_pid"] for t in trials} and len({t.user_attrs["worker_pid"] for t in trials}) == 2  # two processes
    logs = sorted((launch.dir / "workers").glob("worker-*.log"))
    assert [p.name for p in logs] == ["worker-000.log", "worker-001.log"]
