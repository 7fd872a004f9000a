"""Study files: parsing, validation, distributions, samplers/pruners, objective, overrides."""
from __future__ import annotations

import copy
import importlib.util
import math

import optuna
import pytest
import yaml
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from ickd.errors import ConfigError
from ickd.sweep.space import params_to_overrides, parse_space
from ickd.sweep.spec import Objective, SpecError, StudySpec, load_spec
from tests.helpers import FAST, REPO, compose_config

SWEEPS = REPO / "sweeps"
SHIPPED = [
    "cifar100_res32x4_res8x4.yaml",
    "cifar100_wrn40_2_wrn16_2.yaml",
    "ablation_memory_size.yaml",
    "ablation_k.yaml",
    "ablation_picd_only.yaml",
    "ablation_nicd_only.yaml",
    "ablation_split.yaml",
    "fmnist_ickd_quick.yaml",
    "synthetic_smoke.yaml",
]

MINIMAL = {
    "name": "t",
    "base": list(FAST) + ["distill=ickd", "dataset.holdout=64"],
    "space": {"memory.k": "choice(2, 4, 8)", "distill.picd_weight": "interval(0.1, 2.0)"},
}


def spec_with(**changes) -> dict:
    data = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return data


# ------------------------------------------------------------------------------------------------
# shipped study files


def test_every_shipped_study_file_is_tested_and_documented():
    on_disk = sorted(p.name for p in SWEEPS.glob("*.yaml"))
    assert on_disk == sorted(SHIPPED)
    readme = (SWEEPS / "README.md").read_text()
    for name in SHIPPED:
        assert f"`{name}`" in readme, f"sweeps/README.md has no line for {name}"


@pytest.mark.parametrize("file", SHIPPED)
def test_shipped_study_loads_and_validates_against_its_composed_base(file):
    spec = load_spec(SWEEPS / file)
    assert spec.space and spec.n_trials > 0
    cfg = compose_config(*spec.base, base=[])  # compose only: no dataset or teacher is read
    spec.validate_against(cfg)
    # Every shipped study tunes on a holdout carved from the training set, never on the test split.
    assert spec.objective.metric == "holdout/top1" and cfg.dataset.holdout
    assert cfg.distill.name == "ickd"
    # the file round-trips through the study.yaml the lead writes
    again = load_spec(yaml.safe_load(yaml.safe_dump(spec.to_dict(), sort_keys=False)))
    assert again == spec
    spec.build_sampler(0)
    spec.build_pruner()


@pytest.mark.parametrize("pair", ["res32x4_res8x4", "wrn40_2_wrn16_2"])
def test_main_cifar_studies_search_the_ic_kd_hyperparameters(pair):
    spec = load_spec(SWEEPS / f"cifar100_{pair}.yaml")
    assert f"experiment=cifar100/{pair}" in spec.base and "distill=ickd" in spec.base
    assert set(spec.space) == {
        "memory.size", "memory.k", "distill.picd_weight", "distill.nicd_weight", "distill.temperature",
        # Revision 2: the similarity temperature, NICD's own temperature and the retrieval space
        "distill.tau_r", "distill.nicd_temperature", "memory.feature_transform",
    }
    assert set(spec.space["memory.feature_transform"].choices) == {"auto", "center", "none"}
    assert None in spec.space["memory.size"].choices  # M = the whole training set is an option
    assert spec.objective == Objective("holdout/top1", "best", "maximize")  # tuned on the holdout, not on test
    assert "dataset.holdout=5000" in spec.base
    assert isinstance(spec.build_pruner(), optuna.pruners.MedianPruner)
    assert spec.pruner["n_warmup_steps"] >= 20
    cfg = compose_config(*spec.base, base=[])
    assert cfg.trainer.epochs == 240 and cfg.dataset.name == "cifar100" and cfg.dataset.holdout == 5000


