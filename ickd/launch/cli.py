"""`ickd launch train|grid|sweep` and `ickd jobs status|logs|cancel|resubmit-failed`."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time

from ickd.cli_args import add_global, require
from ickd.errors import IckdError
from ickd.launch.jobs import cancel, failed_entries, log_paths, print_status
from ickd.launch.manifest import Launch, all_launches, find_job
from ickd.launch.profiles import load_profile
from ickd.launch.submit import launch_runs, launch_sweep, resubmit


def build_launch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ickd launch", description="submit to SLURM (or the local executor) and return at once")
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{train,grid,sweep}")
    for kind, text in (("train", "one training run"), ("grid", "one job array over a grid (a=1,2 b=x,y)")):
        p = sub.add_parser(kind, help=text)
        p.add_argument("--dry-run", action="store_true", help="compose and list the runs, submit nothing")
        p.add_argument("overrides", nargs="*", help="Hydra overrides, as for `ickd train`")
    p = sub.add_parser("sweep", help="a job array of study workers; they stop when the study's budget is used up")
    p.add_argument("study", help="study name or folder (`ickd sweep create` first)")
    p.add_argument("--workers", type=int, required=True, help="worker processes (array tasks) to start; each trains one trial at a time")
    # Global options: before or after the verb (`ickd launch --profile local train ...` or `... train --profile local`).
    add_global(parser, sub, "--profile", required=True, help="resource profile: a YAML file or a name in slurm/profiles (e.g. local, a100); required")
    add_global(parser, sub, "--name", default=None, help="launch name (default: <kind>-<date>-<time>-<rand>)")
    add_global(parser, sub, "--root", default=None, help="where launches live (default: $ICKD_LAUNCHES or ./launches)")
    add_global(parser, sub, "--studies-root", default=None, only=("sweep",), help="where studies live (default: $ICKD_STUDIES or ./studies)")
    return parser


def launch_main(argv: list[str]) -> None:
    parser = build_launch_parser()
    args = parser.parse_args(argv)
    require(parser, args, "profile", "--profile")
    profile = load_profile(args.profile)
    if args.kind == "sweep":
        launch = launch_sweep(args.study, args.workers, profile, args.name, args.root, args.studies_root)
    else:
        launch = launch_runs(args.kind, args.overrides, profile, args.name, args.root, dry_run=args.dry_run)
        if args.dry_run:
            return
    ids = sorted({str(j["job_id"]) for j in launch.jobs})
    units = sum(len(j["workers"]) for j in launch.jobs) if launch.kind == "sweep" else len(launch.jobs)
    print(f"launch {launch.name}: {units} {'worker' if launch.kind == 'sweep' else 'run'}(s) in {len(ids)} job(s) "
          f"[{', '.join(ids[:6])}{', ...' if len(ids) > 6 else ''}] on profile {profile.name}")
    print(f"manifest: {launch.dir / 'manifest.json'}")
    root = f" --root {shlex.quote(str(args.root))}" if args.root else ""
    print(f"next: ickd jobs status {launch.name}{root}")


def build_jobs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ickd jobs", description="monitor and manage launched jobs (reads the launch manifests)")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{status,logs,cancel,resubmit-failed}")
    p = sub.add_parser("status", help="every job of a launch (or a summary of all launches)")
    p.add_argument("launch", nargs="?", help="launch name (default: a one-line summary of every launch)")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="refresh until every job ended")
    p = sub.add_parser("logs", help="a job's stdout/stderr")
    p.add_argument("job", help="job id as shown by status (e.g. 123_4)")
    p.add_argument("--tail", type=int, default=60, help="last N lines of each file (0: all)")
    p = sub.add_parser("cancel", help="scancel a launch's jobs")
    p.add_argument("launch", help="launch name, as printed by `ickd launch` and `ickd jobs status`")
    p.add_argument("--job", action="append", default=None, help="only these job ids (repeatable)")
    p = sub.add_parser("resubmit-failed", help="resubmit jobs that ended without finishing their run; runs resume from checkpoints")
    p.add_argument("launch", help="launch name, as printed by `ickd launch` and `ickd jobs status`")
    p.add_argument("--profile", default=None, help="another resource profile for the resubmission (default: the launch's)")
    # Global option: before or after the verb (`ickd jobs --root X status L` or `ickd jobs status L --root X`).
    add_global(parser, sub, "--root", default=None, help="where launches live (default: $ICKD_LAUNCHES or ./launches)")
    return parser


def jobs_main(argv: list[str]) -> None:
    parser = build_jobs_parser()
    args = parser.parse_args(argv)

    if args.cmd == "status":
        if not args.launch:
            launches = all_launches(args.root)
            if not launches:
                print("no launches yet (`ickd launch ...` creates them)")
            for launch in launches:
                created = time.strftime("%Y-%m-%d %H:%M", time.localtime(launch.data.get("created", 0)))
                print(f"{launch.name:40s} {launch.kind:6s} {len(launch.jobs):4d} entries  {created}")
            return
        launch = Launch.load(args.launch, args.root)
        while True:
            print_status(launch)
            from ickd.launch.jobs import ACTIVE, job_states

            if args.watch is None or not any(s in ACTIVE for s in job_states(launch).values()):
                break
            time.sleep(args.watch)
            print()
    elif args.cmd == "logs":
        launch, _ = find_job(args.job, args.root)
        paths = log_paths(launch, args.job)
        if not paths:
            print(f"no log files for job {args.job} yet in {launch.submitit_dir} (pending jobs have none)")
        for path in paths:
            lines = path.read_text(errors="replace").splitlines()
            print(f"==> {path} <==")
            print("\n".join(lines[-args.tail:] if args.tail else lines))
    elif args.cmd == "cancel":
        launch = Launch.load(args.launch, args.root)
        done = cancel(launch, args.job)
        print(f"cancelled {len(done)} job(s): {', '.join(done)}")
    elif args.cmd == "resubmit-failed":
        launch = Launch.load(args.launch, args.root)
        entries = failed_entries(launch)
        if not entries:
            print(f"launch {launch.name}: no failed job to resubmit")
            return
        profile = load_profile(args.profile or launch.data["profile"]["source"])
        ids = resubmit(launch, entries, profile)
        print(f"resubmitted {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} as job(s) {', '.join(ids)}; they resume from their checkpoints")


def build_parser(command: str = "launch") -> argparse.ArgumentParser:
    """The argparse parser of ``ickd launch`` (or of ``ickd jobs``)."""
    return build_launch_parser() if command == "launch" else build_jobs_parser()


def main(command: str, argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        (launch_main if command == "launch" else jobs_main)(argv)
    except IckdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
