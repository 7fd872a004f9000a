"""Typed configs (issue 11): every group has a schema, type errors / unknown keys / bad choices fail at
compose time with exit 2 naming the key, in `ickd train`, `--cfg job`, `-m`, `ickd launch --dry-run`
and `ickd sweep create` (which composes the space's bounds)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ickd import config_schema as schema
from ickd.config_schema import validate_config
from ickd.config_store import compose_checked, compose_run_config, config_dir
from ickd.errors import ConfigError
from ickd.sweep.spec import load_spec
from tests.helpers import FAST, REPO

ICKD = str(Path(sys.executable).with_name("ickd"))  # the installed console script
GROUP_DIRS = ("dataset", "distill", "logger", "memory", "optim", "paradigm", "trainer")


def ickd(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([ICKD, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_config_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, out


# --- every group has a schema; everything shipped composes --------------------------------------

def _experiments() -> list[str]:
    root = config_dir() / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def test_every_group_option_is_typed_by_its_schema():
    for group in GROUP_DIRS:
        for path in sorted((config_dir() / group).glob("*.yaml")):
            cfg = compose_run_config([f"{group}={path.stem}"])
            node = cfg[group]
            expected = schema._schema_for(group, node)
            assert expected is not None, f"{group}={path.stem} has no schema"
            assert OmegaConf.get_type(node) is expected, f"{group}={path.stem}: {OmegaConf.get_type(node)}"
    cfg = compose_run_config(["stage=teacher", "model=resnet8"])
    assert OmegaConf.get_type(cfg) is schema.TrainSchema
    assert OmegaConf.get_type(cfg.teacher) is schema.TeacherSchema and cfg.teacher.trust_checkpoint is False
    assert OmegaConf.get_type(cfg.student) is schema.ModelSchema and OmegaConf.get_type(cfg.model) is schema.ModelSchema
    # Keys other parts of the platform rely on are declared (and typed).
    assert cfg.trainer.progress_interval_s == 60
    assert compose_run_config(["logger=wandb"]).logger.log_checkpoints is False
    # Schemas are a group of their own, never the default choice of a user group.
    assert compose_run_config([]).distill.name == "kd"


@pytest.mark.parametrize("overrides", [
    [],
    *[[f"experiment={e}", f"distill={d}"] for e in _experiments() for d in ("ce", "kd", "kd_matched", "dkd", "ickd")],
    *[[f"paradigm={p}", f"distill={d}"] for p in ("offline", "online", "teacher_free") for d in ("ce", "kd", "kd_matched", "dkd", "ickd")],
    *[[f"{g}={o}"] for g, o in (("logger", "wandb"), ("optim", "imagenet"), ("optim", "sgd_cosine"), ("optim", "sgd_light"))],
    ["stage=teacher", "model=resnet8"],
])
def test_shipped_configs_compose_validate_and_resolve(overrides, monkeypatch):
    monkeypatch.setenv("ICKD_TEACHER", "/some/teacher.pt")
    cfg = compose_checked(overrides)
    assert schema._missing_keys(cfg) == []
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves to its field's type
    if overrides and overrides[0].startswith("experiment=cifar100"):
        assert cfg.pair.dkd_beta == compose_checked([*overrides, "distill=dkd"]).distill.beta


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_studies_compose_with_their_bounds(path, monkeypatch):
    monkeypatch.delenv("ICKD_TEACHER", raising=False)  # set only where the trials run: not needed to compose
    spec = load_spec(path)
    points = spec.bound_points()
    assert len(points) == max((len(d.choices) if hasattr(d, "choices") else 2) for d in spec.space.values())
    for key, dist in spec.space.items():  # every choice and both bounds appear in some point
        edges = list(dist.choices) if hasattr(dist, "choices") else [dist.low, dist.high]
        assert {p for point in points for p in point if p.startswith(f"{key}=")} == {f"{key}={schema_fmt(v)}" for v in edges}
    spec.check_composes()


def schema_fmt(value):
    from ickd.sweep.space import format_value

    return format_value(value)


# --- compose-time errors in process -------------------------------------------------------------

@pytest.mark.parametrize("override, needles", [
    ("trainer.epochs=abc", ["trainer.epochs", "'abc' is not an int"]),
    ("trainer.epochz=3", ["trainer.epochz", "unknown key", "did you mean epochs"]),
    ("distill.kappa=x", ["distill.kappa", "unknown key", "kappa belongs to distill=ickd"]),  # kd has no kappa
    ("teacher.trust_checkpoint=maybe", ["teacher.trust_checkpoint", "true or false"]),
    ("memory.k=1.5", ["memory.k", "not an int"]),
    ("dataset=nope", ["dataset/nope", "fashion_mnist"]),
    ("a=b=c", ["cannot parse", "key=value"]),
    ("trainer.device=gpu", ["trainer.device='gpu'", "auto, cpu, cuda"]),
    ("teacher.name=resnet9", ["teacher.name='resnet9'", "resnet8"]),
    ("dataset.name=fmnist", ["dataset.name='fmnist'", "fashion_mnist"]),
    ("dataset.holdout=1.5", ["dataset.holdout=1.5", "fraction"]),
    ("trainer.epochs=0", ["trainer.epochs=0", "> 0"]),
    ("stage=techer", ["stage='techer'", "did you mean teacher"]),
])
def test_compose_checked_names_the_key(override, needles):
    with pytest.raises(ConfigError) as info:
        compose_checked([*FAST, override])
    for needle in needles:
        assert needle in str(info.value)


def _choice_fields():
    for section, options in (("", {"": schema.TrainSchema}), *schema.GROUP_SCHEMAS.items()):
        for option, cls in options.items():
            for f in dataclasses.fields(cls):
                if f.metadata.get("choices"):
                    yield section, option, f


def test_every_choice_valued_key_rejects_a_typo_and_accepts_its_choices():
    checked = 0
    for section, option, f in _choice_fields():
        select = {"distill": "distill=ickd", "paradigm": "paradigm=teacher_free", "logger": "logger=wandb"}.get(section)
        if section in ("distill", "paradigm", "logger") and option != OmegaConf.select(compose_run_config([select]), f"{section}.name"):
            continue
        cfg = compose_run_config([*FAST, *([select] if select else [])])
        key = f"{section}.{f.name}" if section else f.name
        for good in f.metadata["choices"]:
            OmegaConf.update(cfg, key, good.replace("cuda:N", "cuda:1"))
            validate_config(cfg)
        OmegaConf.update(cfg, key, "xyzzy")
        with pytest.raises(ConfigError, match=f"{key}='xyzzy' is not valid; use one of: "):
            validate_config(cfg)
        checked += 1
    # picd/nicd switches, memory, trainer, optim, paradigm, logger and stage all carry choices.
    assert checked >= 20


def test_bare_on_off_in_yaml_or_true_false_become_the_switch_values():
    cfg = compose_checked([*FAST, "trainer.progress=true", "trainer.channels_last=false"])
    assert (cfg.trainer.progress, cfg.trainer.channels_last) == ("on", "off")


def test_a_key_the_schema_does_not_declare_fails_in_a_yaml_file(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(config_dir(), configs)
    with (configs / "trainer" / "default.yaml").open("a") as f:
        f.write("epochz: 3\n")
    monkeypatch.setenv("ICKD_CONFIG_DIR", str(configs))
    with pytest.raises(ConfigError, match=r"trainer\.epochz: unknown key \(did you mean epochs\?\)"):
        compose_checked([])
    (configs / "trainer" / "default.yaml").write_text((configs / "trainer" / "default.yaml").read_text().replace("epochz: 3\n", ""))
    compose_checked([])
    (configs / "memory" / "default.yaml").write_text((configs / "memory" / "default.yaml").read_text().replace("k: 16", "k: sixteen"))
    with pytest.raises(ConfigError, match=r"memory\.k: 'sixteen' is not an int"):
        compose_checked([])
    # A YAML that forgets a key its schema requires fails too (the YAML states every default).
    (configs / "memory" / "default.yaml").write_text(
        "\n".join(line for line in (configs / "memory" / "default.yaml").read_text().splitlines() if not line.startswith("k: "))
    )
    with pytest.raises(ConfigError, match=r"memory\.k must be set"):
        compose_checked([])


def test_one_place_states_each_default():
    """Schema fields have no default (the YAML states it), except keys no YAML sets."""
    allowed = {("TrainSchema", "model"), ("TrainSchema", "pair"), ("ModelSchema", "kwargs"), ("TeacherSchema", "kwargs"),
               ("TeacherSchema", "checkpoint"), ("TeacherSchema", "trust_checkpoint"),
               # keys a method ignores, so an experiment can state one recipe for every method
               ("CESchema", "kd_weight"), ("CESchema", "temperature"), ("DKDSchema", "kd_weight"),
               *((cls, key) for cls in ("FeatureMethodSchema", "FitNetSchema", "ATSchema", "CRDSchema", "ReviewKDSchema")
                 for key in ("kd_weight", "temperature"))}
    for name in dir(schema):
        cls = getattr(schema, name)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == schema.__name__) or cls is schema.PairSchema:
            continue
        for f in dataclasses.fields(cls):
            has_default = f.default is not dataclasses.MISSING and f.default != "???" or f.default_factory is not dataclasses.MISSING
            assert not has_default or (name, f.name) in allowed, f"{name}.{f.name} states a default; the YAML file should"
    # The trainer's own settings object is built from the composed section and keeps no second copy.
    from ickd.engine.trainer import TrainerConfig

    copies = [f.name for f in dataclasses.fields(TrainerConfig) if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert copies == [], f"TrainerConfig states defaults for {copies}; configs/trainer/default.yaml does"


# --- the CLI: exit 2, no traceback, before anything runs or is written --------------------------

@pytest.mark.slow
def test_ickd_train_config_errors_exit_2_before_anything_runs(tmp_path, monkeypatch):
    assert_config_error(ickd("train", *FAST, "trainer.epochs=abc", cwd=tmp_path), "trainer.epochs", "'abc' is not an int")
    assert_config_error(ickd("train", *FAST, "trainer.epochs=abc", "--cfg", "job", cwd=tmp_path), "trainer.epochs")
    assert_config_error(ickd("train", *FAST, "trainer.epochz=3", cwd=tmp_path), "trainer.epochz", "unknown key")
    assert_config_error(ickd("train", "dataset=nope", cwd=tmp_path), "dataset/nope", "Available options")
    assert_config_error(ickd("train", "trainer.epochs=(", cwd=tmp_path), "cannot parse")
    # -m: every sweep point is checked before Hydra starts the first job.
    proc = ickd("train", "-m", *FAST, "trainer.epochs=1,abc", f"hydra.sweep.dir={tmp_path / 'multi'}", cwd=tmp_path)
    assert_config_error(proc, "trainer.epochs", "sweep point")
    assert not (tmp_path / "multi").exists() and not (tmp_path / "outputs").exists()
    # A choice typo fails at once, before the teacher is loaded or the bank filled: the teacher file
    # does not even exist, and the error is about the choice.
    start = time.monotonic()
    proc = ickd("train", *FAST, "distill=ickd", "teacher.checkpoint=/nonexistent/teacher.pt", "distill.picd_weighting=simlarity", cwd=tmp_path)
    assert_config_error(proc, "distill.picd_weighting='simlarity'", "similarity, uniform")
    assert time.monotonic() - start < 60
    assert "fill" not in (proc.stdout + proc.stderr).lower() and "nonexistent" not in proc.stdout + proc.stderr
    # `python -m ickd.train` checks the same way; `--help` and `--cfg job` still work.
    proc = subprocess.run([sys.executable, "-m", "ickd.train", *FAST, "trainer.epochs=abc"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert_config_error(proc, "trainer.epochs")
    help_proc = ickd("train", "--help", cwd=tmp_path)
    distill_line = next((l for l in help_proc.stdout.splitlines() if l.startswith("distill: ")), "")
    assert help_proc.returncode == 0 and {"ce", "kd", "dkd", "ickd", "fitnet", "at", "crd", "reviewkd", "dkd+ickd"} <= set(
        distill_line.removeprefix("distill: ").split(", ")), help_proc.stdout
    job = ickd("train", *FAST, "trainer.epochs=3", "--cfg", "job", cwd=tmp_path)
    assert job.returncode == 0 and "epochs: 3" in job.stdout, job.stderr


@pytest.mark.slow
def test_launch_dry_run_and_launch_check_every_grid_point(tmp_path):
    root = tmp_path / "launches"
    for verb in ("train", "grid"):
        args = [*FAST, "distill=kd,ickd" if verb == "grid" else "distill=ickd", "trainer.epochs=abc"]
        assert_config_error(ickd("launch", verb, *args, "--profile", "local", "--root", str(root), "--dry-run", cwd=tmp_path), "trainer.epochs", "'abc' is not an int")
    # The second grid point is bad: nothing is queued and no launch folder is written.
    proc = ickd("launch", "grid", *FAST, "distill=kd,ickd", "distill.picd_weighting=simlarity", "--profile", "local", "--root", str(root), cwd=tmp_path)
    assert_config_error(proc, "distill.picd_weighting")
    assert not root.exists() or not any(root.iterdir())


@pytest.mark.slow
def test_sweep_create_composes_the_space_bounds(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "name: bad_bounds\n"
        "base: [dataset=synthetic, teacher=resnet8, student=resnet8, distill=ickd, dataset.holdout=64]\n"
        "objective: {metric: holdout/top1, mode: best, direction: maximize}\n"
        "space:\n  memory.k: choice(2, 4)\n  memory.k_pos: interval(1.5, 4.5)\n"
        "sampler: {name: tpe, seed: 0}\npruner: {name: none}\nn_trials: 3\n"
    )
    root = tmp_path / "studies"
    assert_config_error(ickd("sweep", "create", str(spec), "--root", str(root), cwd=tmp_path), "memory.k_pos", "'1.5' is not an int")
    spec.write_text(spec.read_text().replace("memory.k_pos: interval(1.5, 4.5)", "distill.nicd_form: choice(contrastive, penalti)"))
    assert_config_error(ickd("sweep", "create", str(spec), "--root", str(root), cwd=tmp_path), "distill.nicd_form='penalti'", "penalty")
    assert_config_error(ickd("sweep", "create", str(spec), "--root", str(root), "-o", "trainer.epochs=abc", cwd=tmp_path), "trainer.epochs")
    assert not (root / "bad_bounds").exists()
    spec.write_text(spec.read_text().replace("penalti", "penalty"))
    proc = ickd("sweep", "create", str(spec), "--root", str(root), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_a_checkpoint_from_before_the_typed_keys_still_resumes():
    """Keys the schemas added (pair, model, optim.min_lr_factor, teacher.trust_checkpoint) at the value
    their absence meant are no config difference; any other value is."""
    from ickd.engine.trainer import config_differences

    current = OmegaConf.to_container(compose_checked(FAST), resolve=True)
    saved = {k: v for k, v in current.items() if k not in ("pair", "model")}
    saved["optim"] = {k: v for k, v in current["optim"].items() if k != "min_lr_factor"}
    saved["teacher"] = {k: v for k, v in current["teacher"].items() if k != "trust_checkpoint"}
    assert config_differences(saved, current) == []
    changed = OmegaConf.to_container(compose_checked([*FAST, "optim.min_lr_factor=0.1"]), resolve=True)
    assert [d[0] for d in config_differences(saved, changed)] == ["optim.min_lr_factor"]
