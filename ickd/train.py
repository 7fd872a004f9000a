"""`ickd train` / `python -m ickd.train`: the Hydra application that trains one run."""
from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ickd.config_store import config_dir, register_model_groups
from ickd.errors import IckdError, NonFiniteLossError

log = logging.getLogger("ickd")

# Distinct exit codes so schedulers and sweeps can tell failures apart.
EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75  # stopped for a signal with a checkpoint saved; rerun to continue

register_model_groups()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from ickd.engine import train

    out_dir = HydraConfig.get().runtime.output_dir
    guard = None
    if os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_EXECUTOR"):
        # Under SLURM (incl. Hydra's submitit launcher): a preemption/time-limit signal stops the run
        # after its current batch with a checkpoint; then submitit's handler, if any, requeues it.
        from ickd.launch.preemption import PreemptionGuard

        guard = PreemptionGuard().install()
    from ickd.track import loggers_for

    try:
        callbacks = ([guard] if guard else []) + loggers_for(cfg, out_dir)
        summary = train(cfg, out_dir, callbacks=callbacks or None)
    except NonFiniteLossError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_NONFINITE)
    except IckdError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_CONFIG_ERROR)
    if summary["status"] == "interrupted":
        if guard is not None:
            guard.hand_over(out_dir)
        log.error("interrupted with a checkpoint in %s; run the same command again to continue", out_dir)
        sys.exit(EXIT_INTERRUPTED)
    log.info("best top-1 %.2f, last top-1 %.2f -> %s", summary["best_top1"], summary["last_top1"] or float("nan"), out_dir)
    return summary["best_top1"]


if __name__ == "__main__":
    main()