def test_ablations_fix_what_they_switch_off():
    picd = load_spec(SWEEPS / "ablation_picd_only.yaml")
    assert "distill.nicd_weight=0" in picd.base and set(picd.space) == {"distill.picd_weight"}
    assert compose_config(*picd.base, base=[]).distill.nicd_weight == 0
    nicd = load_spec(SWEEPS / "ablation_nicd_only.yaml")
    assert "distill.picd_weight=0" in nicd.base and set(nicd.space) == {"distill.nicd_weight", "distill.kappa"}
    split = load_spec(SWEEPS / "ablation_split.yaml")
    assert split.space["memory.split"].choices == ("topk", "separate")
    assert set(split.build_sampler()._search_space) == {"memory.split", "memory.k_pos", "memory.k_neg"}


def test_fmnist_quick_study_takes_the_teacher_from_the_environment(monkeypatch, tmp_path):
    spec = load_spec(SWEEPS / "fmnist_ickd_quick.yaml")
    assert spec.n_trials == 4 and set(spec.space) == {
        "memory.k", "memory.feature_transform", "distill.picd_weight", "distill.nicd_weight", "distill.tau_r", "distill.nicd_temperature",
    }
    monkeypatch.setenv("ICKD_TEACHER", str(tmp_path / "teacher"))
    cfg = compose_config(*spec.base, base=[])
    assert cfg.teacher.checkpoint == str(tmp_path / "teacher")
    # The demo's setting unchanged, so the tuned params are retrained (ickd compare) where they were tuned.
    assert cfg.dataset.name == "fashion_mnist" and cfg.trainer.epochs == 5 and cfg.dataset.train_subset == 10000
    assert cfg.dataset.holdout == 5000 and spec.objective.metric == "holdout/top1"


def test_smoke_study_is_small_offline_and_takes_a_later_teacher_override(tmp_path):
    spec = load_spec(SWEEPS / "synthetic_smoke.yaml")
    assert set(spec.space) == {"memory.k", "distill.picd_weight"}
    assert isinstance(spec.build_pruner(), optuna.pruners.NopPruner)
    cfg = compose_config(*spec.base, f"teacher.checkpoint={tmp_path}", base=[])
    assert cfg.teacher.checkpoint == str(tmp_path)  # the later override beats ${oc.env:ICKD_TEACHER}
    assert (cfg.dataset.name, cfg.teacher.name, cfg.student.name, cfg.paradigm.name) == ("synthetic", "resnet8", "resnet8", "offline")
    assert cfg.trainer.epochs == 2 and cfg.trainer.device == "cpu"


# ------------------------------------------------------------------------------------------------
# the syntax table


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("choice(4, 8, 16, 32)", CategoricalDistribution([4, 8, 16, 32])),
        ("choice(2000, 5000, null)", CategoricalDistribution([2000, 5000, None])),
        ("choice(topk, separate)", CategoricalDistribution(["topk", "separate"])),
        ("4,8,16", CategoricalDistribution([4, 8, 16])),
        ([4, 8, None], CategoricalDistribution([4, 8, None])),
        ("range(2, 8, step=2)", IntDistribution(2, 6, step=2)),
        ("range(2, 10, 2)", IntDistribution(2, 8, step=2)),
        ("range(5)", IntDistribution(0, 4)),
        ("range(8, 2, -2)", IntDistribution(4, 8, step=2)),
        ("range(0.1, 1.0, step=0.2)", FloatDistribution(0.1, 0.9, step=0.2)),
        ("range(0.1, 0.8, 0.2)", FloatDistribution(0.1, 0.7, step=0.2)),
        ("interval(0.1, 4.0)", FloatDistribution(0.1, 4.0)),
        ("interval(0.1, 4)", FloatDistribution(0.1, 4.0)),
        ("interval(1, 10)", IntDistribution(1, 10)),
        ("int(interval(1, 10))", IntDistribution(1, 10)),
        ("tag(log, interval(0.01, 2.0))", FloatDistribution(0.01, 2.0, log=True)),
        ("tag(log, interval(1, 1024))", IntDistribution(1, 1024, log=True)),
        ("tag(log, range(1, 65))", IntDistribution(1, 64, log=True)),
    ],
)
def test_sweeper_syntax_maps_to_the_right_optuna_distribution(raw, expected):
    dist = parse_space({"x": raw})["x"]
    assert type(dist) is type(expected)
    assert dist == expected
    if isinstance(dist, FloatDistribution):
        # exact bounds: low + n*step == high, so Optuna never "adjusts" them
        assert (dist.low, dist.high, dist.step, dist.log) == (expected.low, expected.high, expected.step, expected.log)
        assert all(isinstance(v, float) for v in (dist.low, dist.high))
    if isinstance(dist, IntDistribution):
        assert all(type(v) is int for v in (dist.low, dist.high, dist.step))


