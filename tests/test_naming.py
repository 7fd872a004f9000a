"""W&B and Optuna names (issue 11, scope 6), against real components: real offline W&B runs read
back from their ``.wandb`` files, real launched runs and study workers on the synthetic dataset,
real journal and PostgreSQL Optuna storages.

No W&B server can exist here, so the one thing that needs one, downloading an artifact with
``wandb.Api`` for ``trainer.resume=wandb:...``, uses a stand-in Api that serves the very file the
real offline run staged for upload (the file ``wandb sync`` would send)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import textwrap
from pathlib import Path

import optuna
import pytest

from ickd.engine import Callback, train
from ickd.errors import ConfigError
from ickd.naming import launch_run_name, run_id, trial_run_name
from ickd.track import loggers_for
from ickd.track.artifacts import artifact_path, resolve_resume
from ickd.track.records import read_run, records, run_file
from ickd.track.wandb_logger import LAST_EPOCH_FILE, RUN_ID_FILE
from tests.helpers import FAST, REPO, compose_config, run_ickd, wait_for

TEACHER = [*FAST, "stage=teacher", "model=resnet8", "trainer.max_batches_per_epoch=2"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline W&B; artifact staging (WANDB_DATA_DIR) under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var, sub in (("WANDB_DIR", "wandb-default"), ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path / "wandb-data"


def offline_run(run_dir: Path, index: int = -1) -> dict:
    """One offline run of ``run_dir`` (the last by default) once its exit record is on disk: its
    run record fields and every artifact it logged (name, type, aliases, metadata, staged files)."""
    def read():
        folders = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
        if not folders:
            return None
        path = run_file(folders[index])
        if path is None:
            return None
        run: dict = {"artifacts": [], "exit": False}
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.update(id=r.run_id, group=r.run_group, job_type=r.job_type, name=r.display_name, tags=list(r.tags))
            elif kind == "artifact":
                a = record.artifact
                run["artifacts"].append({
                    "name": a.name, "type": a.type, "aliases": sorted(a.aliases), "metadata": json.loads(a.metadata or "{}"),
                    "files": {c.path: {"local_path": c.local_path, "digest": c.digest} for c in a.manifest.contents},
                })
            elif kind == "exit":
                run["exit"] = True
        run["epochs"] = [row["epoch"] for row in read_run(path)["history"]]
        return run if run["exit"] else None

    return wait_for(read, timeout=60, what=f"the offline W&B run under {run_dir}", every=0.2)


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


# --- run ids and names ------------------------------------------------------------------------

def test_run_ids_carry_the_trial_or_run_number_and_stay_wandb_safe_and_stable():
    study = "fmnist-picd-weighting-with-a-long-study-name"
    ids = [run_id(study, trial_run_name(study, n)) for n in (7, 8, 1234)]
    assert "-t0007-" in ids[0] and "-t0008-" in ids[1] and "-t1234-" in ids[2]
    assert len(set(ids)) == 3 and ids[0] == run_id(study, trial_run_name(study, 7))  # a retry/requeue reuses it
    launch = "grid-20261206-023000"
    rid = run_id(launch, launch_run_name(launch, 3))
    assert rid.startswith(f"{launch}-r003-")
    for value in [*ids, rid, run_id("x" * 200, "weird name/with:chars-r999"), run_id("s-cmp", "s-cmp-" + "row" * 20 + "-s3")]:
        assert 1 <= len(value) <= 64 and all(c.isalnum() or c in "-_" for c in value), value
    assert run_id("s-cmp", "s-cmp-" + "row" * 20 + "-s3").split("-")[-2] == "s3"  # the tail (seed) survives


# --- group / job_type / tags --------------------------------------------------------------------

def test_loggers_for_keeps_the_users_group_and_job_type_and_adds_platform_tags():
    cfg = compose_config("logger=wandb", "logger.group=mine", "logger.job_type=ablation", "logger.tags=[a]")
    (logger,) = loggers_for(cfg, "/tmp/x", run_id="s-t0001-abcd", group="study", job_type="trial", tags=["study:s", "trial:1", "a"])
    assert (logger.group, logger.job_type, logger.tags) == ("mine", "ablation", ["a", "study:s", "trial:1"])
    (logger,) = loggers_for(compose_config("logger=wandb"), "/tmp/x", group="study", job_type="trial", tags=["study:s"])
    assert (logger.group, logger.job_type, logger.tags) == ("study", "trial", ["study:s"])  # null: the platform fills them


@pytest.mark.slow
def test_launched_run_keeps_user_group_and_job_type_and_is_named_by_its_run_number(tmp_path, offline):
    from ickd.launch.tasks import RunSpec, train_one

    name = launch_run_name("grid-x", 3)
    user = ["logger=wandb", "logger.group=my-ablation", "logger.job_type=baseline", "logger.tags=[mine]"]
    spec = RunSpec(3, name, run_id("grid-x", name), str(tmp_path / "runs" / name), [*TEACHER, "trainer.epochs=1", *user], "grid-x")
    assert train_one(spec, Callback())["status"] == "completed"
    run = offline_run(Path(spec.out_dir))
    assert (run["group"], run["job_type"]) == ("my-ablation", "baseline")  # kept, not replaced by the launch's
    assert run["tags"] == ["mine", "launch:grid-x", "run:3"]
    assert run["name"] == "grid-x-r003" and run["id"] == spec.run_id and "-r003-" in run["id"]
    # Left null: the launch fills them (group = launch name, job_type = stage).
    name = launch_run_name("grid-x", 4)
    spec = RunSpec(4, name, run_id("grid-x", name), str(tmp_path / "runs" / name), [*TEACHER, "trainer.epochs=1", "logger=wandb"], "grid-x")
    assert train_one(spec, Callback())["status"] == "completed"
    run = offline_run(Path(spec.out_dir))
    assert (run["group"], run["job_type"], run["tags"]) == ("grid-x", "teacher", ["launch:grid-x", "run:4"])


def _study_spec(name: str, base_extra: list[str], n_trials: int = 1):
    from ickd.sweep.spec import load_spec

    return load_spec({
        "name": name,
        "base": [*TEACHER, "dataset.holdout=64", "trainer.epochs=1", *base_extra],
        "objective": {"metric": "holdout/top1", "mode": "best", "direction": "maximize"},
        "space": {"optim.lr": "interval(0.01, 0.2)"},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "n_trials": n_trials,
    })


@pytest.mark.slow
def test_study_trial_keeps_user_group_and_job_type_and_carries_the_trial_number(tmp_path, offline):
    from ickd.sweep.studies import StudyHandle
    from ickd.sweep.worker import run_worker

    study = "naming-study-with-a-rather-long-name"
    spec = _study_spec(study, ["logger=wandb", "logger.group=my-group", "logger.job_type=hpo", "logger.tags=[mine]"])
    handle = StudyHandle.create(spec, tmp_path / "studies")
    run_worker(str(handle.dir))
    (trial,) = handle.study().get_trials(deepcopy=False)
    run = offline_run(Path(trial.user_attrs["run_dir"]))
    assert (run["group"], run["job_type"]) == ("my-group", "hpo")
    assert run["tags"] == ["mine", f"study:{study}", "trial:0"]
    assert run["name"] == f"{study}-t0000"
    assert run["id"] == trial.user_attrs["run_id"] and "-t0000-" in run["id"] and len(run["id"]) <= 64


@pytest.mark.slow
def test_a_retried_trial_keeps_its_first_trials_wandb_run_id(tmp_path, offline):
    """A retry continues the W&B run of the trial it retries, also one named by an older id scheme."""
    from optuna.trial import TrialState, create_trial

    from ickd.sweep.reaper import enqueue_retry
    from ickd.sweep.studies import StudyHandle
    from ickd.sweep.worker import run_worker

    handle = StudyHandle.create(_study_spec("retried", ["logger=wandb"]), tmp_path / "studies")
    study = handle.study()
    study.add_trial(create_trial(state=TrialState.FAIL, params={"optim.lr": 0.05}, distributions=handle.spec.space,
                                 user_attrs={"run_id": "retried-legacy-id", "first_trial": 0, "run_dir": str(handle.trial_dir(0))}))
    enqueue_retry(study, study.trials[0], "test")
    run_worker(str(handle.dir))
    retry = handle.study().trials[1]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs["run_id"] == "retried-legacy-id"
    run = offline_run(handle.trial_dir(0))
    assert run["id"] == "retried-legacy-id" and run["name"] == "retried-t0000" and "trial:0" in run["tags"]


# --- Optuna study names and attrs ---------------------------------------------------------------

def _pg_url():
    from tests.services import postgres_bin, postgres_server

    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries missing (CI installs postgresql)")
    return postgres_server()


@pytest.mark.parametrize("storage", ["journal", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_created_study_has_metric_names_and_objective_and_base_as_user_attrs(tmp_path, storage):
    from contextlib import nullcontext

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from ickd.sweep.studies import StudyHandle, spec_hash

    with (_pg_url() if storage == "postgresql" else nullcontext(None)) as url:
        spec = _study_spec(f"attrs-{storage}", ["+db.password=planted-pw-123"])
        spec.storage = url
        handle = StudyHandle.create(spec, tmp_path / "studies")
        # A fresh load, as optuna-dashboard or a user's script does, without study.yaml.
        fresh = JournalStorage(JournalFileBackend(str(handle.dir / "journal.log"))) if url is None else url
        study = optuna.load_study(study_name=spec.name, storage=fresh)
        assert study.metric_names == ["holdout/top1"]
        attrs = study.user_attrs
        assert attrs["objective"] == {"metric": "holdout/top1", "mode": "best", "direction": "maximize"}
        assert attrs["direction"] == "maximize" and study.direction == optuna.study.StudyDirection.MAXIMIZE
        assert attrs["spec_name"] == spec.name and attrs["spec_hash"] == spec_hash(spec) and len(attrs["spec_hash"]) == 16
        assert attrs["base_overrides"][:3] == spec.base[:3] and "trainer.epochs=1" in attrs["base_overrides"]
        assert "+db.password=***" in attrs["base_overrides"] and "planted-pw-123" not in json.dumps(attrs)
        # Loading the existing study again (exist_ok) keeps them; the hash ignores the budget.
        spec.n_trials = 9
        StudyHandle.create(spec, tmp_path / "studies", exist_ok=True)
        again = optuna.load_study(study_name=spec.name, storage=fresh)
        assert again.metric_names == ["holdout/top1"] and again.user_attrs["spec_hash"] == attrs["spec_hash"]


# --- checkpoint artifacts -----------------------------------------------------------------------

@pytest.mark.slow
def test_log_checkpoints_stages_last_pt_each_save_and_best_pt_at_the_end(tmp_path, offline):
    cfg = compose_config(*TEACHER, "trainer.epochs=2", "logger=wandb", "logger.log_checkpoints=true")
    out = tmp_path / "run"
    assert train(cfg, out, callbacks=loggers_for(cfg, out))["status"] == "completed"
    run = offline_run(out)
    rid = (out / RUN_ID_FILE).read_text().strip()
    last = [a for a in run["artifacts"] if a["name"] == f"{rid}-last"]
    assert [a["type"] for a in last] == ["checkpoint", "checkpoint"]
    assert [a["aliases"] for a in last] == [["epoch-1", "latest"], ["epoch-2", "latest"]]
    assert [a["metadata"]["epoch"] for a in last] == [1, 2] and last[0]["metadata"]["run_id"] == rid
    # Each save is staged as its own copy (the file is overwritten by the next save); the last one
    # is byte for byte the run's checkpoints/last.pt, and it lies under WANDB_DATA_DIR until synced.
    staged = [Path(a["files"]["last.pt"]["local_path"]) for a in last]
    assert all(p.is_file() and offline in p.parents for p in staged) and staged[0] != staged[1]
    assert staged[1].read_bytes() == (out / "checkpoints" / "last.pt").read_bytes()
    assert last[1]["files"]["last.pt"]["digest"] == md5_b64(out / "checkpoints" / "last.pt")
    (best,) = [a for a in run["artifacts"] if a["name"] == f"model-{rid}"]
    assert best["type"] == "model" and best["aliases"] == ["best", "latest"]
    assert Path(best["files"]["best.pt"]["local_path"]).read_bytes() == (out / "checkpoints" / "best.pt").read_bytes()


@pytest.mark.slow
def test_without_log_checkpoints_no_checkpoint_artifact_and_log_model_alone_uploads_best(tmp_path, offline):
    cfg = compose_config(*TEACHER, "trainer.epochs=1", "logger=wandb", "logger.log_model=true")
    out = tmp_path / "run"
    assert train(cfg, out, callbacks=loggers_for(cfg, out))["status"] == "completed"
    run = offline_run(out)
    rid = (out / RUN_ID_FILE).read_text().strip()
    assert [a["name"] for a in run["artifacts"]] == [f"model-{rid}"]


# --- trainer.resume=wandb:... -------------------------------------------------------------------

class StandInApi:
    """Stands in for ``wandb.Api`` (no W&B server can run here): serves the files a real offline run
    staged for its artifact, the way ``Artifact.download(root)`` lays them out."""

    def __init__(self, artifact: dict | None) -> None:
        self.artifact_record, self.asked = artifact, []

    def __call__(self) -> "StandInApi":  # used as the Api factory: wandb.Api()
        return self

    def artifact(self, name: str, type: str | None = None):
        self.asked.append((name, type))
        if self.artifact_record is None:
            raise ValueError(f"artifact {name} not found")
        record = self.artifact_record

        class Downloaded:
            metadata = record["metadata"]

            def download(self, root: str) -> str:
                for path, entry in record["files"].items():
                    Path(root, path).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(entry["local_path"], Path(root, path))
                return root

        return Downloaded()


def _trained_with_checkpoints(tmp_path: Path) -> tuple[str, dict, list]:
    """Cluster A: a 1-epoch run (of 2) that logs its checkpoints; its last `-last` artifact."""
    base = [*TEACHER, "logger=wandb", "logger.entity=mylab", "logger.log_checkpoints=true"]
    cfg = compose_config(*base, "trainer.epochs=1")
    out = tmp_path / "cluster-a"
    assert train(cfg, out, callbacks=loggers_for(cfg, out))["status"] == "completed"
    rid = (out / RUN_ID_FILE).read_text().strip()
    (artifact,) = [a for a in offline_run(out)["artifacts"] if a["name"] == f"{rid}-last"]
    return rid, artifact, base


@pytest.mark.slow
def test_resume_from_a_wandb_artifact_continues_the_run_on_another_cluster(tmp_path, offline, monkeypatch):
    import wandb

    from ickd.launch.tasks import RunSpec, train_one

    rid, artifact, base = _trained_with_checkpoints(tmp_path)
    api = StandInApi(artifact)
    monkeypatch.setattr(wandb, "Api", api)  # what resolve_resume calls by default
    # Cluster B, a launched run in a fresh folder: resumes at epoch 1 from the downloaded file.
    ref = f"wandb:mylab/ickd/{rid}-last:latest"
    spec = RunSpec(0, "b-r000", "b-r000-1234abcd", str(tmp_path / "cluster-b"), [*base, "trainer.epochs=2", f"trainer.resume={ref}"], "b")
    summary = train_one(spec, Callback())
    assert api.asked == [(f"mylab/ickd/{rid}-last:latest", "checkpoint")]
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] == 1 and summary["epochs_completed"] == 2
    downloaded = next(Path(spec.out_dir, "checkpoints", "wandb").rglob("last.pt"))
    assert downloaded.read_bytes() == Path(artifact["files"]["last.pt"]["local_path"]).read_bytes()
    metrics = [json.loads(line)["epoch"] for line in Path(spec.out_dir, "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2]  # epoch 1 from the checkpoint's history, epoch 2 trained here
    # Requeued in the same folder: its own, newer last.pt wins and nothing is downloaded again.
    api.artifact_record = None
    cfg = resolve_resume(compose_config(*base, "trainer.epochs=2", f"trainer.resume={ref}"), spec.out_dir, api=api)
    assert cfg.trainer.resume == "auto" and len(api.asked) == 1


@pytest.mark.slow
def test_ickd_train_resumes_from_a_wandb_artifact_and_continues_the_same_wandb_run(tmp_path, offline, monkeypatch):
    rid, artifact, base = _trained_with_checkpoints(tmp_path)
    # `ickd train` in its own process: the stand-in Api is installed by a sitecustomize module.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import wandb
        from tests.test_naming import StandInApi
        wandb.Api = StandInApi({artifact!r})
    """))
    out = tmp_path / "cluster-b"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
    run_ickd("train", *base, "trainer.epochs=2", f"trainer.resume=wandb:mylab/ickd/{rid}-last", f"hydra.run.dir={out}", cwd=tmp_path)
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["resumed_from_epoch"] == 1
    # The W&B run of cluster A continues (same id), from epoch 2: no epoch logged twice.
    assert (out / RUN_ID_FILE).read_text().strip() == rid and (out / LAST_EPOCH_FILE).read_text().strip() == "2"
    run = offline_run(out)
    assert run["id"] == rid and run["epochs"] == [2]


