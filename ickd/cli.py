"""The `ickd` command: `ickd train ...` (a Hydra app) and `ickd demo`."""
from __future__ import annotations

import sys

USAGE = """usage: ickd <command> [args]    (ickd --version, ickd <command> --help)

commands:
  train [hydra overrides]   train one run (teacher, student, any paradigm); `ickd train --help` lists config groups
  sweep <create|run|status|best|dashboard|reap> ...
                            Optuna studies (`ickd sweep --help`)
  launch <train|grid|sweep> --profile P ...
                            submit runs, grids or study workers to SLURM (or locally) and return at once
  jobs <status|logs|cancel|resubmit-failed> ...
                            monitor and manage launched jobs
  compare STUDY [--seeds N] [--baselines ce,kd,kd_matched,dkd] [--workers N | --profile P]
                            retrain a study's best IC-KD and baselines over seeds: mean +- std, Welch CIs vs KD
  report STUDY [--out FILE] [--baselines DIR ...] [--wandb]
                            a study's report: one self-contained HTML file (and a W&B report with --wandb)
  wandb sync [PATH ...] [-j N] [--dry-run]
                            upload offline W&B runs below studies, launches or run folders (skips synced ones)
  demo [--out DIR]          the main job: Fashion-MNIST teacher, then CE / KD / IC-KD students, and a comparison table
"""


def version() -> str:
    """The installed distribution's version (importlib.metadata), else the package's ``__version__``."""
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("ickd")
    except (ImportError, PackageNotFoundError):
        from ickd import __version__

        return __version__


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a bare `ickd` is a usage error (exit 2), like argparse's missing command
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if argv[0] in ("-V", "--version"):
        print(f"ickd {version()}")
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        # Compose and validate first: type errors, unknown keys/options, bad choices and override
        # grammar exit 2 with the key and the fix (Hydra alone would exit 1, or fail mid-run).
        from ickd.config_store import precheck_train_args
        from ickd.errors import ConfigError

        try:
            precheck_train_args(rest)
        except ConfigError as exc:
            print(f"ickd train: {exc}", file=sys.stderr)
            sys.exit(2)
        # Hydra parses sys.argv itself; present it as `ickd train` to keep its help text right.
        sys.argv = [f"{sys.argv[0]} train", *rest]
        from ickd.train import main as train_main

        train_main()
    elif command == "sweep":
        from ickd.sweep.cli import main as sweep_main

        sweep_main(rest)
    elif command in ("launch", "jobs"):
        from ickd.launch.cli import main as launch_cli

        launch_cli(command, rest)
    elif command == "compare":
        from ickd.report.compare import main as compare_main

        compare_main(rest)
    elif command == "report":
        from ickd.report.cli import main as report_main

        report_main(rest)
    elif command == "wandb":
        from ickd.track.sync import main as wandb_main

        wandb_main(rest)
    elif command == "demo":
        from ickd.demo import main as demo_main

        demo_main(rest)
    else:
        print(f"ickd: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