def test_choice_values_keep_their_types():
    dist = parse_space({"x": "choice(1, 1.5, null, topk, true, '2')"})["x"]
    assert [(type(c), c) for c in dist.choices] == [(int, 1), (float, 1.5), (type(None), None), (str, "topk"), (bool, True), (str, "2")]


def test_plain_values_are_fixed_base_overrides_not_searched():
    spec = load_spec(spec_with(space={"memory.k": "choice(2, 4)", "distill.nicd_weight": 0, "memory.split": "separate", "memory.size": None}))
    assert set(spec.space) == {"memory.k"}
    assert spec.base[-3:] == ["distill.nicd_weight=0", "memory.split=separate", "memory.size=null"]
    cfg = compose_config(*spec.base, base=[])
    assert cfg.distill.nicd_weight == 0 and cfg.memory.split == "separate" and cfg.memory.size is None


# ------------------------------------------------------------------------------------------------
# invalid specs


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"space": {"memory.k": "choice()"}}, ["space.memory.k", "empty choice"]),
        ({"space": {"memory.k": []}}, ["space.memory.k", "no values"]),
        ({"space": {"distill.picd_weight": "interval(2.0, 1.0)"}}, ["space.distill.picd_weight", "low >= high"]),
        ({"space": {"distill.picd_weight": "interval(1.0, 1.0)"}}, ["low >= high"]),
        ({"space": {"distill.picd_weight": "tag(log, interval(0.0, 1.0))"}}, ["space.distill.picd_weight", "low > 0"]),
        ({"space": {"distill.picd_weight": "tag(log, interval(-1, 1.0))"}}, ["low > 0"]),
        ({"space": {"memory.k": "range(5, 2)"}}, ["space.memory.k", "no values"]),
        ({"space": {"memory.k": "range(2, 8, step=0)"}}, ["space.memory.k", "step 0"]),
        ({"space": {"memory.k": "tag(lg, interval(1, 8))"}}, ["space.memory.k", "lg", "log"]),
        ({"space": {"memory.k": "choice([1, 2], [3])"}}, ["space.memory.k", "scalar"]),
        ({"space": {"memory.k": "choice(4, 4)"}}, ["twice"]),
        ({"space": {"memory.k": "choice(4,"}}, ["space.memory.k", "not a valid Hydra override"]),
        ({"space": {"memory.k": 4}}, ["no searched dimension"]),
        ({"sampler": {"name": "tpee"}}, ["sampler.name", "tpee", "did you mean tpe", "tpe, cmaes, gp, random, grid"]),
        ({"sampler": {"name": "tpe", "n_startup": 3}}, ["sampler.n_startup", "TPESampler", "n_startup_trials"]),
        ({"sampler": {"name": "random", "seed": "zero"}}, ["sampler.seed"]),
        ({"sampler": {"name": "tpe", "gamma": "x"}}, ["sampler.gamma", "Python objects"]),
        ({"sampler": {"name": "grid", "search_space": {}}}, ["search_space", "derives"]),
        ({"sampler": {"name": "grid"}}, ["grid sampler", "distill.picd_weight", "continuous"]),
        ({"pruner": {"name": "medain"}}, ["pruner.name", "did you mean median", "hyperband", "none"]),
        ({"pruner": {"name": "median", "warmup": 3}}, ["pruner.warmup", "MedianPruner", "n_warmup_steps"]),
        ({"pruner": {"name": "none", "n_warmup_steps": 3}}, ["pruner.n_warmup_steps", "(none)"]),
        ({"pruner": {"name": "median", "n_warmup_steps": -1}}, ["pruner", "invalid"]),
        ({"n_trials": 0}, ["n_trials", "> 0"]),
        ({"n_trials": -3}, ["n_trials"]),
        ({"n_trials": 2.5}, ["n_trials"]),
        ({"name": ...}, ["name is missing"]),
        ({"name": "a/b"}, ["name", "rename"]),
        ({"base": ...}, ["base is missing"]),
        ({"base": "distill=ickd"}, ["base must be a list"]),
        ({"base": ["memory.k=4,8"]}, ["base", "sweep", "move it to space"]),
        ({"base": ["memory.k=(("]}, ["base", "not a valid Hydra override"]),
        ({"space": ...}, ["space is missing"]),
        ({"objective": {"metric": "val/top1", "mode": "median"}}, ["objective.mode", "best, last"]),
        ({"objective": {"direction": "max"}}, ["objective.direction", "maximize, minimize"]),
        ({"objective": {"metric": ""}}, ["objective.metric"]),
        ({"objective": {"target": "x"}}, ["objective.target"]),
        ({"retry": {"max_retries": -1}}, ["retry.max_retries"]),
        ({"heartbeat": {"interval_s": 60, "grace_s": 30}}, ["heartbeat.grace_s", "interval_s"]),
        ({"n_trails": 3}, ["n_trails", "did you mean n_trials"]),
    ],
)
def test_invalid_specs_raise_spec_error_naming_the_key(changes, fragments):
    with pytest.raises(SpecError) as info:
        load_spec(spec_with(**changes))
    assert isinstance(info.value, ConfigError)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"