def test_artifact_references_parse_and_bad_ones_are_config_errors(tmp_path):
    logger = {"entity": "mylab", "project": "proj"}
    assert artifact_path("wandb:e/p/r-last:v3", logger) == "e/p/r-last:v3"
    assert artifact_path("wandb:p/r-last", logger) == "p/r-last:latest"  # the API key's default entity
    assert artifact_path("wandb:r-last:epoch-4", logger) == "mylab/proj/r-last:epoch-4"
    assert artifact_path("wandb:r-last", {}) == "ickd/r-last:latest"
    with pytest.raises(ConfigError, match="not a W&B artifact reference"):
        artifact_path("wandb:a/b/c/d:x", logger)
    cfg = compose_config("trainer.resume=wandb:mylab/ickd/nope-last")
    with pytest.raises(ConfigError, match="cannot fetch W&B artifact mylab/ickd/nope-last:latest.*wandb login"):
        resolve_resume(cfg, tmp_path / "run", api=StandInApi(None))
    plain = compose_config("trainer.resume=auto")
    assert resolve_resume(plain, tmp_path / "run") is plain  # anything else goes to the trainer untouched


@pytest.mark.slow
def test_ickd_train_with_an_unreachable_artifact_exits_2_naming_the_fix(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: the real wandb.Api has no API key
    monkeypatch.delenv("NETRC", raising=False)
    proc = run_ickd("train", *TEACHER, "logger=wandb", "trainer.resume=wandb:mylab/ickd/gone-last:latest",
                    f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    assert "cannot fetch W&B artifact mylab/ickd/gone-last:latest" in output and "wandb login" in output
    assert "Traceback" not in output
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
