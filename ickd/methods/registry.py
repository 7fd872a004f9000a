"""The registry of distillation methods (name -> class) and how a config section becomes one."""
from __future__ import annotations

from typing import Any, Mapping

from ickd.errors import ConfigError
from ickd.registry import Registry

METHODS: Registry[type] = Registry("distill method")


def method_class(cfg: Mapping[str, Any]) -> type:
    """The class of ``cfg``: ``cfg["_target_"]`` (a user's ``package.module.Class``, no fork needed),
    the composite when it declares ``terms``, or the registered ``cfg["name"]``."""
    target = cfg.get("_target_")
    if target:
        from hydra.utils import get_class

        from ickd.methods.base import Method

        try:
            cls = get_class(str(target))
        except Exception as exc:  # ImportError, AttributeError, hydra's own wrappers
            raise ConfigError(
                f"distill._target_={target!r} could not be imported ({exc}); give the full dotted path of a "
                "Method subclass in a package on PYTHONPATH (e.g. mylab.kd.MyMethod)"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"distill._target_={target!r} is not a subclass of ickd.methods.Method")
        return cls
    if cfg.get("terms"):
        return METHODS.get("composite")  # a sum of terms, whatever its name (dkd+ickd, kd+picd...)
    return METHODS.get(str(cfg["name"]))


def create_method(cfg: Mapping[str, Any], context: Any = None):
    """The method of config section ``cfg`` (``distill``), built with ``context`` (a MethodContext)."""
    plain = {k: v for k, v in dict(cfg).items() if k != "_target_"}
    return method_class(cfg)(plain, context)
