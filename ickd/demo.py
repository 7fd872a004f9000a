"""`ickd demo`: the main job on real data, sized for 2 CPU cores, and the honest story of IC-KD.

Trains a small Fashion-MNIST teacher; runs a small IC-KD Optuna study selected on a holdout carved
from the training split (two local workers); then retrains, over several seeds, the study's best
IC-KD, the default IC-KD, CE, KD and KD at IC-KD's total distillation weight (kd_matched), and prints
test top-1 mean +- std with Welch 95% confidence intervals of the differences to KD and kd_matched
(``ickd compare``). The table says plainly when IC-KD does not win. Every run is an ordinary
`ickd train` run folder under one output folder.
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
from ickd.report import compare as cmp
from ickd.report.compare import format_table
from ickd.report.study import write_local_report
from ickd.resources import shipped_path
from ickd.runs.atomic import atomic_write_json, atomic_write_text
from ickd.runs.rundir import RunDir
from ickd.sweep.cli import print_status, run_workers
from ickd.sweep.reader import StudyReader
from ickd.sweep.spec import load_spec
from ickd.sweep.studies import SPEC_FILE, StudyHandle
from ickd.track.execute import run_training

STUDY_FILE = shipped_path("sweeps") / "fmnist_ickd_quick.yaml"  # the checkout's or the wheel's copy


def _train(label: str, overrides: list[str], run_dir: Path) -> dict:
    cfg = compose_run_config(overrides)
    print(f"\n[{label}] ickd train " + " ".join(shlex.quote(o) for o in overrides) + f" hydra.run.dir={run_dir}", flush=True)
    summary = run_training(cfg, run_dir)  # compose (above) -> loggers -> train, as `ickd train` does
    nan = float("nan")
    at, last = summary.get("test_top1_at_best"), summary.get("last_test_top1")
    print(f"[{label}] best {summary.get('selection_split', 'val')} top-1 {summary['best_top1']:.2f} (test top-1 there "
          f"{nan if at is None else at:.2f}), last test top-1 {nan if last is None else last:.2f}, "
          f"{summary['wall_time_s']:.0f} s", flush=True)
    return summary


def _study(out: Path, teacher: Path, overrides: list[str], trials: int, workers: int) -> tuple[dict | None, dict]:
    """A small IC-KD study; returns the best trial's params (None if no trial completed) and info."""
    spec = load_spec(STUDY_FILE, name="demo", n_trials=trials)
    spec.base = [*spec.base, f"teacher.checkpoint={teacher}", *overrides]
    existing = out / "studies" / spec.name / SPEC_FILE
    if existing.is_file():  # a re-run continues the study (workers stop at its budget)
        handle = StudyHandle.load(existing.parent)
        print(f"\n[study] continuing {handle.dir}", flush=True)
    else:
        handle = StudyHandle.create(spec, out / "studies")
    print(f"\n[study] ickd sweep create {STUDY_FILE.relative_to(STUDY_FILE.parent.parent)} --name demo --trials {trials} "
          f"-o teacher.checkpoint={teacher} --root {out / 'studies'} && ickd sweep run demo --workers {workers} --root {out / 'studies'}", flush=True)
    start = time.perf_counter()
    codes = run_workers(handle, workers)
    wall = time.perf_counter() - start
    print_status(handle)
    reader = StudyReader(handle)
    info = {"wall_time_s": wall, "states": reader.counts(), "worker_exit_codes": codes, "folder": str(handle.dir)}
    best = reader.best()
    if best is None:
        return None, info
    info.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    return best.params, info


