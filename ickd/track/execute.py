"""The one helper that trains a run the way every entry point does: compose -> loggers -> train.

``ickd train`` (the Hydra app, with its composed config), launched jobs (``ickd.launch.tasks``) and
study workers (``ickd.sweep.worker``) all call :func:`run_training`:

1. compose the run config from overrides with ``compose_checked`` (a ConfigError naming the key,
   never a raw Hydra error), or take the config the caller composed (Hydra's app);
2. ``trainer.resume=wandb:...``: download the artifact into the run folder (``resolve_resume``);
3. the tracking callbacks the config's ``logger`` group asks for (``loggers_for``), with the
   platform's run id, group, job type and tags;
4. ``ickd.engine.train(cfg, out_dir, callbacks=[*callbacks, *trackers])``, inside ``context`` if given
   (a Ctrl-C guard, a trial heartbeat).

It lives in ickd.track (it needs the loggers); sweep, launch and the app sit above it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager, Mapping, Sequence

from ickd.config_store import compose_checked
from ickd.engine import Callback, train
from ickd.track.artifacts import resolve_resume
from ickd.track.wandb_logger import loggers_for


def run_training(
    config: Sequence[str] | Any,
    out_dir: str | os.PathLike,
    *,
    callbacks: Sequence[Callback] = (),
    tracking: Mapping[str, Any] | Callable[[Any], Mapping[str, Any]] | None = None,
    context: ContextManager | None = None,
) -> dict[str, Any]:
    """Train one run in this process; returns the trainer's summary.

    ``config``: a list of ``ickd train`` overrides (composed and checked here) or a composed config.
    ``tracking``: keyword arguments of :func:`ickd.track.wandb_logger.loggers_for` (``run_id``,
    ``group``, ``job_type``, ``tags``, ``extra``, ``on_init``), or a function of the composed config
    returning them. ``callbacks`` go before the trackers."""
    cfg = compose_checked(list(config)) if isinstance(config, (list, tuple)) else config
    cfg = resolve_resume(cfg, out_dir)  # trainer.resume=wandb:...: the artifact, downloaded into the run folder
    kwargs = dict((tracking(cfg) if callable(tracking) else tracking) or {})
    trackers = loggers_for(cfg, out_dir, **kwargs)
    with context if context is not None else contextlib.nullcontext():
        return train(cfg, out_dir, callbacks=[*callbacks, *trackers])