def test_n_trials_override_is_validated_and_beats_the_file():
    with pytest.raises(SpecError, match="n_trials"):
        load_spec(MINIMAL, n_trials=0)
    spec = load_spec(spec_with(n_trials=5, storage="postgresql://u@h/db"), name="other", n_trials=9, storage="sqlite:///x.db")
    assert (spec.name, spec.n_trials, spec.storage) == ("other", 9, "sqlite:///x.db")
    assert load_spec(spec_with(n_trials=5)).n_trials == 5


def test_error_from_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec_with(n_trials=0)))
    with pytest.raises(SpecError, match=r"bad\.yaml: n_trials"):
        load_spec(path)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


def test_optional_samplers_need_their_packages():
    for name, packages in (("cmaes", ["cmaes"]), ("gp", ["scipy", "torch"])):
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        data = spec_with(sampler={"name": name, "seed": 1})
        if missing:
            with pytest.raises(SpecError, match=f"pip install {' '.join(missing)}"):
                load_spec(data)
        else:
            cls = {"cmaes": optuna.samplers.CmaEsSampler, "gp": optuna.samplers.GPSampler}[name]
            assert isinstance(load_spec(data).build_sampler(), cls)


# ------------------------------------------------------------------------------------------------
# storage


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://ickd:s3cr3tPW@db.example.org:5432/studies",
        "postgresql+psycopg2://ickd:s3cr3tPW@localhost/studies",
        "postgresql://ickd@localhost/studies?password=s3cr3tPW",
    ],
)
def test_a_password_in_the_storage_url_is_rejected_without_echoing_it(tmp_path, url):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec_with(storage=url)))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "s3cr3tPW" not in message and "s3cr3tPW" not in repr(info.value)
    assert "PGPASSWORD" in message and "~/.pgpass" in message and "storage" in message
    with pytest.raises(SpecError) as info:
        load_spec(MINIMAL, storage=url)  # the create-time override is checked the same way
    assert "s3cr3tPW" not in str(info.value)


@pytest.mark.parametrize("url", [None, "postgresql://ickd@localhost:5432/studies", "postgresql+psycopg2://u@h/db", "sqlite:///s.db", "journal://x/journal.log"])
def test_storage_without_password_is_kept(url):
    assert load_spec(spec_with(storage=url)).storage == url


# ------------------------------------------------------------------------------------------------
# validate_against


def test_validate_against_lists_unknown_keys_with_close_matches():
    spec = load_spec(spec_with(space={"memory.kk": "choice(2, 4)", "distill.picd_wieght": "interval(0.1, 1.0)", "memory.size": "choice(100, null)"}))
    cfg = compose_config(*spec.base, base=[])
    with pytest.raises(SpecError) as info:
        spec.validate_against(cfg)
    message = str(info.value)
    listed = message.split("base config: ", 1)[1].split(". Fix", 1)[0].split("; ")
    assert [entry.split(" (")[0] for entry in listed] == ["memory.kk", "distill.picd_wieght"]  # memory.size (null) exists
    assert "did you mean memory.k" in listed[0] and "distill.picd_weight" in listed[1]


