"""Loading published / saved weights into a model: `load_pretrained`.

Accepted file layouts (all ``torch.save`` output):
- the RepDistiller / mdistiller ``cifar_teachers`` format ``{"model": state_dict, "epoch": 240,
  "best_acc"|"accuracy": ..., "optimizer": ...}``;
- the same with the state_dict under ``"state_dict"`` or ``"net"``;
- a raw state_dict.
A ``module.`` (DataParallel / DDP) or ``_orig_mod.`` (torch.compile) prefix on every key is removed.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import pickle
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ickd.errors import CheckpointError

_FALLBACK_KEYS = ("model", "state_dict", "net")
_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 10
_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def _numpy_scalar_globals() -> list[Any]:
    """Globals needed to unpickle numpy scalars (older training scripts store best_acc that way).

    They only rebuild numbers, so allowing them keeps `weights_only=True` safe.
    """
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: list[Any] = [scalar, np.dtype]
    if _TORCH_VERSION >= (2, 6):  # (object, "qualified.name") entries: files pickled under numpy 1.x
        allowed.append((scalar, "numpy.core.multiarray.scalar"))
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes through these classes
    if dtypes is not None:
        names = ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType")
        for name in names:
            if hasattr(dtypes, name):
                allowed.append(getattr(dtypes, name))
    return allowed


def _torch_load(path: str, trust: bool = False) -> Any:
    corrupt = (
        f"checkpoint {path!r} is corrupt or truncated and cannot be read ({{err}}); "
        "re-download or re-save it (an interrupted download or copy is the usual cause)"
    )
    # torch < 2.5 lacks the safe_globals context; numpy scalars then take the fallback below.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    context = safe_globals(_numpy_scalar_globals()) if safe_globals else contextlib.nullcontext()
    try:
        with context:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(corrupt.format(err=f"{type(err).__name__}: {err}")) from err
        weights_only_error = err
    except Exception as err:  # zip / EOF / storage-size errors all mean a damaged file
        raise CheckpointError(corrupt.format(err=f"{type(err).__name__}: {str(err)[:200]}")) from err

    # weights_only=True rejected the file. Either it holds arbitrary Python objects (e.g. an
    # argparse.Namespace of training options, which some training scripts save: torch names the
    # class on an "Unsupported global" line) or it is a damaged legacy-format pickle.
    lines = [ln.strip() for ln in str(weights_only_error).splitlines()]
    unsupported = next((ln for ln in lines if "Unsupported global" in ln), None)
    reason = (unsupported or lines[0]).split(" was not an allowed global")[0][:200]
    if not trust:
        if unsupported is None:
            raise CheckpointError(corrupt.format(err=reason)) from weights_only_error
        # Never unpickle without being asked: a pickle can run any code while it loads.
        raise CheckpointError(
            f"checkpoint {path!r} holds Python objects beyond tensors and numbers ({reason}), so it can only "
            "be read by full unpickling, which runs code stored in the file: a malicious file could execute "
            "anything as you. If you trust the file (you or a colleague saved it), set teacher.trust_checkpoint=true "
            "(load_pretrained(..., trust=True)); better, re-save it weights-only once: "
            "torch.save({'model': torch.load(PATH, weights_only=False)['model']}, NEW_PATH)"
        ) from weights_only_error
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(corrupt.format(err=f"{type(err).__name__}: {str(err)[:200]}")) from err
    warnings.warn(
        f"checkpoint {path!r} contains Python objects beyond tensors and numbers, so it was "
        "loaded with weights_only=False (full unpickling, allowed by trust_checkpoint=true). "
        f"Detail: {reason}",
        UserWarning,
        stacklevel=3,
    )
    return obj


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _find_state_dict(obj: Any, key: str, path: str) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path!r} holds a {type(obj).__name__}, not a dict; expected a state_dict "
            "or a dict with the state_dict under 'model' "
            "(save with torch.save({'model': model.state_dict()}, path))"
        )
    candidates = [key] + [k for k in _FALLBACK_KEYS if k != key]
    for k in candidates:
        if k in obj and _is_state_dict(obj[k]):
            return dict(obj[k]), k
    if _is_state_dict(obj):
        return dict(obj), None
    top = ", ".join(repr(k) for k in list(obj)[:_MAX_LISTED])
    raise CheckpointError(
        f"checkpoint {path!r} has no state_dict under {', '.join(map(repr, candidates))} and is not a "
        f"state_dict itself; its top-level keys are: {top}. Pass key=<the entry holding the weights>"
    )


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:  # e.g. "module._orig_mod." from a compiled model wrapped in DDP
        changed = False
        for prefix in _PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _metadata(obj: Any, state_key: str | None) -> dict[str, Any]:
    """Scalar entries (epoch, best_acc, accuracy, ...) as plain Python numbers/strings."""
    meta: dict[str, Any] = {}
    if state_key is None or not isinstance(obj, Mapping):
        return meta
    for k, v in obj.items():
        if k == state_key or not isinstance(k, str):
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            meta[k] = v.item()
        elif isinstance(v, np.generic):
            meta[k] = v.item()
        elif isinstance(v, (numbers.Number, str)):
            meta[k] = v
    return meta


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return shown + more


def _last_linear(model: nn.Module) -> str | None:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def load_pretrained(
    model: nn.Module, path: str | os.PathLike[str], strict: bool = True, key: str = "model", trust: bool = False
) -> dict[str, Any]:
    """Load weights from `path` into `model` (in place) and return an info dict.

    The state_dict is taken from ``ckpt[key]`` (falling back to "model", "state_dict", "net") or the
    file itself if it is a raw state_dict. With ``strict=False`` missing/unexpected keys are allowed
    (reported in the info); shape mismatches always raise. Raises CheckpointError naming the cause.
    The file is read weights-only; ``trust=True`` (``teacher.trust_checkpoint=true``) allows full
    unpickling of files that hold other Python objects (it can run code from the file).

    Returns ``{"path", "key" (entry used, None for a raw state_dict), "missing_keys",
    "unexpected_keys", "metadata" (scalar entries such as epoch / best_acc)}``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(
            f"checkpoint file {path!r} does not exist; check the path (relative paths are resolved "
            f"from {os.getcwd()!r}) or download the checkpoint first"
        )
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} is a directory; pass the .pth file inside it")
    obj = _torch_load(path, trust)
    sd, used_key = _find_state_dict(obj, key, path)
    sd = _strip_prefixes(sd)

    model_sd = model.state_dict()
    mismatched = [
        (k, tuple(v.shape), tuple(model_sd[k].shape))
        for k, v in sd.items()
        if k in model_sd and v.shape != model_sd[k].shape
    ]
    if mismatched:
        lines = "; ".join(
            f"{k}: checkpoint {c} vs model {m}" for k, c, m in mismatched[:_MAX_LISTED]
        )
        more = f" (and {len(mismatched) - _MAX_LISTED} more)" if len(mismatched) > _MAX_LISTED else ""
        hint = "typical causes: wrong num_classes, wrong in_channels, or a different architecture"
        head = _last_linear(model)
        for k, c, m in mismatched:
            if head is not None and k == f"{head}.weight" and len(c) == 2 and c[1] == m[1]:
                hint = (
                    f"the checkpoint's classifier has {c[0]} outputs but the model has {m[0]}: "
                    f"build the model with num_classes={c[0]}"
                )
        raise CheckpointError(
            f"checkpoint {path!r} does not fit the model: {len(mismatched)} tensor(s) have a different "
            f"shape: {lines}{more}; {hint}"
        )

    # BatchNorm's num_batches_tracked counter is absent from very old checkpoints; torch fills it
    # itself and it does not affect outputs, so it never counts as missing.
    missing = sorted(k for k in model_sd if k not in sd and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in sd if k not in model_sd)
    if len(set(sd) & set(model_sd)) == 0:
        raise CheckpointError(
            f"checkpoint {path!r} shares no parameter names with the model (checkpoint keys start "
            f"with: {_listing(sorted(sd))}); it is for a different architecture or naming scheme"
        )
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected in the checkpoint: {_listing(unexpected)}")
        raise CheckpointError(
            f"checkpoint {path!r} does not match the model's parameter names ({'; '.join(parts)}); "
            "the checkpoint is probably for a different architecture (check the model name), "
            "or pass strict=False to load only the matching tensors"
        )
    model.load_state_dict(sd, strict=False)  # strictness was enforced above with clearer messages
    return {
        "path": path,
        "key": used_key,
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "metadata": _metadata(obj, used_key),
    }
