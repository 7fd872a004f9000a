"""Logging of a run that is not started by ``ickd train`` (a launched job, a packed child): the very
set-up Hydra gives ``ickd train``, so a job's log holds the same lines a local run prints.

``ickd train`` is a Hydra app: Hydra configures logging from the composed ``hydra.job_logging``
(by default ``[time][logger][LEVEL] - message`` on stdout and in ``<run folder>/<job name>.log``,
the job name being the stage) and ``hydra.verbose``. A launched run calls :func:`ickd.engine.train`
directly, without Hydra's app, so nothing configured logging there and the job's log held only
submitit's lines. :func:`configure_run_logging` composes the run's Hydra node from the same
overrides and applies it with Hydra's own function.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FALLBACK_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job_logging format


def configure_run_logging(overrides: list[str], out_dir: str | os.PathLike) -> None:
    """Configure this process's logging as ``ickd train <overrides> hydra.run.dir=<out_dir>`` would.

    Never raises for a config problem: composing the run config right after reports it properly;
    until then Hydra's default format goes to stdout."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import configure_log
    from omegaconf import OmegaConf, open_dict

    from ickd.config_store import config_dir, register_model_groups

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        register_model_groups()
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        hydra_cfg = cfg.hydra
        with open_dict(hydra_cfg):
            hydra_cfg.runtime.output_dir = str(out.resolve())
            # `ickd train` names its job after the stage (configs/train.yaml: hydra.job.name).
            if OmegaConf.is_missing(hydra_cfg.job, "name"):
                hydra_cfg.job.name = str(cfg.get("stage") or "train")
        configure_log(hydra_cfg.job_logging, hydra_cfg.verbose)
        # submitit prints its own lines through its own handlers: passed on to the root's handlers
        # as well, each would appear twice in the job's log.
        submitit_log = logging.getLogger("submitit")
        if submitit_log.handlers:
            submitit_log.propagate = False
    except Exception as exc:  # noqa: BLE001 - a bad config is reported by the run's own composition
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(FALLBACK_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.getLogger("ickd").debug("Hydra's job logging not applied (%s): logging to stdout", exc)
