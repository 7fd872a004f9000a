"""`ickd train` / `python -m ickd.train`: the Hydra application that trains one run."""
from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ickd.config_schema import validate_config
from ickd.config_store import config_dir, precheck_train_args, register_model_groups
from ickd.engine.interrupt import CtrlCStop
from ickd.errors import IckdError, NonFiniteLossError
from ickd.runs import slurm
from ickd.runs.exits import EXIT_CONFIG_ERROR, EXIT_CTRL_C, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NONFINITE
from ickd.runs.rundir import RunDir
from ickd.runs.signals import PreemptionGuard
from ickd.track.execute import run_training

log = logging.getLogger("ickd")

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
    run_dir = RunDir(out_dir)
    result = run_dir.result
    try:  # the trainer writes result.json itself once it started; before that (config errors) we do
        if not os.path.exists(result) or os.path.getmtime(result) < started:
            run_dir.write_result({"status": "failed", "exit_code": code, "error": _FAILURES[-1]["error"], "out_dir": out_dir})
    except OSError as write_exc:
        log.error("could not write %s: %s", result, write_exc)
    log.error("multirun job #%d failed (exit %d); the other jobs go on", hc.job.num, code)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def task(cfg: DictConfig) -> float | None:
    started = time.time()

    out_dir = HydraConfig.get().runtime.output_dir
    guard = None
    if slurm.under_scheduler():
        # Under SLURM (incl. Hydra's submitit launcher): a preemption/time-limit signal stops the run
        # after its current batch with a checkpoint; then submitit's handler, if any, requeues it.
        guard = PreemptionGuard().install()

    ctrl_c = CtrlCStop()  # the first Ctrl-C stops after the current batch with a checkpoint
    # One process only: with several ranks every interrupt poll is a collective per batch (the
    # trainer skips them when no callback can ask), and a Ctrl-C there just aborts (exit 130).
    single = int(os.environ.get("WORLD_SIZE", "1") or 1) == 1
    try:
        validate_config(cfg)  # choices, names, ranges: before any data or teacher pass (each multirun point too)
        # compose (Hydra did) -> resume artifact -> loggers -> train: the helper launches and workers use too
        callbacks = [*([ctrl_c] if single else []), *([guard] if guard else [])]
        summary = run_training(cfg, out_dir, callbacks=callbacks, context=ctrl_c if single else None)
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
    try:  # `python -m ickd.train ...`: the same compose-time checks as `ickd train`
        precheck_train_args(sys.argv[1:])
    except IckdError as exc:
        print(f"ickd train: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    main()
