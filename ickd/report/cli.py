"""`ickd report STUDY [--root DIR] [--out report.html] [--baselines DIR ...] [--wandb --project P --entity E]`."""
from __future__ import annotations

import argparse
import logging
import sys

from ickd.errors import IckdError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ickd report",
        description="Write a study's report: one self-contained HTML file (no server needed); with --wandb also a W&B report.",
    )
    parser.add_argument("study", help="study name (under --root) or study folder")
    parser.add_argument("--root", default=None, help="studies folder (default $ICKD_STUDIES or ./studies)")
    parser.add_argument("--out", default=None, help="HTML file to write (default <study folder>/report.html)")
    parser.add_argument("--baselines", nargs="+", action="extend", default=[], metavar="DIR",
                        help="CE/KD/DKD run folders of the same experiment, or folders that contain them")
    parser.add_argument("--wandb", action="store_true", help="also save a W&B report (needs an API key and the server)")
    parser.add_argument("--project", default=None, help="W&B project (default $WANDB_PROJECT or ickd)")
    parser.add_argument("--entity", default=None, help="W&B entity (default $WANDB_ENTITY or your default entity)")
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Same layer, imported here so `ickd report --help` loads neither optuna's plots nor torch.
    from ickd.report.study import StudyReader, study_summary, write_local_report

    try:
        reader = StudyReader.open(args.study, args.root)
        path = write_local_report(reader, args.out, baselines=args.baselines)
        print(f"report: {path}")
        if args.wandb:
            import os

            from ickd.report.wandb_report import publish_wandb_report

            project = args.project or os.environ.get("WANDB_PROJECT") or "ickd"
            url = publish_wandb_report(study_summary(reader), project, args.entity or os.environ.get("WANDB_ENTITY"), local_hint=str(path))
            print(f"W&B report: {url}")
    except FileNotFoundError as exc:
        print(f"ickd report: {exc}", file=sys.stderr)
        sys.exit(2)
    except IckdError as exc:
        print(f"ickd report: {exc}", file=sys.stderr)
        sys.exit(2)
