"""`ickd sweep create | run | status | best | dashboard | reap`."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from ickd.cli_args import add_global
from ickd.errors import ConfigError, IckdError
from ickd.engine.progress import format_duration
from ickd.sweep.progress import FINISHED, study_eta_of, trial_eta
from ickd.sweep.reader import best_trial, trial_counts
from ickd.sweep.reaper import reap
from ickd.sweep.space import params_to_overrides
from ickd.sweep.spec import load_spec
from ickd.sweep.storage import dashboard_storage
from ickd.sweep.studies import StudyHandle

log = logging.getLogger("ickd.sweep")


def cmd_create(args: argparse.Namespace) -> None:
    spec = load_spec(args.file, name=args.name, storage=args.storage, n_trials=args.trials)
    if args.override:
        spec.base = [*spec.base, *args.override]
    spec.check_composes()  # base + the space's bounds/choices compose and validate before any trial runs
    handle = StudyHandle.create(spec, args.root, exist_ok=args.exist_ok)
    print(f"study {spec.name!r} created in {handle.dir} (storage: {handle.storage_label}), {spec.n_trials} trials")
    print(f"next: ickd sweep run {shlex.quote(spec.name)} --workers 2" + (f" --root {shlex.quote(str(args.root))}" if args.root else ""))


def threads_per_worker(workers: int) -> int:
    """OpenMP threads for each of ``workers`` local training processes: this process's usable
    cores, shared out (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


def _spawn_worker(handle: StudyHandle, index: int, workers: int) -> subprocess.Popen:
    logs = handle.dir / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ickd.sweep.worker", str(handle.dir), "--index", str(index)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Share the cores: N workers each using every core oversubscribe the CPU, and OpenMP's
    # spin-waiting then makes small-batch training many times slower (measured here, 2 workers on 2
    # cores: the first epoch of a demo trial took 91 s with 2 threads each, 13 s with 1).
    env.setdefault("OMP_NUM_THREADS", str(threads_per_worker(workers)))
    # Each worker in its own session so a Ctrl-C here is handled once, by us, not twice.
    with open(logs / f"worker-{index}.log", "ab") as out:  # the child keeps its own copy of the fd
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _print_reaped(reaped: list[dict], retry: bool = True) -> None:
    for r in reaped:
        if r["retry"] is not None:
            print(f"trial {r['number']}: {r['reason']}; retried as trial {r['retry']}")
        else:
            print(f"trial {r['number']}: {r['reason']}" + ("" if retry else "; not retried"))


def run_workers(handle: StudyHandle, workers: int, stop_timeout: float = 600) -> list[int]:
    """Reap what a previous run left, start ``workers`` local worker processes and wait for them,
    with a progress bar; Ctrl-C stops them after their current epoch. Returns their exit codes."""
    study = handle.study()
    reaped = reap(study, float(handle.spec.heartbeat.get("grace_s", 120)), int(handle.spec.retry.get("max_retries", 0)), suspend_grace_s=handle.spec.heartbeat.get("suspend_grace_s"))
    _print_reaped(reaped)
    print(f"study {handle.name}: {handle.spec.n_trials} trials, {workers} local workers, logs in {handle.dir / 'workers'}", flush=True)
    procs = [_spawn_worker(handle, i, workers) for i in range(workers)]
    from tqdm.auto import tqdm

    bar = tqdm(total=handle.spec.n_trials, desc=handle.name, unit="trial", disable=not sys.stderr.isatty())
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(2)
            counts = trial_counts(study)
            bar.n = counts["COMPLETE"] + counts["PRUNED"]
            bar.set_postfix(running=counts["RUNNING"], failed=counts["FAIL"])
            bar.refresh()
    except KeyboardInterrupt:
        print("\nstopping workers after their current epoch (checkpoints kept; `ickd sweep run` resumes)...")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                p.kill()
    finally:
        bar.close()
    return [p.wait() for p in procs]


def check_run_args(args: argparse.Namespace) -> None:
    """CLI values of `sweep run`, checked before anything is read or written (a bad --trials once
    saved into study.yaml would make the study unloadable)."""
    for option, value, minimum in (("--workers", args.workers, 1), ("--trials", args.trials, 1), ("--stop-timeout", args.stop_timeout, 0)):
        if value is not None and value < minimum:
            raise ConfigError(f"sweep run {option} must be >= {minimum}, got {value}; e.g. `ickd sweep run {shlex.quote(str(args.study))} --workers 2 --trials 20{f' --root {shlex.quote(str(args.root))}' if getattr(args, 'root', None) else ''}`")


def cmd_run(args: argparse.Namespace) -> None:
    check_run_args(args)
    handle = StudyHandle.load(args.study, args.root)
    if args.trials is not None and args.trials != handle.spec.n_trials:
        handle.spec.n_trials = args.trials
        handle.save_spec()
    codes = run_workers(handle, args.workers, args.stop_timeout)
    print_status(handle)
    from ickd.sweep.worker import failure_summary, stopped_for_failures

    study = handle.study()
    first = stopped_for_failures(study, handle.spec)
    if first is not None:  # exit 1 = trials failed; exit 2 stays for errors in the user's input
        print(f"\n{failure_summary(study, handle.spec, first)}; worker logs in {handle.dir / 'workers'}", file=sys.stderr)
        sys.exit(1)
    if any(codes):
        print(f"workers exited with codes {codes}; see {handle.dir / 'workers'}", file=sys.stderr)
        sys.exit(1)


def print_status(handle: StudyHandle) -> None:
    study = handle.study()
    counts = trial_counts(study)
    shown = {k: v for k, v in counts.items() if v}
    print(f"\nstudy {handle.name} ({handle.storage_label}): " + ", ".join(f"{k.lower()} {v}" for k, v in shown.items()) + f" of {handle.spec.n_trials}")
    finished = counts["COMPLETE"] + counts["PRUNED"]
    if finished:
        print(f"pruned fraction: {counts['PRUNED'] / finished:.2f}")
    best = best_trial(study)
    if best is not None:
        print(f"best: trial {best.number}, {handle.spec.objective.metric} = {best.value:.4f}, " + " ".join(params_to_overrides(best.params)))
    all_trials = study.get_trials(deepcopy=False)
    eta, how = study_eta_of(all_trials, handle.spec.n_trials)
    print(f"eta: {'done' if eta == 0 else format_duration(eta) if eta is not None else 'unknown'} ({how})")
    keys = list(handle.spec.space)
    print("\n| trial | state | value | " + " | ".join(keys) + " | epochs | eta | worker |")
    print("|---" * (len(keys) + 6) + "|")
    now = time.time()
    for t in all_trials:
        if t.user_attrs.get("skipped"):
            continue
        value = f"{t.value:.4f}" if t.value is not None else (f"({max(t.intermediate_values.values()):.2f})" if t.intermediate_values else "")
        worker = ""
        if t.state == TrialState.RUNNING:
            beat = t.user_attrs.get("heartbeat_at")
            worker = f"{t.user_attrs.get('worker_host', '?')}:{t.user_attrs.get('worker_pid', '?')}" + (f", beat {now - beat:.0f}s ago" if beat else "")
        elif t.state == TrialState.FAIL:
            worker = str(t.user_attrs.get("fail_reason", ""))[:60]
        elif t.user_attrs.get("duplicate_of") is not None:  # not trained: same params as that trial
            worker = f"duplicate of trial {t.user_attrs['duplicate_of']}"
        params = " | ".join(str(t.params.get(k, "")) for k in keys)
        left = "done" if t.state in FINISHED else format_duration(trial_eta(t)) if t.state == TrialState.RUNNING else ""
        print(f"| {t.number} | {t.state.name.lower()} | {value} | {params} | {len(t.intermediate_values)} | {left} | {worker} |")


def cmd_status(args: argparse.Namespace) -> None:
    print_status(StudyHandle.load(args.study, args.root))


def cmd_best(args: argparse.Namespace) -> None:
    handle = StudyHandle.load(args.study, args.root)
    best = best_trial(handle.study())
    if best is None:
        print(f"study {handle.name} has no completed trial yet; see `ickd sweep status {handle.name}`", file=sys.stderr)
        sys.exit(1)
    overrides = [*handle.spec.base, *params_to_overrides(best.params)]
    print(f"best trial {best.number}: {handle.spec.objective.metric} = {best.value:.4f} ({handle.spec.objective.mode}, {handle.spec.objective.direction})")
    for key, value in best.params.items():
        print(f"  {key} = {value}")
    print(f"run folder: {best.user_attrs.get('run_dir')}")
    print("reproduce:\n  ickd train " + " ".join(shlex.quote(o) for o in overrides))


def cmd_dashboard(args: argparse.Namespace) -> None:
    handle = StudyHandle.load(args.study, args.root)
    from optuna_dashboard import run_server

    print(f"optuna-dashboard for {handle.name} on http://{args.host}:{args.port}/ (Ctrl-C stops it)")
    run_server(dashboard_storage(handle.spec.storage, handle.dir), host=args.host, port=args.port)


def cmd_reap(args: argparse.Namespace) -> None:
    handle = StudyHandle.load(args.study, args.root)
    grace = args.grace if args.grace is not None else float(handle.spec.heartbeat.get("grace_s", 120))
    reaped = reap(handle.study(), grace, int(handle.spec.retry.get("max_retries", 0)), retry=not args.no_retry, suspend_grace_s=handle.spec.heartbeat.get("suspend_grace_s"))
    if not reaped:
        print("no trial with a lost worker")
    _print_reaped(reaped, retry=not args.no_retry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ickd sweep", description="Optuna studies of ickd runs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{create,run,status,best,dashboard,reap}")
    p = sub.add_parser("create", help="create a study from a study file (sweeps/*.yaml)")
    p.add_argument("file", help="study file, or the name of a shipped study (e.g. synthetic_smoke, fmnist_ickd_quick; they ship with the package)")
    p.add_argument("--name", help="study name (default: the study file's `name:`)")
    p.add_argument("--storage", help="journal (default) or an SQLAlchemy URL without password, e.g. postgresql+psycopg2://user@host/db")
    p.add_argument("--trials", type=int, help="trial budget (default: the study file's n_trials)")
    p.add_argument("--override", "-o", action="append", default=[], help="extra base override, e.g. -o teacher.checkpoint=PATH (repeatable)")
    p.add_argument("--exist-ok", action="store_true", help="continue a study of that name if it exists (its study.yaml is rewritten from this file) instead of failing")
    p.set_defaults(func=cmd_create)
    p = sub.add_parser("run", help="run local workers until the budget is used up")
    p.add_argument("study", help="study name (under --root) or study folder")
    p.add_argument("--workers", type=int, default=1, help="local worker processes, each training one trial at a time (default 1)")
    p.add_argument("--trials", type=int, help="total trial budget (updates the study)")
    p.add_argument("--stop-timeout", type=float, default=600, help="seconds to wait for workers after Ctrl-C")
    p.set_defaults(func=cmd_run)
    for name, func, text in (("status", cmd_status, "trials by state, best so far"), ("best", cmd_best, "best params and the command that reproduces them")):
        p = sub.add_parser(name, help=text)
        p.add_argument("study", help="study name (under --root) or study folder")
        p.set_defaults(func=func)
    p = sub.add_parser("dashboard", help="optuna-dashboard for the study")
    p.add_argument("study", help="study name (under --root) or study folder")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    p.set_defaults(func=cmd_dashboard)
    p = sub.add_parser("reap", help="fail (and retry) trials whose worker is gone")
    p.add_argument("study", help="study name (under --root) or study folder")
    p.add_argument("--no-retry", action="store_true", help="fail the lost trials without enqueuing retries")
    p.add_argument("--grace", type=float, default=None, help="seconds without heartbeat before a worker counts as gone")
    p.set_defaults(func=cmd_reap)
    # Global option: before or after the verb (`ickd sweep --root X create F` or `ickd sweep create F --root X`).
    add_global(parser, sub, "--root", default=None, help="studies folder (default $ICKD_STUDIES or ./studies)")
    return parser


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        args.func(args)
    except IckdError as exc:
        print(f"ickd sweep: {exc}", file=sys.stderr)
        sys.exit(2)
