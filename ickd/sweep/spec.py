"""Study files: one YAML file defines an Optuna study over ``ickd train`` runs (sweeps/README.md).

``load_spec`` validates everything a study needs before any trial can run (syntax of the base
overrides and of the space, sampler and pruner names and arguments, objective, budget, storage URL)
and returns a ``StudySpec``; ``StudySpec.validate_against`` then checks the space keys against the
composed base config.
"""
from __future__ import annotations

import copy
import difflib
import importlib.util
import inspect
import logging
import math
import os
import re
import shlex
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import optuna
import yaml
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution

from ickd.config_store import compose_checked
from ickd.errors import ConfigError
from ickd.resources import shipped_path
from ickd.sweep.space import SpecError, grid_values, parse_dimensions, parse_override
from ickd.sweep.storage import has_password, password_refusal

__all__ = ["SpecError", "Objective", "StudySpec", "load_spec", "objective_split_warning", "SAMPLERS", "PRUNERS"]

log = logging.getLogger(__name__)

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
}
# Optional packages Optuna needs at sampling time: checked when the spec loads, not at trial 1.
SAMPLER_PACKAGES = {"cmaes": ("cmaes",), "gp": ("scipy", "torch")}

PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
}

MODES = ("best", "last")
DIRECTIONS = ("maximize", "minimize")
TOP_KEYS = ("name", "base", "objective", "space", "sampler", "pruner", "n_trials", "storage", "retry", "heartbeat")
DEFAULT_RETRY = {"max_retries": 2, "max_failures": None}  # None: max(3, n_trials)
# suspend_grace_s: how long a trial whose job was preempted (and requeued) may wait for its job to
# start again before another worker takes it over from its checkpoint.
DEFAULT_HEARTBEAT = {"interval_s": 30, "grace_s": 120, "suspend_grace_s": 1800}
# The name becomes a folder and an Optuna study name: keep it portable.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ABSENT = object()


@dataclass
class Objective:
    """What a trial returns: ``metric`` (a key of metrics.jsonl) over epochs, best or last.

    The default tunes on the holdout carved from the training set (``dataset.holdout``), so the
    sampler never sees a test-set number; ``test/*`` and ``val/*`` objectives are warned about
    (:func:`objective_split_warning`)."""

    metric: str = "holdout/top1"
    mode: str = "best"
    direction: str = "maximize"


