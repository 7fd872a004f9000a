"""`ickd train` / `python -m ickd.train`: the Hydra application that trains one run."""
from __future__ import annotations

import contextlib
import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ickd.config_store import config_dir, register_model_groups
from ickd.config_schema import validate_config
from ickd.errors import IckdError, NonFiniteLossError

log = logging.getLogger("ickd")

# Distinct exit codes so schedulers and sweeps can tell failures apart.
EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75  # stopped for a signal with a checkpoint saved; rerun to continue
EXIT_CTRL_C = 130  # Ctrl-C: stopped with a mid-epoch checkpoint (or aborted by a second Ctrl-C); rerun to continue
EXIT_ERROR = 1  # an unexpected error (a bug): with a traceback

# `-m` multirun: Hydra's basic launcher runs every point in this process, one after the other. A
# point that fails is recorded here and the sweep goes on; main() exits non-zero after all of them.
_WRAPPED = False  # True when main() below drives Hydra (in-process points), not a submitit job
_FAILURES: list[dict] = []

register_model_groups()


def _isolated() -> bool:
    """A point of an in-process multirun: its failure must not stop the other points."""
    from hydra.types import RunMode

    return _WRAPPED and HydraConfig.get().mode == RunMode.MULTIRUN


def _fail(out_dir: str, code: int, exc: BaseException, started: float) -> None:
    """Exit with ``code``; in a multirun, record the failure (result.json in the run folder) and return."""
    if not _isolated():
        sys.exit(code)
    hc = HydraConfig.get()
    _FAILURES.append({"num": hc.job.num, "overrides": list(hc.overrides.task), "out_dir": out_dir, "code": code,
                      "error": f"{type(exc).__name__}: {exc}"})
    result = os.path.join(out_dir, "result.json")
    try:  # the trainer writes result.json itself once it started; before that (config errors) we do
        if not os.path.exists(result) or os.path.getmtime(result) < started:
            from ickd.engine.checkpoint import atomic_write_json

            atomic_write_json(result, {"status": "failed", "exit_code": code, "error": _FAILURES[-1]["error"], "out_dir": out_dir})
    except OSError as write_exc:
        log.error("could not write %s: %s", result, write_exc)
    log.error("multirun job #%d failed (exit %d); the other jobs go on", hc.job.num, code)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def task(cfg: DictConfig) -> float | None:
    import time

    from ickd.engine import train
    from ickd.engine.interrupt import CtrlCStop

    started = time.time()

    out_dir = HydraConfig.get().runtime.output_dir
    guard = None
    if os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_EXECUTOR"):
        # Under SLURM (incl. Hydra's submitit launcher): a preemption/time-limit signal stops the run
        # after its current batch with a checkpoint; then submitit's handler, if any, requeues it.
        from ickd.launch.preemption import PreemptionGuard

        guard = PreemptionGuard().install()
    from ickd.track import loggers_for, resolve_resume

    ctrl_c = CtrlCStop()  # the first Ctrl-C stops after the current batch with a checkpoint
    # One process only: with several ranks every interrupt poll is a collective per batch (the
    # trainer skips them when no callback can ask), and a Ctrl-C there just aborts (exit 130).
    single = int(os.environ.get("WORLD_SIZE", "1") or 1) == 1
    try:
        validate_config(cfg)  # choices, names, ranges: before any data or teacher pass (each multirun point too)
        cfg = resolve_resume(cfg, out_dir)  # trainer.resume=wandb:...: the artifact, downloaded into the run folder
        callbacks = [*([ctrl_c] if single else []), *([guard] if guard else []), *loggers_for(cfg, out_dir)]
        with ctrl_c if single else contextlib.nullcontext():
            summary = train(cfg, out_dir, callbacks=callbacks)
    except NonFiniteLossError as exc:
        log.error("%s", exc)
        return _fail(out_dir, EXIT_NONFINITE, exc, started)
    except IckdError as exc:
        log.error("%s", exc)
        return _fail(out_dir, EXIT_CONFIG_ERROR, exc, started)
    except Exception as exc:
        if not _isolated():
            raise  # a bug: Hydra prints it (exit 1)
        log.exception("unexpected error")
        return _fail(out_dir, EXIT_ERROR, exc, started)
    if summary["status"] == "interrupted":
        if ctrl_c.requested and not (guard is not None and guard.interrupt_requested()):
            # Ctrl-C ends the whole command (every point of a multirun too): exit 130 like a shell.
            log.error("stopped by Ctrl-C with a checkpoint in %s; run the same command again to continue", out_dir)
            sys.exit(EXIT_CTRL_C)
        if guard is not None:
            guard.hand_over(out_dir)
        log.error("interrupted with a checkpoint in %s; run the same command again to continue", out_dir)
        sys.exit(EXIT_INTERRUPTED)
    log.info("best top-1 %.2f, last top-1 %.2f -> %s", summary["best_top1"], summary["last_top1"] or float("nan"), out_dir)
    return summary["best_top1"]


def main() -> None:
    """``ickd train`` / ``python -m ickd.train``: run Hydra (one run or a ``-m`` multirun); then exit
    non-zero if any multirun point failed, listing them; Ctrl-C exits 130 without a traceback."""
    global _WRAPPED
    _WRAPPED = True
    _FAILURES.clear()
    try:
        task()
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("\nickd train: aborted by Ctrl-C; the last checkpoint written (if any) is kept: "
              "run the same command again to continue", file=sys.stderr)
        sys.exit(EXIT_CTRL_C)
    finally:
        _WRAPPED = False
    if _FAILURES:
        lines = [f"  #{f['num']} {' '.join(f['overrides'])}: exit {f['code']}, {f['error']} ({f['out_dir']})" for f in _FAILURES]
        print(f"ickd train: {len(_FAILURES)} multirun job(s) failed (the others ran):\n" + "\n".join(lines), file=sys.stderr)
        sys.exit(max(f["code"] for f in _FAILURES))


if __name__ == "__main__":
    from ickd.config_store import precheck_train_args

    try:  # `python -m ickd.train ...`: the same compose-time checks as `ickd train`
        precheck_train_args(sys.argv[1:])
    except IckdError as exc:
        print(f"ickd train: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    main()
