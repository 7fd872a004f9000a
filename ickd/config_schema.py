"""Typed schemas of every config group (Hydra structured configs) and the compose-time checks.

Each YAML under ``configs/`` inherits its schema through its defaults list
(``- /schema/<group>/<option>@_here_``); the schemas are registered in Hydra's ConfigStore under the
``schema/`` group by :func:`register_schemas` (ickd.config_store). Hydra then rejects, while composing,
a value of the wrong type (``trainer.epochs=abc``) and any key the schema does not declare (in a YAML
file or an override without ``+``).

One place states each default: the YAML file. Schema fields have no default (``MISSING``), so a YAML
that forgets a key fails ``validate_config``; only keys that no YAML sets (``model``, ``pair``) and the
generated teacher/student/model nodes (ickd.config_store) state their defaults here.

Choice-valued string fields carry ``metadata={"choices": (...)}``; :func:`validate_config` checks them
(and the registry names) right after composing, before any data or teacher pass, so serialised configs
stay plain strings. This module imports no platform package (optuna, submitit, wandb).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from ickd.errors import ConfigError
from ickd.data.base import DATASETS
from ickd.models import list_models
from ickd.redaction import scrub_overrides


def choice(*values: str) -> Any:
    """A required str field whose value must be one of ``values``."""
    return field(default=MISSING, metadata={"choices": tuple(values)})


def req() -> Any:
    """A required field: the YAML file states its value."""
    return field(default=MISSING)


# --- groups -----------------------------------------------------------------------------------

@dataclass
class DatasetSchema:
    name: str = req()                       # a registered dataset (ickd.data.DATASETS)
    root: Optional[str] = req()
    download: bool = req()
    train_subset: Optional[int] = req()
    val_subset: Optional[int] = req()
    holdout: Any = req()                    # null | int count >= 1 | fraction in (0, 1)
    subset_seed: int = req()
    kwargs: Dict[str, Any] = req()


@dataclass
class ModelSchema:
    name: str = req()                       # a registered model (ickd.models.list_models)
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherSchema(ModelSchema):
    checkpoint: Optional[str] = None
    trust_checkpoint: bool = False          # unpickle a checkpoint that is not weights-only (runs its code)


@dataclass
class DistillSchema:
    name: str = req()
    ce_weight: float = req()


# Experiments state one recipe for every method (configs/experiment/imagenet/*: temperature 1,
# CE 0.5 / KD 0.5); methods without such a term accept the key (typed) and ignore it.
@dataclass
class CESchema(DistillSchema):
    kd_weight: Optional[float] = None       # ignored by ce
    temperature: Optional[float] = None     # ignored by ce


@dataclass
class KDSchema(DistillSchema):
    kd_weight: float = req()
    temperature: float = req()


@dataclass
class KDMatchedSchema(KDSchema):
    pass


@dataclass
class DKDSchema(DistillSchema):
    alpha: float = req()
    beta: float = req()
    temperature: float = req()
    warmup_epochs: int = req()
    kd_weight: Optional[float] = None       # ignored by dkd (see CESchema)


@dataclass
class InContextSchema:
    """IC-KD's PICD + NICD alone (a term of a composite method: dkd+ickd, crd+ickd, kd+picd)."""
    name: str = req()
    temperature: float = req()
    picd_weight: float = req()
    nicd_weight: float = req()
    warmup_epochs: int = req()
    tau_r: float = req()
    picd_weighting: str = choice("similarity", "uniform")
    picd_aggregate: str = choice("logits", "probs")
    nicd_form: str = choice("contrastive", "penalty")
    kappa: float = req()
    nicd_temperature: Optional[float] = req()
    nicd_weighting: str = choice("similarity", "uniform")


@dataclass
class ICKDSchema(InContextSchema):
    """IC-KD: CE + KD + the in-context terms."""
    ce_weight: float = req()
    kd_weight: float = req()


@dataclass
class FeatureMethodSchema(CESchema):
    """A feature-based baseline: CE plus one weighted feature loss (``feat_weight``)."""
    feat_weight: float = req()


@dataclass
class FitNetSchema(FeatureMethodSchema):
    hint_layer: int = req()                 # index into the feature dict's stages (0 = stem)