@dataclass
class StudySpec:
    """A validated study file. ``base`` already ends with the space's fixed (plain) values."""

    name: str
    base: list[str]
    objective: Objective
    space: dict[str, BaseDistribution]
    raw_space: dict[str, str]
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    n_trials: int = 20
    storage: str | None = None
    retry: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_RETRY))
    heartbeat: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_HEARTBEAT))

    # ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-safe) that ``load_spec`` turns back into an equal spec."""
        return {
            "name": self.name,
            "base": list(self.base),
            "objective": asdict(self.objective),
            "space": dict(self.raw_space),
            "sampler": copy.deepcopy(self.sampler),
            "pruner": copy.deepcopy(self.pruner),
            "n_trials": self.n_trials,
            "storage": self.storage,
            "retry": dict(self.retry),
            "heartbeat": dict(self.heartbeat),
        }

    def build_sampler(self, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        """A fresh sampler; its seed is ``sampler.seed + seed_offset``. Workers pass their claimed
        worker slot (``StudyHandle.claim_worker_slot``), unique per worker process of the study."""
        kwargs = {k: v for k, v in self.sampler.items() if k != "name"}
        name = self.sampler.get("name", "tpe")
        if kwargs.get("seed") is not None:
            kwargs["seed"] = int(kwargs["seed"]) + int(seed_offset)
        if name == "grid":
            kwargs["search_space"] = {k: grid_values(k, d) for k, d in self.space.items()}
        return SAMPLERS[name](**kwargs)

    def build_pruner(self) -> optuna.pruners.BasePruner:
        kwargs = {k: v for k, v in self.pruner.items() if k != "name"}
        return PRUNERS[self.pruner.get("name", "median")](**kwargs)

    def validate_against(self, config: DictConfig) -> None:
        """Every space key must exist in the composed base config (else SpecError with close matches);
        a ``holdout/*`` objective needs ``dataset.holdout`` set (else no trial could report it)."""
        holdout = _select(config, "dataset.holdout")
        if self.objective.metric.startswith("holdout/") and holdout in (None, 0, _ABSENT):
            raise SpecError(
                f"study {self.name!r}: objective.metric={self.objective.metric} needs a holdout, but the composed base "
                "config has dataset.holdout=null; add e.g. `dataset.holdout=5000` (or a fraction such as 0.1) to base"
            )
        unknown = [k for k in self.space if _select(config, k) is _ABSENT]
        if not unknown:
            return
        known = _all_keys(config)
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            lines.append(f"{key}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise SpecError(
            f"study {self.name!r}: space key(s) not in the composed base config: {'; '.join(lines)}. "
            "Fix the key names (`ickd train " + " ".join(shlex.quote(b) for b in self.base) + " --cfg job` prints the config)"
        )

    def bound_points(self) -> list[list[str]]:
        """Overrides that put every searched value's edge into some composed config: point i sets
        each dimension to its i-th edge value (cycling), where a dimension's edges are every choice
        of a categorical and low/high of an int or float range. max(len(edges)) points in all."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        from ickd.sweep.space import format_value

        edges: dict[str, list[Any]] = {}
        for key, dist in self.space.items():
            if isinstance(dist, CategoricalDistribution):
                edges[key] = list(dist.choices)
            elif isinstance(dist, (IntDistribution, FloatDistribution)):
                edges[key] = [dist.low, dist.high]
        if not edges:
            return []
        n = max(len(v) for v in edges.values())
        return [[f"{key}={format_value(values[i % len(values)])}" for key, values in edges.items()] for i in range(n)]

    def check_composes(self) -> None:
        """``ickd sweep create``: the base overrides compose and validate (types, unknown keys,
        choices: ickd.config_schema), every space key exists, and the base composed with the space's
        bounds and choices validates too, so a bad bound fails now instead of at some trial."""
        self.validate_against(compose_checked(self.base))
        for point in self.bound_points():
            try:
                compose_checked([*self.base, *point])
            except ConfigError as exc:
                raise SpecError(f"study {self.name!r}: the space does not compose with the base overrides: {exc} [point: {' '.join(point)}]") from exc

    def objective_value(self, history: list[Mapping[str, Any]]) -> float | None:
        """The trial's objective from its per-epoch metrics: the best epoch (max when maximizing, min
        when minimizing) or the last epoch that reported the metric; None when the metric is absent,
        or NaN (best ignores NaN epochs; last returns None when the last reported value is NaN)."""
        metric = self.objective.metric
        values = [_number(entry.get(metric)) for entry in history if isinstance(entry, Mapping) and metric in entry]
        values = [v for v in values if v is not _ABSENT]
        if not values:
            return None
        if self.objective.mode == "last":
            last = values[-1]
            return None if math.isnan(last) else last
        finite = [v for v in values if not math.isnan(v)]
        if not finite:
            return None
        return max(finite) if self.objective.direction == "maximize" else min(finite)


# ------------------------------------------------------------------------------------------------
# helpers


def objective_split_warning(metric: str) -> str | None:
    """The warning for an objective that optimises on the test split, else None: ``test/*`` always
    is the test split; ``val/*`` (and ``val_<model>/*``) is the holdout only when dataset.holdout is
    set, otherwise the test split too."""
    fix = "set dataset.holdout (e.g. dataset.holdout=5000 in base) and objective.metric=holdout/top1, so the test split stays for the final report"
    if metric.startswith(("test/", "test_")):
        return f"objective {metric} optimises on the test split (whatever dataset.holdout is); {fix}"
    if metric.startswith(("val/", "val_")):
        return (f"objective {metric} optimises on the test split unless dataset.holdout is set (val/* is the holdout "
                f"when there is one, else the test split); {fix}")
    return None


def _number(x: Any) -> Any:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return _ABSENT
    return float(x)


def _select(config: DictConfig, key: str) -> Any:
    # Resolution failures (e.g. an unset ${oc.env:...}) still mean the key exists.
    return OmegaConf.select(config, key, default=_ABSENT, throw_on_resolution_failure=False)


def _all_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (nodes and leaves), without resolving interpolations."""
    out: list[str] = []
    if isinstance(config, DictConfig):
        for k in config.keys():
            path = f"{prefix}{k}"
            out.append(path)
            node = config._get_node(k)
            if isinstance(node, DictConfig):
                out += _all_keys(node, path + ".")
    return out


def _did_you_mean(word: str, valid: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _mapping(value: Any, where: str, default: dict[str, Any]) -> dict[str, Any]:
    if value is None:
        return dict(default)
    if isinstance(value, str):  # `sampler: random` shorthand
        return {"name": value}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where} must be a mapping such as {default}, got {value!r}")
    return dict(value)


def _settable_params(cls: type) -> tuple[list[str], list[str]]:
    """(kwargs a study file may set, kwargs it cannot: callables, samplers, trials)."""
    ok, code_only = [], []
    for p in inspect.signature(cls).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = str(p.annotation)
        (code_only if any(t in ann for t in ("Callable", "Sampler", "FrozenTrial")) else ok).append(p.name)
    return ok, code_only


def _check_kwargs(kind: str, name: str, cls: type, kwargs: Mapping[str, Any], derived: tuple[str, ...] = ()) -> None:
    ok, code_only = _settable_params(cls)
    ok = [p for p in ok if p not in derived]
    for key in kwargs:
        if key in derived:
            raise SpecError(f"{kind}.{key}: ickd derives {key} for the {name} {kind} from the space; remove it")
        if key in code_only:
            raise SpecError(f"{kind}.{key} takes Python objects and cannot be set from a study file; remove it")
        if key not in ok:
            raise SpecError(
                f"{kind}.{key} is not an argument of {cls.__name__} ({kind} {name!r}){_did_you_mean(key, ok)}; "
                f"valid: {', '.join(ok) if ok else '(none)'}"
            )


def _check_storage(url: Any) -> str | None:
    if url is None:
        return None
    if not isinstance(url, str) or not url.strip():
        raise SpecError(f"storage must be null (a journal file in the study folder) or an SQLAlchemy URL, got {url!r}")
    url = url.strip()
    if "://" not in url or url.startswith("journal://"):
        return url  # a journal file path: the storage layer opens it
    from sqlalchemy.engine import make_url

    try:
        make_url(url)
    except Exception:
        raise SpecError(
            "storage is not a valid SQLAlchemy URL; write e.g. postgresql+psycopg2://user@host:5432/db "
            "(or null for the journal file in the study folder)"
        ) from None
    if has_password(url):
        raise SpecError(password_refusal(url))
    return url


def _positive_int(value: Any, where: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise SpecError(f"{where} must be an integer {bound}, got {value!r}")
    return value


def shipped_study(path: str | os.PathLike) -> Path:
    """A study file argument that is not a file: a shipped study by name (``synthetic_smoke``,
    ``synthetic_smoke.yaml`` or ``sweeps/synthetic_smoke.yaml``, from any folder and in a wheel
    install), else ``path`` unchanged."""
    path = Path(path)
    shipped = shipped_path("sweeps")
    name = path.name if path.parent in (Path("."), Path("sweeps")) else None
    if name:
        for candidate in (shipped / name, shipped / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    return path


def _read(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(path_or_dict, Mapping):
        return copy.deepcopy(dict(path_or_dict)), "study"
    path = Path(path_or_dict)
    if not path.is_file():
        path = shipped_study(path)
    if not path.is_file():
        shipped = sorted(p.stem for p in shipped_path("sweeps").glob("*.yaml"))
        raise SpecError(
            f"study file {path} does not exist; pass a YAML study file"
            + (f" or the name of a shipped study: {', '.join(shipped)}" if shipped else "")
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"study file {path} is not valid YAML: {exc}. Fix the syntax") from None
    if not isinstance(data, Mapping):
        raise SpecError(f"study file {path} must hold a mapping with name, base, space (sweeps/README.md)")
    return dict(data), str(path)


# ------------------------------------------------------------------------------------------------


def load_spec(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
    name: str | None = None,
    storage: str | None = None,
    n_trials: int | None = None,
) -> StudySpec:
    """Load and validate a study file (a path or its parsed mapping); the arguments beat the file."""
    data, source = _read(path_or_dict)
    try:
        return _build(data, name=name, storage=storage, n_trials=n_trials)
    except SpecError as exc:
        if source == "study":
            raise
        raise SpecError(f"{source}: {exc}") from None


def _build(data: dict[str, Any], name: str | None, storage: str | None, n_trials: int | None) -> StudySpec:
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        k = unknown[0]
        raise SpecError(f"unknown key {k!r}{_did_you_mean(str(k), TOP_KEYS)}; valid keys: {', '.join(TOP_KEYS)}")

    # name
    study_name = name if name is not None else data.get("name")
    if study_name is None or study_name == "":
        raise SpecError("name is missing; add `name: <study name>` (letters, digits, _ . -) or pass a name")
    if not isinstance(study_name, str) or not NAME_RE.match(study_name):
        raise SpecError(f"name {study_name!r} must be letters, digits, '_', '.' or '-' (it names a folder); rename it")

    # base
    base = data.get("base")
    if base is None:
        raise SpecError("base is missing; add `base:` with the Hydra overrides of `ickd train`, e.g. [experiment=cifar100/res32x4_res8x4, distill=ickd]")
    if isinstance(base, str) or not isinstance(base, (list, tuple)) or not all(isinstance(b, str) for b in base):
        raise SpecError(f"base must be a list of override strings (e.g. - distill=ickd), got {base!r}")
    for item in base:
        override = parse_override(item, where="base", hydra_only=True)
        if override.is_sweep_override():
            raise SpecError(f"base: {item!r} is a sweep; base overrides are fixed values, move it to space")

    # space
    raw = data.get("space")
    if raw is None:
        raise SpecError("space is missing; add `space:` mapping config keys to sweeper strings, e.g. memory.k: choice(4, 8, 16)")
    dims = parse_dimensions(raw)
    searched = [d for d in dims if d.searched]
    if not searched:
        raise SpecError("space has no searched dimension (only fixed values); add one such as memory.k: choice(4, 8, 16)")
    base = [*base, *(d.fixed_override for d in dims if not d.searched)]

    # objective
    obj = _mapping(data.get("objective"), "objective", asdict(Objective()))
    bad = [k for k in obj if k not in ("metric", "mode", "direction")]
    if bad:
        raise SpecError(f"objective.{bad[0]} is not a setting; objective has metric, mode ({'|'.join(MODES)}), direction ({'|'.join(DIRECTIONS)})")
    objective = Objective(**{**asdict(Objective()), **obj})
    if not isinstance(objective.metric, str) or not objective.metric:
        raise SpecError(f"objective.metric must be a key of the per-epoch metrics (e.g. holdout/top1), got {objective.metric!r}")
    if objective.mode not in MODES:
        raise SpecError(f"objective.mode {objective.mode!r} is invalid; use one of {', '.join(MODES)}")
    if objective.direction not in DIRECTIONS:
        raise SpecError(f"objective.direction {objective.direction!r} is invalid; use one of {', '.join(DIRECTIONS)}")
    warning = objective_split_warning(objective.metric)
    if warning:
        log.warning("study %s: %s", study_name, warning)

    # budget, storage, retries, heartbeats
    trials = _positive_int(n_trials if n_trials is not None else data.get("n_trials", 20), "n_trials")
    url = _check_storage(storage if storage is not None else data.get("storage"))
    retry = _mapping(data.get("retry"), "retry", DEFAULT_RETRY)
    if set(retry) - set(DEFAULT_RETRY):
        raise SpecError(f"retry.{sorted(set(retry) - set(DEFAULT_RETRY))[0]} is not a setting; retry has max_retries, max_failures")
    retry = {**DEFAULT_RETRY, **retry}
    _positive_int(retry["max_retries"], "retry.max_retries", allow_zero=True)
    if retry["max_failures"] is not None:
        _positive_int(retry["max_failures"], "retry.max_failures")
    heartbeat = _mapping(data.get("heartbeat"), "heartbeat", DEFAULT_HEARTBEAT)
    if set(heartbeat) - set(DEFAULT_HEARTBEAT):
        raise SpecError(f"heartbeat.{sorted(set(heartbeat) - set(DEFAULT_HEARTBEAT))[0]} is not a setting; heartbeat has interval_s, grace_s, suspend_grace_s")
    heartbeat = {**DEFAULT_HEARTBEAT, **heartbeat}
    _positive_int(heartbeat["interval_s"], "heartbeat.interval_s")
    _positive_int(heartbeat["grace_s"], "heartbeat.grace_s")
    _positive_int(heartbeat["suspend_grace_s"], "heartbeat.suspend_grace_s")
    if heartbeat["grace_s"] <= heartbeat["interval_s"]:
        raise SpecError(
            f"heartbeat.grace_s ({heartbeat['grace_s']}) must exceed heartbeat.interval_s ({heartbeat['interval_s']}), "
            "or live trials get failed between two beats; raise grace_s (e.g. 4 x interval_s)"
        )

    spec = StudySpec(
        name=study_name,
        base=list(base),
        objective=objective,
        space={d.key: d.distribution for d in searched},
        raw_space={d.key: d.raw for d in searched},  # fixed entries live in base, which to_dict keeps
        sampler=_sampler_spec(data.get("sampler")),
        pruner=_pruner_spec(data.get("pruner")),
        n_trials=trials,
        storage=url,
        retry=retry,
        heartbeat=heartbeat,
    )
    _try_build(spec)
    return spec


def _sampler_spec(value: Any) -> dict[str, Any]:
    spec = _mapping(value, "sampler", {"name": "tpe"})
    name = spec.setdefault("name", "tpe")
    if name not in SAMPLERS:
        raise SpecError(f"sampler.name {name!r} is unknown{_did_you_mean(str(name), list(SAMPLERS))}; valid: {', '.join(SAMPLERS)}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    _check_kwargs("sampler", name, SAMPLERS[name], kwargs, derived=("search_space",) if name == "grid" else ())
    seed = kwargs.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SpecError(f"sampler.seed must be an integer or null, got {seed!r}")
    missing = [m for m in SAMPLER_PACKAGES.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise SpecError(
            f"the {name} sampler needs the package(s) {', '.join(missing)}, which are not installed; "
            f"`pip install {' '.join(missing)}` or use sampler tpe/random"
        )
    return spec


def _pruner_spec(value: Any) -> dict[str, Any]:
    spec = _mapping(value, "pruner", {"name": "median"})
    name = spec.setdefault("name", "median")
    if name is None:  # `pruner: {name: null}` means no pruning, like `name: none`
        spec["name"] = name = "none"
    if name not in PRUNERS:
        raise SpecError(f"pruner.name {name!r} is unknown{_did_you_mean(str(name), list(PRUNERS))}; valid: {', '.join(PRUNERS)}")
    _check_kwargs("pruner", name, PRUNERS[name], {k: v for k, v in spec.items() if k != "name"})
    return spec


def _try_build(spec: StudySpec) -> None:
    """Build the sampler and pruner once, so bad values fail at load time and not in trial 1."""
    for kind, build in (("sampler", spec.build_sampler), ("pruner", spec.build_pruner)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-feature warnings: the workers show them
                build()
        except SpecError:
            raise
        except (TypeError, ValueError) as exc:
            settings = getattr(spec, kind)
            raise SpecError(f"{kind} {settings} is invalid: {str(exc).rstrip('.')}. Fix the {kind} settings") from None
