"""`ickd demo`: the main job on real data, sized for 2 CPU cores.

Trains a small Fashion-MNIST teacher, then distils the same small student three ways (CE, KD,
IC-KD) and prints a comparison table. Every stage is an ordinary `ickd train` run (its command is
printed) under one output folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from datetime import datetime
from pathlib import Path

from ickd.config_store import compose_run_config
from ickd.engine import train
from ickd.engine.checkpoint import atomic_write_json, atomic_write_text

STUDENT_RUNS = [("CE", "distill=ce"), ("KD", "distill=kd"), ("IC-KD", "distill=ickd")]


def _table(rows: list[dict]) -> str:
    lines = ["| run | best top-1 | last top-1 | wall time |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['best_top1']:.2f} | {r['last_top1']:.2f} | {r['wall_time_s']:.0f} s |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        metrics = [json.loads(x) for x in (Path(r["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
        ax.plot([m["epoch"] for m in metrics], [m["val/top1"] for m in metrics], marker="o", label=r["run"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("ickd demo: Fashion-MNIST")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="ickd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default demo-runs/<time>)")
    parser.add_argument("--experiment", default="fashion_mnist/demo", help="experiment config the runs start from")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. trainer.epochs=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ickd").setLevel(logging.INFO)  # one line per epoch
    out = args.out or Path("demo-runs") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    base = [f"experiment={args.experiment}", *args.overrides]
    start = time.perf_counter()

    teacher_cfg = compose_run_config([*base, "stage=teacher"])
    ds = teacher_cfg.dataset
    print(
        f"ickd demo: real Fashion-MNIST, {ds.train_subset or 'all'} training images (class-balanced subset) and "
        f"{ds.val_subset or 'all 10000'} test images, {teacher_cfg.trainer.epochs} epochs per run: a short CPU "
        "schedule, not the paper's recipe. Output: " + str(out),
        flush=True,
    )
    stages = [("teacher", [*base, "stage=teacher"], out / "teacher")]
    for label, override in STUDENT_RUNS:
        stages.append((label, [*base, override, f"teacher.checkpoint={out / 'teacher'}"], out / label.lower().replace("-", "")))

    rows = []
    for label, overrides, run_dir in stages:
        cfg = compose_run_config(overrides)
        command = "ickd train " + " ".join(shlex.quote(o) for o in overrides) + f" hydra.run.dir={run_dir}"
        print(f"\n[{label}] {command}", flush=True)
        summary = train(cfg, run_dir)
        rows.append({"run": label if label != "teacher" else f"teacher ({cfg.model.name if cfg.get('model') else cfg.teacher.name})", **summary})
        print(f"[{label}] best top-1 {summary['best_top1']:.2f}, last {summary['last_top1']:.2f}, {summary['wall_time_s']:.0f} s", flush=True)

    table = _table(rows)
    total = time.perf_counter() - start
    student = compose_run_config(base).student
    print(f"\nFashion-MNIST test top-1 (student {student.name} {dict(student.kwargs) or ''}), total {total:.0f} s:\n")
    print(table)
    atomic_write_text(out / "summary.md", table + "\n")
    atomic_write_json(out / "summary.json", {"rows": rows, "total_wall_time_s": total})
    if _plot(rows, out / "curves.png"):
        print(f"\nlearning curves: {out / 'curves.png'}")
    return rows


if __name__ == "__main__":
    main()