@dataclass
class ATSchema(FeatureMethodSchema):
    p: float = req()


@dataclass
class CRDSchema(FeatureMethodSchema):
    feat_dim: int = req()
    nce_k: int = req()
    nce_t: float = req()
    nce_momentum: float = req()


@dataclass
class ReviewKDSchema(FeatureMethodSchema):
    warmup_epochs: int = req()


@dataclass
class CompositeSchema:
    """A sum of methods: ``terms`` maps a term name to that method's own config section."""
    name: str = req()
    terms: Dict[str, Any] = req()


DISTILL_SCHEMAS: dict[str, type] = {
    "ce": CESchema, "kd": KDSchema, "kd_matched": KDMatchedSchema, "dkd": DKDSchema, "ickd": ICKDSchema,
    "incontext": InContextSchema, "fitnet": FitNetSchema, "at": ATSchema, "crd": CRDSchema,
    "reviewkd": ReviewKDSchema, "composite": CompositeSchema,
}


@dataclass
class ParadigmSchema:
    name: str = req()


@dataclass
class OfflineSchema(ParadigmSchema):
    pass


@dataclass
class OnlineSchema(ParadigmSchema):
    pass


@dataclass
class TeacherFreeSchema(ParadigmSchema):
    bank_source: str = choice("self", "ema")
    ema_decay: float = req()


PARADIGM_SCHEMAS: dict[str, type] = {"offline": OfflineSchema, "online": OnlineSchema, "teacher_free": TeacherFreeSchema}


@dataclass
class MemorySchema:
    size: Optional[int] = req()
    subset: str = choice("fifo", "random")
    update: str = choice("frozen", "overwrite", "momentum")
    momentum: float = req()
    fill: str = choice("pass", "online")
    k: int = req()
    split: str = choice("topk", "separate")
    k_pos: int = req()
    k_neg: int = req()
    backend: str = choice("auto", "torch", "faiss_flat", "faiss_ivf")
    nlist: Optional[int] = req()
    nprobe: Optional[int] = req()
    use_gpu: Optional[bool] = req()
    feature_dtype: str = choice("auto", "float32", "float16", "bfloat16")
    feature_transform: str = choice("auto", "none", "center", "center_whiten")
    whiten_eps: float = req()
    center_momentum: float = req()
    retrieval: str = choice("knn", "random")


@dataclass
class OptimSchema:
    name: str = choice("sgd", "adamw")
    lr: float = req()
    momentum: float = req()
    nesterov: bool = req()
    weight_decay: float = req()
    schedule: str = choice("multistep", "cosine", "constant")
    milestones: List[int] = req()
    gamma: float = req()
    warmup_epochs: int = req()
    min_lr_factor: float = req()


@dataclass
class TrainerSchema:
    epochs: int = req()
    batch_size: int = req()
    eval_batch_size: int = req()
    device: str = field(default=MISSING, metadata={"pattern": r"auto|cpu|mps|cuda(:\d+)?", "choices": ("auto", "cpu", "cuda", "cuda:N")})
    amp: str = choice("auto", "bf16", "off")
    channels_last: str = choice("auto", "on", "off")
    deterministic: bool = req()
    num_workers: int = req()
    checkpoint_every: int = req()
    bank_checkpoint_every: int = req()     # epochs between checkpoints carrying a bank that changes (docs/design.md)
    resume: str = req()                     # auto | never | PATH (or a W&B artifact reference)
    progress: str = choice("auto", "on", "off")
    progress_interval_s: float = req()
    max_batches_per_epoch: Optional[int] = req()
    eval_every: int = req()
    threads: Optional[int] = req()
    nonfinite_check_every: Optional[int] = req()
    pipeline: str = choice("auto", "device", "classic")
    step: str = choice("auto", "eager", "graph")
    resume_config_check: bool = req()


@dataclass
class LoggerSchema:
    name: str = req()


@dataclass
class NoLoggerSchema(LoggerSchema):
    pass


@dataclass
class WandbLoggerSchema(LoggerSchema):
    project: str = req()
    entity: Optional[str] = req()
    group: Optional[str] = req()
    tags: List[str] = req()
    mode: str = choice("auto", "online", "offline", "disabled")
    job_type: Optional[str] = req()
    log_checkpoints: bool = req()
    log_model: bool = req()
    notes: Optional[str] = req()


