"""Checkpoint files: saved atomically (``ickd.runs.atomic``: temporary file, fsync, rename, fsync of
the folder), so a crash (or SIGKILL, or a full disk) during a save leaves the previous checkpoint
intact and a run never loses more than the epoch in flight.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from ickd.errors import CheckpointError
# The atomic writers live in the neutral ickd.runs.atomic; the core's modules import them from here.
from ickd.runs.atomic import (  # noqa: F401
    atomic_link,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    disk_write_error,
    file_mode,
)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with a clear error when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (or drop the resume setting to start fresh)")
    try:
        # Our own files hold tensors, numbers, strings and RNG byte tensors only.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip/pickle errors for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "delete it to resume from an older one, or start the run afresh"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not an ickd checkpoint dict")
    return state
