"""Config groups generated from the registries, so `teacher=`, `student=` and `model=` accept every
registered architecture (and `--help` lists them) without one YAML file per model and group."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ickd.errors import ConfigError
from ickd.models import list_models
from ickd.config_schema import ModelSchema, TeacherSchema, register_schemas

_registered = False


def config_dir() -> Path:
    """The primary config folder: ICKD_CONFIG_DIR, else the shipped ``configs/`` (the checkout's,
    or the wheel's package data: :func:`ickd.resources.shipped_path`).

    Also makes every Hydra composition in this process search ICKD_CONFIG_PATH's folders
    (:func:`ickd.resources.install_user_config_path`); every composition calls this first."""
    import os

    from ickd.resources import install_user_config_path, shipped_path

    install_user_config_path()
    env = os.environ.get("ICKD_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    return shipped_path("configs").resolve()


def register_model_groups() -> None:
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    register_schemas(cs)  # schema/<group>/<option>: the typed schemas the YAML files inherit
    for name in list_models():
        # Typed nodes; their defaults (checkpoint=None, trust_checkpoint=False, kwargs={}) live in the schema.
        cs.store(group="teacher", name=name, node=TeacherSchema(name=name))
        cs.store(group="student", name=name, node=ModelSchema(name=name))
        cs.store(group="model", name=name, node=ModelSchema(name=name))
    _registered = True


def compose_run_config(overrides: list[str]) -> DictConfig:
    """Compose a run config exactly as `ickd train <overrides>` would (without starting Hydra's app)."""
    register_model_groups()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def compose_checked(overrides: list[str]) -> DictConfig:
    """:func:`compose_run_config`, then :func:`ickd.config_schema.validate_config`: every type error,
    unknown key, unknown group option, bad choice or bad override is a ConfigError that names the key
    and the fix, raised before any data, teacher or queue is touched."""
    from ickd.config_schema import config_error, validate_config

    try:
        cfg = compose_run_config(overrides)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf: composition, override grammar, missing config, types
        raise config_error(exc, overrides) from exc
    try:
        return validate_config(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a value that fails to convert when read
        raise config_error(exc, overrides) from exc


# Flags of Hydra's app command line after which the run config is not composed for a run (help, info,
# completion, another config): `ickd train` hands those to Hydra unchecked.
_NO_RUN_FLAGS = ("help", "hydra_help", "info", "shell_completion", "config_path", "config_name", "config_dir", "experimental_rerun")
MAX_PRECHECKED_POINTS = 64


def _is_hydra_override(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    if key == "hydra.searchpath":  # user config folders: the run config is composed from them too
        return False
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def sweep_points(overrides: list[str], limit: int = MAX_PRECHECKED_POINTS) -> list[list[str]]:
    """The runs of a Hydra multirun over ``overrides`` (``a=1,2 b=range(0,3)``: cartesian product),
    at most ``limit``; sweeps that cannot be listed (intervals for optimising sweepers) are left
    out, so the points still check everything else."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    axes: list[list[str]] = []
    for o in parsed:
        if not o.is_sweep_override():
            axes.append([o.input_line])
            continue
        key = o.input_line.split("=", 1)[0]
        try:
            axes.append([f"{key}={value}" for value in o.sweep_string_iterator()])
        except Exception:  # noqa: BLE001 - interval()/tag() sweeps have no list of values
            continue
    return [list(p) for p in itertools.islice(itertools.product(*axes), limit)]


def precheck_train_args(args: list[str]) -> None:
    """Compose and validate what ``ickd train ARGS`` will run before Hydra starts (so errors are a
    ConfigError, exit 2, never a Hydra traceback or a failure after data/teacher passes). With
    ``-m``/``--multirun``, every sweep point (up to MAX_PRECHECKED_POINTS). ``--help`` and friends are
    left to Hydra; ``hydra.*`` overrides are Hydra's own and are not part of the run config."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    try:
        parsed, _ = parser.parse_known_args(list(args))
    except SystemExit:  # argparse already printed its usage error; let Hydra report it the same way
        return
    if any(getattr(parsed, flag, None) for flag in _NO_RUN_FLAGS):
        return
    overrides = [o for o in parsed.overrides if not _is_hydra_override(o)]
    if parsed.multirun:
        try:
            points = sweep_points(overrides)
        except Exception as exc:  # noqa: BLE001 - override grammar
            from ickd.config_schema import config_error

            raise config_error(exc, overrides) from exc
    else:
        points = [overrides]
    for point in points:
        try:
            compose_checked(point)
        except ConfigError as exc:
            if len(points) > 1:
                raise ConfigError(f"{exc} [sweep point: {' '.join(point)}]") from exc
            raise