LOGGER_SCHEMAS: dict[str, type] = {"none": NoLoggerSchema, "wandb": WandbLoggerSchema}


@dataclass
class PairSchema:
    """What an experiment says about its teacher/student pair (configs/experiment/*)."""
    label: Optional[str] = None
    dkd_beta: Optional[float] = None
    published_top1: Dict[str, float] = field(default_factory=dict)


@dataclass
class TrainSchema:
    """The top level of ``configs/train.yaml``. Groups whose schema depends on the option
    (distill, paradigm, logger) are typed by their YAML's own schema."""
    dataset: DatasetSchema = req()
    teacher: TeacherSchema = req()
    student: ModelSchema = req()
    model: Optional[ModelSchema] = None     # stage=teacher: the network to train (null: the teacher's)
    distill: Any = req()
    paradigm: Any = req()
    memory: MemorySchema = req()
    optim: OptimSchema = req()
    trainer: TrainerSchema = req()
    logger: Any = req()
    stage: str = choice("student", "teacher")
    seed: int = req()
    name: Optional[str] = req()
    pair: Optional[PairSchema] = None       # set by configs/experiment/*


# group -> option -> schema, as registered under schema/<group>/<option>
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {"default": DatasetSchema},
    "distill": DISTILL_SCHEMAS,
    "paradigm": PARADIGM_SCHEMAS,
    "memory": {"default": MemorySchema},
    "optim": {"default": OptimSchema},
    "trainer": {"default": TrainerSchema},
    "logger": LOGGER_SCHEMAS,
}


def register_schemas(cs: Any) -> None:
    """Store every schema in Hydra's ConfigStore ``cs`` under ``schema/`` (never a user choice)."""
    cs.store(group="schema", name="train", node=TrainSchema)
    for group, options in GROUP_SCHEMAS.items():
        for option, schema in options.items():
            cs.store(group=f"schema/{group}", name=option, node=schema)


# --- validation after compose -----------------------------------------------------------------

def _schema_for(section: str, node: Any) -> type | None:
    if section in ("teacher",):
        return TeacherSchema
    if section in ("student", "model"):
        return ModelSchema
    options = GROUP_SCHEMAS.get(section)
    if options is None:
        return None
    if "default" in options:
        return options["default"]
    if section == "distill" and isinstance(node, DictConfig) and "terms" in node:
        return CompositeSchema  # dkd+ickd, crd+ickd, kd+picd...: named after their terms
    name = node.get("name") if isinstance(node, DictConfig) else None
    return options.get(str(name)) if name is not None else None


_UNRESOLVED = object()


def _value(node: DictConfig, key: str) -> Any:
    """The resolved value, or _UNRESOLVED where it depends on something absent here (an env var
    set only on the cluster): checked when the run starts."""
    try:
        return node[key]
    except Exception:  # noqa: BLE001 - interpolation errors of every kind
        return _UNRESOLVED


def _check_choice(key: str, value: Any, meta: Any) -> None:
    choices = meta.get("choices")
    if not choices or value is _UNRESOLVED or value is None:
        return
    pattern = meta.get("pattern")
    ok = re.fullmatch(pattern, str(value)) is not None if pattern else value in choices
    if not ok:
        close = difflib.get_close_matches(str(value), [c for c in choices if c.isidentifier()], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"config error: {key}={value!r} is not valid{hint}; use one of: {', '.join(choices)}")


