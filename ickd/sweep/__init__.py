"""Optuna studies over `ickd train` runs: study files (``sweeps/*.yaml``) -> validated specs,
search spaces in the Hydra sweeper syntax, and trial parameters -> Hydra overrides."""
from ickd.sweep.space import params_to_overrides, parse_space
from ickd.sweep.spec import Objective, SpecError, StudySpec, load_spec

__all__ = ["Objective", "SpecError", "StudySpec", "load_spec", "params_to_overrides", "parse_space"]