def _plot_curves(summary: dict, path: Path) -> bool:
    """Test top-1 per epoch, mean over seeds, one line per compared row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in summary["rows"]:
        curves = []
        for run in row["runs"]:
            metrics = RunDir(run["out_dir"]).metrics
            if metrics.is_file():
                lines = [json.loads(x) for x in metrics.read_text().splitlines()]
                curves.append([m.get("test/top1", m.get("val/top1")) for m in lines])
        curves = [c for c in curves if c and None not in c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        ax.plot(range(1, n + 1), mean, marker="o", label=f"{row['label']} (n={len(curves)})")
    ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%), mean over seeds")
    ax.set_title("ickd demo: Fashion-MNIST")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_story(
    out: Path,
    experiment: str,
    overrides: list[str],
    *,
    study_trials: int = 4,
    study_workers: int = 2,
    seeds: int = 2,
    seed_start: int = 100,
    workers: int = 2,
    baselines: str = "ce,kd,kd_matched",
    ablation: bool = False,
) -> dict:
    """Teacher -> holdout-selected IC-KD study -> ``ickd compare`` over ``seeds`` seeds.

    ``experiment`` is the teacher's experiment config (the study file names its own, the demo's);
    ``overrides`` go to every run and trial. Shared by ``ickd demo`` and ``bench/validity.py``.
    Returns {"teacher", "study", "compare", "total_wall_time_s", ...}; writes the teacher run,
    ``studies/demo/`` and its ``compare/`` folder under ``out``.
    """
    start = time.perf_counter()
    base = [f"experiment={experiment}", *overrides]
    teacher_dir = out / "teacher"
    teacher_result = RunDir(teacher_dir).result
    if teacher_result.is_file() and json.loads(teacher_result.read_text()).get("status") == "completed":
        teacher = json.loads(teacher_result.read_text())
        print(f"[teacher] already trained: {teacher_dir}", flush=True)
    else:
        teacher = _train("teacher", [*base, "stage=teacher"], teacher_dir)
    params, study_info = _study(out, teacher_dir, overrides, study_trials, study_workers)
    if params is None:
        raise SystemExit(f"the study finished no trial; see {study_info['folder']}/workers/*.log")
    plan = cmp.plan_study(
        Path(study_info["folder"]), baselines, seeds=seeds, seed_start=seed_start, ablation=ablation, default=True,
    )
    print(f"\n[compare] {plan.command}  ({len(plan.runs())} runs, {workers} workers)", flush=True)
    codes = cmp.run_local(plan, workers)
    summary = cmp.summarise(plan)
    paths = cmp.write_outputs(summary, plan.report_dir)
    failed = [folder for folder, code in codes.items() if code != 0]
    return {"teacher": teacher, "study": study_info, "compare": summary, "compare_files": {k: str(v) for k, v in paths.items()},
            "failed_runs": failed, "total_wall_time_s": time.perf_counter() - start}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ickd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default demo-runs/<time>)")
    parser.add_argument("--experiment", default="fashion_mnist/demo", help="experiment config the runs start from")
    parser.add_argument("--study-trials", type=int, default=4, help="trials of the IC-KD study")
    parser.add_argument("--study-workers", type=int, default=2, help="local workers of the IC-KD study (default 2)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per compared row (>= 2 for a confidence interval)")
    parser.add_argument("--workers", type=int, default=2, help="local processes training the compared runs")
    parser.add_argument("--baselines", default="ce,kd,kd_matched", help="baseline rows (ickd compare --baselines)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run and trial, e.g. trainer.epochs=2")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.study_trials < 1:
        parser.error("--study-trials must be >= 1: the tuned IC-KD row comes from the study")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ickd").setLevel(logging.INFO)  # one line per epoch
    out = (args.out or Path("demo-runs") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = [f"experiment={args.experiment}", *args.overrides]

    teacher_cfg = compose_run_config([*base, "stage=teacher"])
    ds = teacher_cfg.dataset
    print(
        f"ickd demo: real Fashion-MNIST, {ds.train_subset or 'all'} training images (class-balanced subset), a "
        f"{ds.holdout}-image holdout carved from the training split for model selection, and "
        f"{ds.val_subset or 'all 10000'} test images for reporting; {teacher_cfg.trainer.epochs} epochs per run: a short CPU "
        f"schedule, not the paper's recipe. A {args.study_trials}-trial IC-KD study selects on the holdout; then each "
        f"row is retrained over {args.seeds} seeds. Output: {out}",
        flush=True,
    )
    story = run_story(out, args.experiment, args.overrides, study_trials=args.study_trials, study_workers=args.study_workers, seeds=args.seeds,
                      workers=args.workers, baselines=args.baselines)
    table = format_table(story["compare"])
    student = compose_run_config(base).student
    print(f"\nFashion-MNIST, student {student.name} {dict(student.kwargs) or ''}, total {story['total_wall_time_s']:.0f} s:\n")
    print(table)
    info = story["study"]
    print(f"\nstudy: {info['states']} in {info['wall_time_s']:.0f} s, folder {info['folder']}")
    atomic_write_text(out / "summary.md", table + "\n")
    atomic_write_json(out / "summary.json", story)
    if _plot_curves(story["compare"], out / "curves.png"):
        print(f"\nlearning curves: {out / 'curves.png'}")
    _report(out, info["folder"])
    if story["failed_runs"]:
        print(f"\n{len(story['failed_runs'])} run(s) failed: " + ", ".join(story["failed_runs"]) + f" (see their {RunDir.TRAIN_LOG})")
        raise SystemExit(1)
    return story


BASELINE_ROWS = ("ce", "kd", "kd_matched", "dkd")


def _report(out: Path, study_dir: str) -> None:
    """The study's HTML report: the comparison over seeds (compare.json in the study folder), and the
    compared baseline runs (``<study>/compare/<row>/seed-*``) next to the best trial."""
    compared = Path(study_dir) / "compare"
    baselines = [compared / row for row in BASELINE_ROWS if (compared / row).is_dir()]
    try:
        path = write_local_report(study_dir, out / "report.html", baselines=baselines)
    except Exception as exc:  # the demo's results are on disk already; a report bug must not hide them
        print(f"\nstudy report failed: {type(exc).__name__}: {exc}")
        return
    print(f"\nstudy report: {path} (open it in a browser; `ickd report {study_dir}` rewrites it)")


if __name__ == "__main__":
    main()
