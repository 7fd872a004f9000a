"""Distillation methods: one file per method, each an ``nn.Module`` over a :class:`StepOutputs`
returning named, weighted losses (see ``base.py``; README "Add a method").

Registered names: ``ce``, ``kd``, ``kd_matched``, ``dkd``, ``ickd``, ``incontext`` (IC-KD's PICD +
NICD alone), ``composite`` (a sum of terms), and the feature-based baselines ``fitnet``, ``at``,
``crd``, ``reviewkd``. A config section may instead name a user's class with ``_target_``.
"""
from ickd.methods.base import Method, MethodContext, StepOutputs, ramp
from ickd.methods.registry import METHODS, create_method, method_class

# Import the built-in methods so they register themselves.
from ickd.methods import at, ce, composite, crd, dkd, fitnet, ickd, kd, reviewkd  # noqa: E402,F401  isort: skip

__all__ = ["METHODS", "Method", "MethodContext", "StepOutputs", "create_method", "method_class", "ramp"]