def test_validate_against_accepts_config_groups_as_keys():
    spec = load_spec(spec_with(space={"student": "choice(resnet8, resnet20)"}))
    spec.validate_against(compose_config(*spec.base, base=[]))
    cfg = compose_config(*spec.base, *params_to_overrides({"student": "resnet20"}), base=[])
    assert cfg.student.name == "resnet20"


# ------------------------------------------------------------------------------------------------
# params -> overrides


def test_params_to_overrides_round_trips_through_compose():
    params = {
        "distill.picd_weight": 0.1 + 0.2,  # 0.30000000000000004: every digit must survive
        "distill.nicd_weight": 1e-05,
        "distill.kappa": 1 / 3,
        "distill.temperature": 4.0,
        "memory.size": None,
        "memory.k": 7,
        "memory.split": "separate",
        "trainer.deterministic": True,
        "name": "it's a run, with = and \"quotes\"",
        "memory.subset": "null",  # the string, not None
        "memory.update": "123",  # the string, not an int
        "dataset.root": "/data/with space/x",
    }
    overrides = params_to_overrides(params)
    assert overrides[4] == "memory.size=null" and overrides[0] == "distill.picd_weight=0.30000000000000004"
    cfg = compose_config("distill=ickd", *overrides)
    for key, value in params.items():
        got = OmegaConf.select(cfg, key)
        assert type(got) is type(value) and got == value, (key, got, value)


def test_sampled_trial_params_compose_to_the_same_values():
    spec = load_spec(SWEEPS / "cifar100_res32x4_res8x4.yaml")
    study = optuna.create_study(direction="maximize", sampler=spec.build_sampler(3))
    trial = study.ask(spec.space)
    cfg = compose_config(*spec.base, *params_to_overrides(trial.params), base=[])
    for key, value in trial.params.items():
        assert OmegaConf.select(cfg, key) == value


# ------------------------------------------------------------------------------------------------
# samplers and pruners


def _first_suggestion(spec: StudySpec, offset: int) -> dict:
    study = optuna.create_study(sampler=spec.build_sampler(offset))
    return study.ask(spec.space).params


