"""Config groups generated from the registries, so `teacher=`, `student=` and `model=` accept every
registered architecture (and `--help` lists them) without one YAML file per model and group."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ickd.models import list_models

_registered = False


def config_dir() -> Path:
    """The top-level ``configs/`` folder (ICKD_CONFIG_DIR overrides it)."""
    import os

    env = os.environ.get("ICKD_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parent.parent / "configs").resolve()


def register_model_groups() -> None:
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    for name in list_models():
        cs.store(group="teacher", name=name, node={"name": name, "checkpoint": None, "kwargs": {}})
        cs.store(group="student", name=name, node={"name": name, "kwargs": {}})
        cs.store(group="model", name=name, node={"name": name, "kwargs": {}})
    _registered = True


def compose_run_config(overrides: list[str]) -> DictConfig:
    """Compose a run config exactly as `ickd train <overrides>` would (without starting Hydra's app)."""
    register_model_groups()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))