def _check_name(key: str, value: Any, names: list[str], kind: str) -> None:
    if value is _UNRESOLVED or value in names:
        return
    close = difflib.get_close_matches(str(value), names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"config error: {key}={value!r} is not a registered {kind}{hint}; valid names: {', '.join(names)}")


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys whose value is ``???``, without resolving interpolations (OmegaConf.missing_keys resolves
    them, and an env var set only where the run starts must not fail here)."""
    out: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                out.append(path)
                continue
            child = node._get_node(key)
            if child is not None and not OmegaConf.is_interpolation(node, key) and isinstance(child, DictConfig):
                out.extend(_missing_keys(child, path + "."))
    return out


def validate_config(cfg: DictConfig) -> DictConfig:
    """Checks that need no data: no required value left unset, every choice-valued key one of its
    choices, dataset/model names registered, plain ranges. Raises ConfigError naming the key and the
    fix. Returns ``cfg``."""
    missing = sorted(k for k in _missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        raise ConfigError(
            f"config error: {', '.join(missing)} must be set (the config file that selects it does not state a value); "
            "set it on the command line (e.g. `" + missing[0] + "=...`) or in the YAML file"
        )
    for f in fields(TrainSchema):
        if f.metadata.get("choices"):
            _check_choice(f.name, _value(cfg, f.name), f.metadata)
    for section in ("dataset", "teacher", "student", "model", "distill", "paradigm", "memory", "optim", "trainer", "logger"):
        node = cfg.get(section) if section in cfg else None
        if not isinstance(node, DictConfig):
            continue
        if section == "distill":
            _validate_distill(node, "distill")
            continue
        schema = _schema_for(section, node)
        if section in GROUP_SCHEMAS and "default" not in GROUP_SCHEMAS[section]:
            name = _value(node, "name")
            if name is not _UNRESOLVED and schema is None:
                options = sorted(GROUP_SCHEMAS[section])
                raise ConfigError(f"config error: {section}.name={name!r} is not valid; use one of: {', '.join(options)} (select it with {section}=NAME)")
        if schema is None or not is_dataclass(schema):
            continue
        for f in fields(schema):
            if f.name in node:
                value = _value(node, f.name)
                if value in ("True", "False") and "on" in f.metadata.get("choices", ()):
                    # YAML 1.1 reads a bare on/off (and true/false) as a bool; the str field made it "True"
                    value = node[f.name] = "on" if value == "True" else "off"
                _check_choice(f"{section}.{f.name}", value, f.metadata)
    _check_registries(cfg)
    _check_ranges(cfg)
    return cfg


def _validate_distill(node: DictConfig, key: str) -> None:
    """A distill section: a user's method (``_target_``: its own keys, unchecked here), a composite
    (each term checked as a distill section of its own) or a registered method (its schema)."""
    if "_target_" in node:
        return
    if "terms" in node and isinstance(node.get("terms"), DictConfig):
        for term, sub in node.terms.items():
            if isinstance(sub, DictConfig):
                _validate_distill(sub, f"{key}.terms.{term}")
        return
    name = _value(node, "name")
    schema = DISTILL_SCHEMAS.get(str(name)) if name is not _UNRESOLVED else None
    if name is not _UNRESOLVED and schema is None:
        raise ConfigError(f"config error: {key}.name={name!r} is not valid; use one of: {', '.join(sorted(DISTILL_SCHEMAS))} "
                          "(select it with distill=NAME), or give a Method class with distill._target_=package.module.Class")
    if schema is None:
        return
    for f in fields(schema):
        if f.name in node:
            _check_choice(f"{key}.{f.name}", _value(node, f.name), f.metadata)


def _check_registries(cfg: DictConfig) -> None:
    _check_name("dataset.name", _value(cfg.dataset, "name"), DATASETS.names(), "dataset")
    models = list_models()
    for section in ("teacher", "student", "model"):
        node = cfg.get(section)
        if isinstance(node, DictConfig) and "name" in node:
            _check_name(f"{section}.name", _value(node, "name"), models, "model")


def _check_ranges(cfg: DictConfig) -> None:
    def positive(key: str, value: Any, allow_none: bool = False) -> None:
        if value is _UNRESOLVED or (allow_none and value is None):
            return
        if value is None or value <= 0:
            raise ConfigError(f"config error: {key}={value} must be > 0" + (" (or null)" if allow_none else ""))

    t = cfg.trainer
    for key in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "bank_checkpoint_every", "eval_every"):
        positive(f"trainer.{key}", _value(t, key))
    for key in ("max_batches_per_epoch", "threads", "nonfinite_check_every"):
        positive(f"trainer.{key}", _value(t, key), allow_none=True)
    interval = _value(t, "progress_interval_s")
    if interval is not _UNRESOLVED and interval < 0:
        raise ConfigError(f"config error: trainer.progress_interval_s={interval} must be >= 0 (0 disables the progress lines)")
    resume = _value(t, "resume")
    if resume is not _UNRESOLVED and not str(resume).strip():
        raise ConfigError("config error: trainer.resume is empty; use auto, never or the path of a checkpoint")
    positive("optim.lr", _value(cfg.optim, "lr"))
    mem = cfg.memory
    positive("memory.size", _value(mem, "size"), allow_none=True)
    for key in ("k", "k_pos", "k_neg"):
        positive(f"memory.{key}", _value(mem, key))
    holdout = _value(cfg.dataset, "holdout")
    if holdout is not _UNRESOLVED and holdout is not None:
        ok = (isinstance(holdout, int) and not isinstance(holdout, bool) and holdout >= 0) or (
            isinstance(holdout, float) and 0 < holdout < 1
        )
        if not ok:
            raise ConfigError(
                f"config error: dataset.holdout={holdout!r} is not valid; use null, a count of images (e.g. 5000) "
                "or a fraction in (0, 1) (e.g. 0.1)"
            )


# --- Hydra/OmegaConf composition errors -> ConfigError ---------------------------------------

_TYPE_NAMES = {"Integer": "an int", "Float": "a float", "Boolean": "a bool (true/false)", "String": "a string"}
_FIX = "fix the value on the command line or in the YAML file; `ickd train --cfg job` prints the composed config"


def _schema_keys(type_name: str) -> list[str]:
    schema = globals().get(type_name)
    return [f.name for f in fields(schema)] if isinstance(schema, type) and is_dataclass(schema) else []


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def config_error(exc: BaseException, overrides: list[str] | tuple[str, ...] = ()) -> ConfigError:
    """A ConfigError naming the key and the fix for an exception Hydra or OmegaConf raised while
    composing ``overrides`` (a ConfigError is returned unchanged)."""
    if isinstance(exc, ConfigError):
        return exc
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    names = {type(e).__name__ for e in chain}
    for err in chain:
        text = str(err)
        key_match = re.search(r"full_key: (\S+)", text)
        full_key = key_match.group(1) if key_match else None
        type_match = re.search(r"object_type=(\w+)", text)
        m = re.search(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", text, re.S)
        if m and full_key:
            return ConfigError(f"config error: {full_key}: {m.group(1)!r} is not {_TYPE_NAMES.get(m.group(2), m.group(2))} ({_FIX})")
        m = re.search(r"Value '(.*)' is not a valid bool", text, re.S)
        if m and full_key:
            return ConfigError(f"config error: {full_key}: {m.group(1)!r} is not a bool; use true or false")
        m = re.search(r"Key '([^']+)' not in '(\w+)'", text)
        if m:
            key = full_key or m.group(1)
            known = _schema_keys(type_match.group(1) if type_match else m.group(2))
            close = difflib.get_close_matches(m.group(1), known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            valid = f"; valid keys: {', '.join(known)}" if known else ""
            section, _, leaf = key.rpartition(".")
            owners = [o for o, cls in GROUP_SCHEMAS.get(section, {}).items() if o != "default" and leaf in _schema_keys(cls.__name__)]
            if owners:
                hint = f" ({leaf} belongs to {' and '.join(f'{section}={o}' for o in owners)}: select that option first)"
            return ConfigError(
                f"config error: {key}: unknown key{hint}{valid}. Fix its name (an override adding a key on purpose "
                "takes a leading +, e.g. +key=value; a YAML file must only set keys its schema declares)"
            )
        if type(err).__name__ == "MissingMandatoryValue" and full_key:
            return ConfigError(f"config error: {full_key} must be set; pass {full_key}=VALUE")
    if "OverrideParseException" in names:
        shown, reason = scrub_overrides(list(overrides), _first_line(str(exc)))
        return ConfigError(
            f"config error: cannot parse the overrides {' '.join(shown)!r}: {reason}. "
            "Write each one as key=value (quote values with spaces or special characters); "
            "grammar: https://hydra.cc/docs/advanced/override_grammar/basic/"
        )
    if "MissingConfigException" in names:
        text = " ".join(line.strip() for line in str(exc).split("Config search path:")[0].splitlines() if line.strip())
        return ConfigError(f"config error: {text}. Pick one of the available options (`ickd train --help` lists every group)")
    detail = "; ".join(_first_line(str(e)) for e in chain if str(e).strip())
    return ConfigError(f"config error: {detail}. ({_FIX})")