@pytest.mark.parametrize("name, cls", [("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler)])
def test_sampler_class_and_seed_offsets(name, cls):
    spec = load_spec(spec_with(sampler={"name": name, "seed": 7}))
    assert isinstance(spec.build_sampler(), cls)
    assert _first_suggestion(spec, 0) == _first_suggestion(spec, 0)  # seeded: reproducible
    assert _first_suggestion(spec, 0) != _first_suggestion(spec, 1)  # each worker samples differently


def test_seed_offset_adds_to_the_seed():
    a = load_spec(spec_with(sampler={"name": "random", "seed": 7}))
    b = load_spec(spec_with(sampler={"name": "random", "seed": 8}))
    assert _first_suggestion(a, 1) == _first_suggestion(b, 0)
    assert a.sampler == {"name": "random", "seed": 7}  # building does not mutate the spec


def test_sampler_kwargs_pass_through():
    spec = load_spec(spec_with(sampler={"name": "tpe", "seed": 0, "n_startup_trials": 3, "multivariate": False}))
    sampler = spec.build_sampler()
    assert sampler._n_startup_trials == 3 and sampler._multivariate is False


def test_grid_sampler_uses_the_space_choices():
    spec = load_spec(spec_with(space={"memory.k": "choice(2, 4)", "distill.temperature": "range(2, 8, step=2)", "memory.size": "choice(100, null)"}, sampler={"name": "grid", "seed": 0}))
    sampler = spec.build_sampler(1)
    assert isinstance(sampler, optuna.samplers.GridSampler)
    assert sampler._search_space == {"distill.temperature": [2, 4, 6], "memory.k": [2, 4], "memory.size": [100, None]}
    study = optuna.create_study(sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_categorical("memory.k", [2, 4])
        trial.suggest_int("distill.temperature", 2, 6, step=2)
        trial.suggest_categorical("memory.size", [100, None])
        return 0.0

    study.optimize(objective, n_trials=20)  # the grid sampler stops the study when the grid is done
    seen = {tuple(sorted(t.params.items(), key=lambda kv: kv[0])) for t in study.trials}
    assert len(study.trials) == len(seen) == 12  # every grid point exactly once


@pytest.mark.parametrize(
    "pruner, cls, attrs",
    [
        (None, optuna.pruners.MedianPruner, {"_n_warmup_steps": 0}),
        ({"name": "median", "n_warmup_steps": 30, "n_startup_trials": 8}, optuna.pruners.MedianPruner, {"_n_warmup_steps": 30, "_n_startup_trials": 8}),
        ({"name": "hyperband", "min_resource": 2, "reduction_factor": 2}, optuna.pruners.HyperbandPruner, {"_min_resource": 2, "_reduction_factor": 2}),
        ({"name": "percentile", "percentile": 25.0}, optuna.pruners.PercentilePruner, {"_percentile": 25.0}),
        ({"name": "none"}, optuna.pruners.NopPruner, {}),
        ("none", optuna.pruners.NopPruner, {}),
    ],
)
def test_pruner_class_and_kwargs(pruner, cls, attrs):
    spec = load_spec(spec_with(pruner=pruner) if pruner is not None else MINIMAL)
    built = spec.build_pruner()
    assert type(built) is cls
    for attr, value in attrs.items():
        assert getattr(built, attr) == value


# ------------------------------------------------------------------------------------------------
# objective


HISTORY = [
    {"epoch": 1, "val/top1": 50.0, "train/loss": 2.0},
    {"epoch": 2, "val/top1": 71.5, "train/loss": 1.0},
    {"epoch": 3, "val/top1": 64.0, "train/loss": 1.5},
]


@pytest.mark.parametrize(
    "objective, history, expected",
    [
        ({"metric": "val/top1", "mode": "best"}, HISTORY, 71.5),
        ({"metric": "val/top1", "mode": "last"}, HISTORY, 64.0),
        ({"metric": "train/loss", "mode": "best", "direction": "minimize"}, HISTORY, 1.0),
        ({"metric": "train/loss", "mode": "last", "direction": "minimize"}, HISTORY, 1.5),
        ({"metric": "val/top5", "mode": "best"}, HISTORY, None),
        ({"metric": "val/top1", "mode": "best"}, [], None),
        ({"metric": "val/top1", "mode": "best"}, [*HISTORY, {"epoch": 4, "val/top1": float("nan")}], 71.5),
        ({"metric": "val/top1", "mode": "last"}, [*HISTORY, {"epoch": 4, "val/top1": float("nan")}], None),
        ({"metric": "val/top1", "mode": "last"}, [*HISTORY, {"epoch": 4, "train/loss": 0.5}], 64.0),  # no val that epoch
        ({"metric": "val/top1", "mode": "best"}, [{"val/top1": float("nan")}], None),
        ({"metric": "val/top1", "mode": "best"}, [{"val/top1": None}, {"val/top1": 3}], 3.0),
    ],
)
def test_objective_value(objective, history, expected):
    spec = load_spec(spec_with(objective=objective))
    value = spec.objective_value(history)
    if expected is None:
        assert value is None
    else:
        assert isinstance(value, float) and value == expected and not math.isnan(value)


# ------------------------------------------------------------------------------------------------
# to_dict


def test_to_dict_round_trip_of_a_full_spec():
    data = spec_with(
        name="full",
        objective={"metric": "train/loss", "mode": "last", "direction": "minimize"},
        space={
            "memory.k": [2, 4, 8],
            "memory.size": "choice(100, 200, null)",
            "distill.nicd_weight": "tag(log, interval(0.01, 2.0))",
            "distill.temperature": "range(2, 10, step=2)",
            "memory.split": "topk",
        },
        sampler={"name": "tpe", "seed": 3, "n_startup_trials": 4},
        pruner={"name": "hyperband", "min_resource": 1},
        n_trials=11,
        storage="postgresql+psycopg2://ickd@localhost:5433/optuna",
        retry={"max_retries": 0},
        heartbeat={"interval_s": 10, "grace_s": 40},
    )
    spec = load_spec(data)
    plain = spec.to_dict()
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # YAML-safe plain data
    assert plain["space"]["memory.k"] == "choice(2, 4, 8)"  # list shorthand written in the sweeper syntax
    again = load_spec(plain)
    assert again == spec and again.to_dict() == plain
    assert again.space["distill.nicd_weight"] == FloatDistribution(0.01, 2.0, log=True)
    assert again.retry == {"max_retries": 0, "max_failures": None} and again.heartbeat == {"interval_s": 10, "grace_s": 40, "suspend_grace_s": 1800}


def test_defaults():
    spec = load_spec(MINIMAL)
    assert spec.objective == Objective("holdout/top1", "best", "maximize")
    assert spec.sampler == {"name": "tpe"} and spec.pruner == {"name": "median"}
    assert spec.storage is None and spec.n_trials == 20
    assert spec.retry == {"max_retries": 2, "max_failures": None} and spec.heartbeat == {"interval_s": 30, "grace_s": 120, "suspend_grace_s": 1800}
    assert spec.raw_space == MINIMAL["space"]


# ------------------------------------------------------------------------------------------------
# tuning on the holdout, not on the test split


@pytest.mark.parametrize(
    "metric, words",
    [
        ("test/top1", ["objective test/top1 optimises on the test split", "set dataset.holdout", "objective.metric=holdout/top1"]),
        ("val/top1", ["objective val/top1 optimises on the test split unless dataset.holdout is set", "objective.metric=holdout/top1"]),
        ("val_peer/top1", ["objective val_peer/top1 optimises on the test split unless dataset.holdout is set"]),
        ("holdout/top1", None),
        ("train/loss", None),
    ],
)
def test_objectives_on_the_test_split_are_warned_about(caplog, metric, words):
    with caplog.at_level("WARNING", logger="ickd.sweep"):
        load_spec(spec_with(objective={"metric": metric}))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if words is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and all(w in warnings[0] for w in words), warnings


def test_holdout_objective_without_a_holdout_is_rejected_at_creation():
    spec = load_spec(spec_with(base=list(FAST) + ["distill=ickd"]))  # no dataset.holdout
    with pytest.raises(SpecError, match=r"objective.metric=holdout/top1 needs a holdout.*dataset.holdout=5000"):
        spec.validate_against(compose_config(*spec.base, base=[]))
    spec.validate_against(compose_config(*spec.base, "dataset.holdout=0.1", base=[]))


def test_a_real_study_tells_optuna_the_holdout_metric_never_the_test_metric(tmp_path):
    """Two 1-epoch trials on the synthetic dataset: every value Optuna receives (intermediate and
    final) is the run's holdout/top1, which is not its test/top1."""
    import json
    from pathlib import Path

    from optuna.trial import TrialState

    from ickd.sweep.studies import StudyHandle
    from ickd.sweep.worker import run_worker

    data = {
        "name": "honest",
        "base": [*FAST, "stage=teacher", "model=resnet8", "dataset.holdout=64", "trainer.epochs=1",
                 "trainer.max_batches_per_epoch=3"],
        "space": {"optim.lr": "choice(0.02, 0.2)"},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "n_trials": 2,
    }
    spec = load_spec(data)
    assert spec.objective.metric == "holdout/top1"  # the default
    spec.validate_against(compose_config(*spec.base, base=[]))
    handle = StudyHandle.create(spec, tmp_path / "studies")
    study = handle.study()
    for lr in (0.02, 0.2):
        study.enqueue_trial({"optim.lr": lr})
    run_worker(str(handle.dir))
    trials = handle.study().get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    pairs = []
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        (epoch,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        result = json.loads((run_dir / "result.json").read_text())
        assert result["selection_split"] == "holdout" and result["num_holdout"] == 64
        assert t.value == epoch["holdout/top1"] == result["best_holdout_top1"]
        assert t.intermediate_values == {1: epoch["holdout/top1"]}
        pairs.append((epoch["holdout/top1"], epoch["test/top1"]))
    # 64 holdout vs 128 test images: the two splits' accuracies differ, so a test value told to
    # Optuna could not pass the equalities above.
    assert any(h != t for h, t in pairs), pairs
