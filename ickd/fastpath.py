"""Switches of the fast path's op-count reductions (issue 12), all on by default.

Each reduction keeps losses and gradients equal to the plain eager computation (bit-level or within
a stated tolerance, tests/test_opcount.py); the switches exist so ``bench/opcount.py --baseline``
can measure each one's effect. Nothing here imports beyond torch.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

import torch

#: name -> what it does
OPTIMISATIONS: dict[str, str] = {
    "meters": "epoch meters as one stacked device vector, updated with a few kernels",
    "stats": "retrieval statistics from the Neighbours invariants (positive implies valid, invalid sims are 0)",
    "shared_softmax": "the student's (log-)softmax at T computed once and shared by KD, PICD and NICD",
    "teacher_fold": "frozen eval-mode teacher: BatchNorm folded into its convolutions, weights kept in the compute dtype",
    "device_ramp": "warm-up ramps (DKD, IC-KD) read from a device scalar, so a ramp never recaptures",
    "lean_bank": "a full index-addressed bank (M = N): retrieval without masks for empty slots, fp16 top-k, no re-written labels",
    "fused_incontext": "PICD and NICD as one autograd node with a closed-form backward (needs shared_softmax)",
}

_enabled: dict[str, bool] = {name: True for name in OPTIMISATIONS}


def _off_from_env() -> None:
    """``ICKD_FASTPATH_OFF=name,name`` (or ``all``) switches optimisations off in this process and
    its children: to rule one out when a run looks wrong, or to measure it."""
    value = os.environ.get("ICKD_FASTPATH_OFF", "").strip()
    if not value:
        return
    names = set(OPTIMISATIONS) if value == "all" else {n.strip() for n in value.split(",") if n.strip()}
    unknown = names - set(OPTIMISATIONS)
    if unknown:
        raise ValueError(f"ICKD_FASTPATH_OFF names unknown optimisation(s) {sorted(unknown)}; known: {list(OPTIMISATIONS)}")
    for name in names:
        _enabled[name] = False


_off_from_env()


def enabled(name: str) -> bool:
    return _enabled[name]


def configure(flags: Mapping[str, bool]) -> dict[str, bool]:
    """Set switches (unknown names raise KeyError); returns the previous settings."""
    previous = dict(_enabled)
    for name, value in flags.items():
        if name not in _enabled:
            raise KeyError(f"unknown fast-path optimisation {name!r}; known: {list(OPTIMISATIONS)}")
        _enabled[name] = bool(value)
    return previous


_simulated_capture = False


def capturing(device: torch.device) -> bool:
    """Whether the code runs inside a CUDA-graph capture (or a CPU stand-in's replay of one):
    per-epoch device values must then be read, never written (a write would be baked in)."""
    if _simulated_capture:
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def simulated_capture() -> Iterator[None]:
    """For CPU stand-ins of a CUDA graph that re-run the captured body: make :func:`capturing`
    true, so the body behaves as in a capture (tests/test_fast_path.py)."""
    global _simulated_capture
    previous, _simulated_capture = _simulated_capture, True
    try:
        yield
    finally:
        _simulated_capture = previous


def prepare_epoch(distiller, epoch: int) -> None:
    """Update the device-side per-epoch values a captured step reads (outside any graph)."""
    hook = getattr(distiller, "prepare_epoch", None)
    if hook is not None:
        hook(epoch)
