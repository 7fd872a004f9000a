"""`ickd demo`: the main job on real data, sized for 2 CPU cores.

Trains a small Fashion-MNIST teacher; distils the same small student with CE, KD and IC-KD (default
settings); runs a small Optuna study of IC-KD (a few trials, two local workers); retrains IC-KD with
the study's best parameters; prints a comparison table. Every run is an ordinary `ickd train` run
(its command is printed) under one output folder.
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
STUDY_FILE = Path(__file__).resolve().parent.parent / "sweeps" / "fmnist_ickd_quick.yaml"


def _table(rows: list[dict]) -> str:
    # best_top1 is the selection split (the demo's holdout); the test columns are what to report.
    lines = ["| run | best holdout top-1 | test top-1 at that epoch | last test top-1 | wall time |", "|---|---|---|---|---|"]

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    for r in rows:
        lines.append(f"| {r['run']} | {fmt(r['best_top1'])} | {fmt(r.get('test_top1_at_best'))} | {fmt(r.get('last_test_top1'))} | {r['wall_time_s']:.0f} s |")
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
        ax.plot([m["epoch"] for m in metrics], [m.get("test/top1", m.get("val/top1")) for m in metrics], marker="o", label=r["run"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("ickd demo: Fashion-MNIST")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _train(label: str, overrides: list[str], run_dir: Path) -> dict:
    cfg = compose_run_config(overrides)
    print(f"\n[{label}] ickd train " + " ".join(shlex.quote(o) for o in overrides) + f" hydra.run.dir={run_dir}", flush=True)
    summary = train(cfg, run_dir)
    nan = float("nan")
    at, last = summary.get("test_top1_at_best"), summary.get("last_test_top1")
    print(f"[{label}] best {summary.get('selection_split', 'val')} top-1 {summary['best_top1']:.2f} (test top-1 there "
          f"{nan if at is None else at:.2f}), last test top-1 {nan if last is None else last:.2f}, "
          f"{summary['wall_time_s']:.0f} s", flush=True)
    return summary


def _study(out: Path, teacher: Path, overrides: list[str], trials: int, workers: int) -> tuple[dict | None, dict]:
    """A small IC-KD study; returns the best trial's params (None if no trial completed) and info."""
    from ickd.sweep.cli import best_trial, print_status, run_workers, trial_counts
    from ickd.sweep.spec import load_spec
    from ickd.sweep.studies import StudyHandle

    spec = load_spec(STUDY_FILE, name="demo", n_trials=trials)
    spec.base = [*spec.base, f"teacher.checkpoint={teacher}", *overrides]
    handle = StudyHandle.create(spec, out / "studies")
    print(f"\n[study] ickd sweep create {STUDY_FILE.relative_to(STUDY_FILE.parent.parent)} --name demo --trials {trials} "
          f"-o teacher.checkpoint={teacher} --root {out / 'studies'} && ickd sweep run demo --workers {workers} --root {out / 'studies'}", flush=True)
    start = time.perf_counter()
    codes = run_workers(handle, workers)
    wall = time.perf_counter() - start
    print_status(handle)
    study = handle.study()
    states = {name: n for name, n in trial_counts(study).items() if n}
    info = {"wall_time_s": wall, "states": states, "worker_exit_codes": codes, "folder": str(handle.dir)}
    best = best_trial(study)
    if best is None:
        return None, info
    info.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    return best.params, info


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="ickd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default demo-runs/<time>)")
    parser.add_argument("--experiment", default="fashion_mnist/demo", help="experiment config the runs start from")
    parser.add_argument("--study-trials", type=int, default=4, help="trials of the IC-KD study (0 skips it)")
    parser.add_argument("--study-workers", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run and trial, e.g. trainer.epochs=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ickd").setLevel(logging.INFO)  # one line per epoch
    out = (args.out or Path("demo-runs") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = [f"experiment={args.experiment}", *args.overrides]
    start = time.perf_counter()

    teacher_cfg = compose_run_config([*base, "stage=teacher"])
    ds = teacher_cfg.dataset
    print(
        f"ickd demo: real Fashion-MNIST, {ds.train_subset or 'all'} training images (class-balanced subset) and "
        f"{ds.val_subset or 'all 10000'} test images, {teacher_cfg.trainer.epochs} epochs per run: a short CPU "
        f"schedule, not the paper's recipe; then a {args.study_trials}-trial IC-KD study. Output: {out}",
        flush=True,
    )
    teacher_dir = out / "teacher"
    summary = _train("teacher", [*base, "stage=teacher"], teacher_dir)
    rows = [{"run": f"teacher ({teacher_cfg.teacher.name})", **summary}]
    for label, override in STUDENT_RUNS:
        run_dir = out / label.lower().replace("-", "")
        rows.append({"run": label, **_train(label, [*base, override, f"teacher.checkpoint={teacher_dir}"], run_dir)})

    study_info: dict = {}
    if args.study_trials > 0:
        from ickd.sweep.space import params_to_overrides

        params, study_info = _study(out, teacher_dir, args.overrides, args.study_trials, args.study_workers)
        if params is not None:
            tuned = params_to_overrides(params)
            label = "IC-KD (study best)"
            summary = _train(label, [*base, "distill=ickd", f"teacher.checkpoint={teacher_dir}", *tuned], out / "ickd_tuned")
            rows.append({"run": f"{label}: " + ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}" for k, v in params.items()), **summary})

    table = _table(rows)
    total = time.perf_counter() - start
    student = compose_run_config(base).student
    print(f"\nFashion-MNIST test top-1 (student {student.name} {dict(student.kwargs) or ''}), total {total:.0f} s:\n")
    print(table)
    if study_info:
        print(f"\nstudy: {study_info['states']} in {study_info['wall_time_s']:.0f} s, folder {study_info['folder']}")
    atomic_write_text(out / "summary.md", table + "\n")
    atomic_write_json(out / "summary.json", {"rows": rows, "study": study_info, "total_wall_time_s": total})
    if _plot(rows, out / "curves.png"):
        print(f"\nlearning curves: {out / 'curves.png'}")
    if study_info:
        _report(out, study_info["folder"])
    return rows


def _report(out: Path, study_dir: str) -> None:
    """The study's HTML report, with the demo's CE/KD/IC-KD (default) runs as baselines."""
    from ickd.track.report import write_local_report

    baselines = [out / name for name in ("ce", "kd", "ickd") if (out / name / "result.json").is_file()]
    try:
        path = write_local_report(study_dir, out / "report.html", baselines=baselines)
    except Exception as exc:  # the demo's results are on disk already; a report bug must not hide them
        print(f"\nstudy report failed: {type(exc).__name__}: {exc}")
        return
    print(f"\nstudy report: {path} (open it in a browser; `ickd report {study_dir} --baselines ...` rewrites it)")


if __name__ == "__main__":
    main()
