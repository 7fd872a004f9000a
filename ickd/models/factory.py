"""The model registry and `create_model`.

Every architecture registers a *factory* ``f(num_classes, in_channels=3, *, option=...)`` under its
public name. Extra options are keyword-only parameters of the factory, so `create_model` can list
the valid ones when a user passes a wrong one (a typo in a Hydra override should fail loudly, not be
silently ignored).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from ickd.errors import ConfigError
from ickd.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")


def _check_positive_int(name: str, value: Any, model: str) -> int:
    # bool is an int subclass; `num_classes=True` is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"model {model!r}: {name} must be a positive integer, got {value!r}; "
            f"e.g. {name}={'100' if name == 'num_classes' else '3'}"
        )
    return value


def _extra_options(factory: ModelFactory) -> list[str]:
    """Names of the keyword-only options a factory accepts (besides num_classes/in_channels)."""
    params = inspect.signature(factory).parameters.values()
    return sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def create_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build model `name` with freshly initialised weights.

    The model's ``forward(x)`` returns ``(logits, feat)``: logits ``(B, num_classes)`` and the pooled
    penultimate feature ``(B, model.feature_dim)`` (the embedding the IC-KD memory bank stores).
    `in_channels` only changes the first convolution (1 for Fashion-MNIST).
    Raises UnknownNameError for an unknown name and ConfigError for bad arguments.
    """
    factory = MODELS.get(name)  # UnknownNameError lists the valid names
    num_classes = _check_positive_int("num_classes", num_classes, name)
    in_channels = _check_positive_int("in_channels", in_channels, name)
    valid = _extra_options(factory)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        hint = f"valid options: {', '.join(valid)}" if valid else "it takes no extra options"
        raise ConfigError(
            f"model {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; {hint}"
        )
    model = factory(num_classes, in_channels, **kwargs)
    if not isinstance(getattr(model, "feature_dim", None), int):
        # A registration bug, not a user error: every model must advertise its embedding size.
        raise TypeError(f"model {name!r} does not set an integer feature_dim")
    return model


def list_models() -> list[str]:
    """All registered model names, sorted."""
    return MODELS.names()


def check_widths(widths: Any, expected: int, model: str) -> list[int]:
    """Validate a user-supplied `widths` list (e.g. from a Hydra ListConfig)."""
    try:
        if isinstance(widths, (str, bytes)):
            raise TypeError
        values = list(widths)
    except TypeError:
        values = None
    if (
        values is None
        or len(values) != expected
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)
    ):
        raise ConfigError(
            f"model {model!r}: widths must be a list of {expected} positive integers "
            f"(stem + {expected - 1} stages), got {widths!r}; e.g. widths=[16,16,32,64]"
        )
    return values
