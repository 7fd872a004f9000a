"""The grid that chose IC-KD's retrieval and loss defaults (docs/method.md, "Choosing the defaults").

For each setting (Hydra overrides on top of the demo's IC-KD run), fill the teacher's bank and print
the signal diagnostics of ``ickd.distill.diagnostics`` on the same 6 training batches: similarity
statistics of the retrieved neighbours, the PICD weight spread, and each weighted term's gradient
norm on the student relative to w_kd * KD's. Needs a trained teacher (e.g. the demo's):

    .venv/bin/python bench/signal_grid.py --teacher demo-runs/<time>/teacher [--student RUN/checkpoints/best.pt] [--settings "a=b c=d" ...]

Prints one JSON line per setting and then a markdown table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from pathlib import Path

import torch

from ickd.config_store import compose_run_config
from ickd.distill import build_distiller
from ickd.distill.diagnostics import FIRST_IMPLEMENTATION, fill_bank, signal_diagnostics
from ickd.engine.run import build_data_from_config, to_container

GRID = [
    " ".join(FIRST_IMPLEMENTATION),  # the first implementation (Revision 2's measurements)
    # retrieval features
    "memory.feature_transform=none",
    "memory.feature_transform=center",
    "memory.feature_transform=center distill.tau_r=0.02",
    "memory.feature_transform=center_whiten memory.whiten_eps=0.001",
    "memory.feature_transform=center_whiten memory.whiten_eps=0.1",
    "memory.feature_transform=center_whiten distill.tau_r=0.1",
    # NICD temperature and kappa
    "distill.nicd_temperature=null",
    "distill.nicd_temperature=2",
    "distill.nicd_temperature=0.5",
    "distill.kappa=0.05",
    "distill.nicd_form=penalty",
    "distill.nicd_weight=0.4",
    "distill.nicd_weight=0.5",
    # the shipped defaults, and the ablation
    "",
    "memory.retrieval=random",
]


def measure(base: list[str], settings: list[str], student: Path | None, batches: int = 6, echo: bool = True) -> list[dict]:
    """Diagnostics of each setting (a string of overrides on top of ``base``) on the same batches,
    with the student at initialisation or loaded from ``student`` (a best.pt)."""
    rows, data = [], None
    for setting in settings:
        cfg = to_container(compose_run_config([*base, *shlex.split(setting)]))
        data = data or build_data_from_config(cfg)
        torch.manual_seed(0)
        distiller = build_distiller(cfg, data.num_classes, data.in_channels, data.num_train, torch.device("cpu"))
        if student is not None:
            distiller.student.load_state_dict(torch.load(student, map_location="cpu", weights_only=True)["model"])
        fill_bank(distiller, data)
        loader = data.train_loader(128, shuffle=True, augment=True, seed=0)
        loader.set_epoch(0)
        row = {"setting": setting or "(shipped defaults)", **signal_diagnostics(distiller, itertools.islice(iter(loader), batches))}
        if echo:
            print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher checkpoint or ickd teacher run folder")
    parser.add_argument("--student", type=Path, default=None, help="student best.pt to measure (default: the student at initialisation)")
    parser.add_argument("--experiment", default="fashion_mnist/demo")
    parser.add_argument("--settings", nargs="*", default=GRID, help="settings, each a string of Hydra overrides")
    parser.add_argument("overrides", nargs="*", help="overrides for every setting")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = [f"experiment={args.experiment}", "distill=ickd", f"teacher.checkpoint={args.teacher}", *args.overrides]
    rows = measure(base, args.settings, args.student)
    print("\nCommand: python bench/signal_grid.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])) + "\n")
    print("| setting | cos mean | row spread | weight max/min | same-class | PICD/KD grad | NICD/KD grad | cos(PICD, KD) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        g = r["grad_share"]
        print(f"| `{r['setting']}` | {r['sim_mean']:.3f} | {r['sim_row_spread']:.4f} | {r['weight_ratio']:.3g} | {r['pos_frac']:.3f} | "
              f"{g.get('picd', float('nan')):.3f} | {g.get('nicd', float('nan')):.3f} | {r['cos_picd_kd']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
