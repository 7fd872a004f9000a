"""The `ickd` command line as users type it, through the real console script (.venv/bin/ickd):
global options before or after the verb, every printed `next:` command pasted back, help text on
every option, --version, a bare `ickd`, exit codes."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ickd.cli_args import walk_parsers
from tests.helpers import REPO, wait_for

ICKD = Path(sys.executable).parent / "ickd"  # the installed console script, as users run it
SMOKE = REPO / "sweeps" / "synthetic_smoke.yaml"
TEACHER_RUN = ["dataset=synthetic", "stage=teacher", "model=resnet8", "trainer.device=cpu", "trainer.progress=off",
               "trainer.batch_size=32", "trainer.epochs=1"]


def ickd(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    assert ICKD.is_file(), f"console script {ICKD} missing: pip install -e ."
    return subprocess.run([str(ICKD), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def next_commands(stdout: str) -> list[list[str]]:
    """Every `next: <command>` line of an output, split as a shell would."""
    commands = [shlex.split(line.split("next:", 1)[1]) for line in stdout.splitlines() if line.lstrip().startswith("next:")]
    for cmd in commands:
        assert cmd[0] == "ickd", cmd
    return commands


def paste(stdout: str, cwd: Path, env: dict | None = None, expect: int = 1) -> list[subprocess.CompletedProcess]:
    """Run each printed next: command as pasted into a shell in the same folder; each must exit 0."""
    commands = next_commands(stdout)
    assert len(commands) == expect, stdout
    results = []
    for cmd in commands:
        proc = ickd(*cmd[1:], cwd=cwd, env=env)
        assert proc.returncode == 0, f"pasted `{shlex.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        results.append(proc)
    return results


# --- 1. global options before or after the verb ---------------------------------------------------

def _parsers() -> dict[str, argparse.ArgumentParser]:
    from ickd import demo
    from ickd.launch import cli as launch_cli
    from ickd.sweep import cli as sweep_cli
    from ickd.report import cli as report_cli, compare
    from ickd.track import sync

    return {"sweep": sweep_cli.build_parser(), "launch": launch_cli.build_parser("launch"), "jobs": launch_cli.build_parser("jobs"),
            "compare": compare.build_parser(), "report": report_cli.build_parser(), "wandb": sync.build_parser(),
            "demo": demo.build_parser()}


@pytest.mark.parametrize("argv, key, value", [
    (["jobs", "--root", "R", "status", "L"], "root", "R"),
    (["jobs", "status", "L", "--root", "R"], "root", "R"),
    (["jobs", "status", "L"], "root", None),
    (["jobs", "--root", "A", "logs", "1_0", "--root", "B"], "root", "B"),  # the later one wins, as usual
    (["sweep", "--root", "R", "create", "f.yaml"], "root", "R"),
    (["sweep", "create", "f.yaml", "--root", "R"], "root", "R"),
    (["sweep", "status", "s"], "root", None),
    (["launch", "--profile", "local", "--root", "R", "train", "a=1"], "root", "R"),
    (["launch", "train", "--profile", "local", "--root", "R", "a=1"], "root", "R"),
    (["launch", "--profile", "local", "train", "a=1"], "profile", "local"),
    (["launch", "--studies-root", "S", "sweep", "st", "--workers", "2", "--profile", "p"], "studies_root", "S"),
    (["launch", "sweep", "st", "--workers", "2", "--profile", "p", "--studies-root", "S"], "studies_root", "S"),
])
def test_global_options_parse_before_or_after_the_verb(argv, key, value):
    args = _parsers()[argv[0]].parse_args(argv[1:])
    assert getattr(args, key) == value


@pytest.mark.slow
def test_launch_without_profile_is_a_usage_error(tmp_path):
    proc = ickd("launch", "train", "a=1", cwd=tmp_path)
    assert proc.returncode == 2 and "required: --profile" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sweep_root_before_or_after_the_verb_for_real(tmp_path):
    env = {"ICKD_TEACHER": str(tmp_path / "no-teacher")}  # only composed here, never loaded
    before = ickd("sweep", "--root", str(tmp_path / "r1"), "create", str(SMOKE), "--name", "a", cwd=tmp_path, env=env)
    after = ickd("sweep", "create", str(SMOKE), "--name", "b", "--root", str(tmp_path / "r2"), cwd=tmp_path, env=env)
    assert before.returncode == 0 and after.returncode == 0, before.stderr + after.stderr
    assert (tmp_path / "r1" / "a" / "study.yaml").is_file() and (tmp_path / "r2" / "b" / "study.yaml").is_file()
    assert not (tmp_path / "studies").exists()
    for argv in (["--root", str(tmp_path / "r1"), "status", "a"], ["status", "b", "--root", str(tmp_path / "r2")]):
        proc = ickd("sweep", *argv, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_jobs_root_before_or_after_the_verb_for_real(tmp_path):
    """A launch is found with --root on either side of the verb, and not without it."""
    root = tmp_path / "elsewhere"
    dry = ickd("launch", "--profile", "local", "--root", str(root), "train", *TEACHER_RUN, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    from ickd.launch.manifest import Launch
    from ickd.launch.profiles import load_profile
    from ickd.launch.submit import _prepare

    _prepare("train", load_profile("local"), "mine", str(root), ["ickd", "launch"]).save()
    for argv in (["--root", str(root), "status", "mine"], ["status", "mine", "--root", str(root)]):
        proc = ickd("jobs", *argv, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    missing = ickd("jobs", "status", "mine", cwd=tmp_path)
    assert missing.returncode == 2 and "no launch 'mine'" in missing.stderr
    assert Launch.load("mine", root).name == "mine"


# --- 2. every printed next: command works when pasted ------------------------------------------------

@pytest.mark.slow
def test_next_of_sweep_create_runs_when_pasted(tmp_path, teacher_dir):
    root = tmp_path / "my studies"  # a space: the printed command must quote it
    env = {"ICKD_TEACHER": str(teacher_dir)}
    proc = ickd("sweep", "create", str(SMOKE), "--root", str(root), "--trials", "1", "-o", "trainer.epochs=1", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    [run] = paste(proc.stdout, tmp_path, env)
    assert "complete 1" in run.stdout
    # The hints of errors carry --root too: creating it again names a command that continues it.
    again = ickd("sweep", "create", str(SMOKE), "--root", str(root), "--trials", "1", cwd=tmp_path, env=env)
    assert again.returncode == 2
    hint = again.stderr.split("continue it with `", 1)[1].split("`", 1)[0]
    assert shlex.split(hint)[:2] == ["ickd", "sweep"] and str(root) in shlex.split(hint)
    cont = ickd(*shlex.split(hint)[1:], cwd=tmp_path, env=env)
    assert cont.returncode == 0, cont.stdout + cont.stderr  # budget used: nothing to do, but the command works
    bad = ickd("sweep", "--root", str(root), "run", "synthetic_smoke", "--trials", "0", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and str(root) in shlex.split(bad.stderr.split("e.g. `", 1)[1].split("`", 1)[0])


@pytest.mark.slow
def test_next_of_a_local_launch_runs_when_pasted(tmp_path):
    root = tmp_path / "my launches"
    proc = ickd("launch", "train", *TEACHER_RUN, "--profile", "local", "--name", "nx", "--root", str(root), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [status] = paste(proc.stdout, tmp_path)
    assert "nx-r000" in status.stdout
    from ickd.launch.manifest import Launch

    [entry] = Launch.load("nx", root).jobs
    wait_for((Path(entry["out_dir"]) / "result.json").is_file, 300, "the launched run")  # leave no job behind


@pytest.mark.slow
def test_next_of_compare_as_a_launch_runs_when_pasted(tmp_path):
    """A study with one completed trial (added through Optuna; its numbers are not used here), then
    `ickd compare --profile local`: its next: line (jobs status) works when pasted."""
    import optuna

    from ickd.sweep.spec import load_spec
    from ickd.sweep.studies import StudyHandle

    root = tmp_path / "studies"
    handle = StudyHandle.create(load_spec(SMOKE, name="cmpnext"), root)
    study = handle.study()
    trial = study.ask({"memory.k": optuna.distributions.CategoricalDistribution([2, 4, 8]),
                       "distill.picd_weight": optuna.distributions.FloatDistribution(0.1, 2.0)})
    study.tell(trial, 50.0)
    env = {"ICKD_LAUNCHES": str(tmp_path / "launches"), "ICKD_TEACHER": str(tmp_path / "no-teacher")}
    proc = ickd("compare", "cmpnext", "--root", str(root), "--seeds", "1", "--baselines", "ce", "--no-default", "--no-ablation",
                "--profile", "local", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [status] = paste(proc.stdout, tmp_path, env)
    assert "compare-" in status.stdout or "ickd-tuned" in status.stdout
    from ickd.launch.manifest import all_launches

    for launch in all_launches(tmp_path / "launches"):  # the jobs fail fast (no teacher): wait for them
        wait_for(lambda: _job_done(launch), 300, "the launched runs")


def _job_done(launch) -> bool:
    from ickd.launch.jobs import ACTIVE, job_states

    return not any(s in ACTIVE for s in job_states(launch).values())


def test_every_next_line_in_the_code_is_covered():
    """Each place in ickd/ that prints a next: command is exercised by a test above."""
    printers = sorted(str(p.relative_to(REPO)) for p in (REPO / "ickd").rglob("*.py") if "next: ickd" in p.read_text())
    assert printers == ["ickd/launch/cli.py", "ickd/report/compare.py", "ickd/sweep/cli.py"], printers


# --- 3. help text, --version, bare ickd -------------------------------------------------------------

def test_every_option_of_every_command_has_help():
    missing = []
    for group, top in _parsers().items():
        for name, parser in walk_parsers(top, f"ickd {group}"):
            for action in parser._actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                if isinstance(action, argparse._SubParsersAction):
                    missing += [f"{name} {a.dest}" for a in action._choices_actions if not a.help]
                    continue
                if not action.help or action.help == argparse.SUPPRESS:
                    missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help text: {missing}"


def test_version_bare_and_help_exit_codes(tmp_path):
    from ickd.cli import version

    proc = ickd("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ickd {version()}" and version()[0].isdigit()
    bare = ickd(cwd=tmp_path)
    assert bare.returncode == 2 and "usage: ickd" in bare.stderr and bare.stdout == ""
    for flag in ("--help", "-h"):
        helped = ickd(flag, cwd=tmp_path)
        assert helped.returncode == 0 and "usage: ickd" in helped.stdout
    unknown = ickd("tarin", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown command 'tarin'" in unknown.stderr


# --- 4. a failing point of a -m multirun does not stop the others -------------------------------------

@pytest.mark.slow
def test_multirun_failing_job_does_not_stop_the_others(tmp_path):
    """Point #0 fails inside the task (its trainer.resume names no checkpoint: CheckpointError, exit 2);
    point #1 still trains; then the command exits 2 and lists the failed point."""
    sweep = tmp_path / "multi"
    proc = ickd("train", "-m", *TEACHER_RUN, "trainer.resume=/nonexistent/last.pt,never", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "1 multirun job(s) failed" in proc.stderr and "#0" in proc.stderr and "trainer.resume=/nonexistent/last.pt" in proc.stderr
    assert "Traceback" not in out
    failed, done = (json.loads((sweep / n / "result.json").read_text()) for n in ("0", "1"))
    assert failed["status"] == "failed" and failed["exit_code"] == 2 and "no checkpoint at /nonexistent/last.pt" in failed["error"]
    assert done["status"] == "completed" and done["epochs_completed"] == 1


# --- 6. a full disk (a real 4 MiB tmpfs): exit 2 naming the disk, last good checkpoint kept ---------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (needs root and mount rights, as in CI's container); skipped elsewhere."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the full-disk tests need one")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """Fill the filesystem at ``mnt`` up to ``leave`` bytes free."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_atomic_write_on_a_full_disk_keeps_the_old_file(small_disk):
    from ickd.engine.checkpoint import atomic_write_bytes
    from ickd.errors import DiskWriteError

    target = small_disk / "run" / "result.json"
    atomic_write_bytes(target, b'{"status": "completed"}\n')
    fill(small_disk, 64 * 1024)
    with pytest.raises(DiskWriteError) as info:
        atomic_write_bytes(target, b"x" * (512 * 1024))
    message = str(info.value)
    assert f"filesystem mounted at {small_disk}" in message and f"free space on {small_disk}" in message and "hydra.run.dir=" in message
    assert isinstance(info.value, OSError) and info.value.errno == 28
    assert target.read_bytes() == b'{"status": "completed"}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]  # no temporary file left


@pytest.mark.slow
def test_full_disk_during_training_exits_2_and_keeps_the_last_checkpoint(small_disk, tmp_path):
    from ickd.engine.checkpoint import load_checkpoint

    run = small_disk / "run"
    args = [*TEACHER_RUN, f"hydra.run.dir={run}"]
    first = ickd("train", *args, cwd=tmp_path)  # epoch 1 fits: last.pt + best.pt, about 1 MiB
    assert first.returncode == 0, first.stdout + first.stderr
    filler = fill(small_disk, 200 * 1024)  # room for logs, not for the next last.pt
    full = ickd("train", *args[:-2], "trainer.epochs=2", f"hydra.run.dir={run}", cwd=tmp_path)
    out = full.stdout + full.stderr
    assert full.returncode == 2, out
    assert "Traceback" not in out
    assert f"cannot write {run / 'checkpoints' / 'last.pt'}: the disk is full (filesystem mounted at {small_disk}" in out
    assert f"free space on {small_disk}" in out and "hydra.run.dir=" in out
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1  # the last good checkpoint
    assert json.loads((run / "result.json").read_text())["status"] in ("completed", "failed")  # whole, parseable
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert not [p for p in run.rglob("*.tmp")]
    filler.unlink()  # the fix: free space, run the same command again
    again = ickd("train", *args[:-2], "trainer.epochs=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["epochs_completed"] == 2
