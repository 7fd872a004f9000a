"""Where the platform's folders live: studies (``--root``, ``$ICKD_STUDIES``, ``./studies``) and
launches (``$ICKD_LAUNCHES``, ``./launches``). Here, not in sweep/launch, so lower layers (``ickd
wandb sync`` finds runs by study or launch name) need not import them."""
from __future__ import annotations

import os
from pathlib import Path


def studies_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("ICKD_STUDIES") or "studies")


def launches_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("ICKD_LAUNCHES") or "launches").resolve()
