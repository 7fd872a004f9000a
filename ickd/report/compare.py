"""``ickd compare STUDY``: does tuned IC-KD beat its baselines over seeds?

Retrains each row of a comparison over N seeds and reports test top-1 as mean +- std with the
difference to KD and to matched KD and a 95% Welch t confidence interval::

    ickd compare fmnist_ickd --seeds 3 --baselines ce,kd,kd_matched,dkd     # local worker processes
    ickd compare fmnist_ickd --seeds 3 --profile a100                       # one job array; re-run when done
    ickd compare fmnist_ickd --baselines ce,kd=fmnist_kd                    # KD at its own study's best
    ickd compare fmnist_ickd --protocol best_test                           # the literature's best-epoch test top-1

Rows (every row starts from the study's ``base`` overrides):

- each baseline at its recipe: the base with its ``distill.*`` overrides removed, plus ``distill=NAME``;
  ``NAME=STUDY2`` instead takes another study's base + best params (e.g. ``kd=fmnist_kd``);
- ``kd_matched``: KD whose ``distill.kd_weight`` is the tuned IC-KD row's total distillation weight
  (kd_weight + picd_weight + nicd_weight) and whose ``distill.ce_weight`` is that row's ce_weight;
- ``ickd (default)``: the base with its ``distill.*`` overrides removed, plus ``distill=ickd``;
- ``ickd (tuned)``: the base + the study's best params (what ``ickd sweep best`` prints);
- ``ickd (random neighbours)``: tuned + ``memory.retrieval=random`` (``--no-ablation`` drops it);
- ``-o KEY=VALUE`` is appended to every row (e.g. ``-o trainer.epochs=1``).

Seeds are ``--seed-start`` (default 100) .. +N-1. They differ from the study's own seed (the ``seed``
of its base, 0 by default), so the tuned row is not scored on the seed its params were selected
with; the table says so when they overlap.

Every (row, seed) is an ordinary run folder ``<out>/<row slug>/seed-<s>/`` (default out:
``<study folder>/compare/``), planned in ``<out>/runs.json``. Resumable: a run whose result.json says
``completed`` is never retrained; any other run is started again in its folder and the trainer
resumes it from ``checkpoints/last.pt``. ``--profile P`` submits the runs that are not finished as one
job array through ``ickd.launch`` (their folders stay in ``<out>``) and returns; run ``ickd compare
STUDY`` again when the jobs are done: it builds the table from what is complete, lists the rest as
pending, and trains nothing that a live job of that launch still holds.

Numbers per run (read from metrics.jsonl): holdout top-1 at its best epoch (the selection split;
empty without ``dataset.holdout``) and test top-1 of the LAST epoch (``--protocol final``, the
honest number), or the best test top-1 over epochs (``--protocol best_test``, labelled as the
literature's protocol: it selects on the test set), or the test top-1 at the epoch the holdout picked
(``--protocol selected``). Without a holdout, ``val/top1`` is the test split.

Outputs: the table on stdout, and ``compare.md``, ``compare.json`` and ``compare.png`` in the study
folder (the study's ``ickd report`` then shows the comparison too).

Python::

    from ickd.report.compare import compare, plan_study, plan_from_rows, run_local, summarise, format_table, write_outputs
    plan = plan_study("fmnist_ickd", baselines=["ce", "kd", "kd_matched"], seeds=3)
    run_local(plan, workers=2)
    summary = summarise(plan, protocol="final")
    print(format_table(summary)); write_outputs(summary, plan.report_dir)
    # without a study: plan_from_rows([("ce", [...overrides]), ("kd", [...]), ("ickd", [...])], seeds=[0, 1], out_dir=...)
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml
from omegaconf import OmegaConf

from ickd.config_store import compose_run_config, config_dir
from ickd.engine.trainer import config_differences, format_differences
from ickd.errors import ConfigError, IckdError
from ickd.launch.jobs import ACTIVE, job_states
from ickd.launch.manifest import Launch
from ickd.launch.profiles import Profile, load_profile
from ickd.launch.submit import _chunks, _prepare, _submit
from ickd.launch.tasks import RunSpec, TrainTask
from ickd.naming import run_id, slug
from ickd.runs.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ickd.runs.rundir import RunDir
from ickd.sweep.cli import threads_per_worker
from ickd.sweep.reader import StudyReader
from ickd.sweep.studies import StudyHandle

log = logging.getLogger("ickd.compare")

PROTOCOLS = {
    "final": "test top-1 of the last epoch",
    "best_test": "best test top-1 over epochs (literature protocol: selects on the test set, optimistic)",
    "selected": "test top-1 at the epoch with the best selection-split top-1 (holdout if any, else test: then it equals best_test)",
}
PROTOCOL_METRIC = {"final": "test_final", "best_test": "test_best", "selected": "test_selected"}
CI_METHOD = "Welch t, 95%"
CONFIDENCE = 0.95
DEFAULT_BASELINES = ("ce", "kd", "kd_matched", "dkd")
DEFAULT_SEED_START = 100
# Labels of the reference rows the differences are taken to.
KD, KD_MATCHED, CE = "kd", "kd_matched", "ce"
DEFAULT_LABEL, TUNED_LABEL, ABLATION_LABEL = "ickd (default)", "ickd (tuned)", "ickd (random neighbours)"
REF_NAMES = {KD: "KD", KD_MATCHED: "kd_matched", CE: "CE"}
PLAN_FILE, SUBMITTED_FILE = "runs.json", "submitted.json"
OUTPUT_FILES = ("compare.md", "compare.json", "compare.png")


# ------------------------------------------------------------------------------------------------
# plan


@dataclass
class Row:
    """One method of the comparison: a label and the overrides of its runs (without the seed)."""

    label: str
    overrides: list[str]
    role: str = "custom"     # baseline | ickd-default | ickd-tuned | ablation | custom
    source: str = "given"    # where the overrides come from (recipe, a study's best trial, ...)
    method: str = ""         # the resolved distill.name (filled when the plan composes the row)

    @property
    def slug(self) -> str:
        return slug(self.label, 60)


@dataclass
class RunEntry:
    """One (row, seed): an ordinary run folder."""

    row: str
    seed: int
    out_dir: Path
    name: str
    overrides: list[str]  # the row's overrides + seed + name: exactly what `ickd train` receives

    def train_command(self) -> list[str]:
        """`python -m ickd.train ...` for this run (progress bars off: the output goes to a log)."""
        return [sys.executable, "-m", "ickd.train", *self.overrides, f"hydra.run.dir={_hydra_value(self.out_dir)}", "trainer.progress=off"]


@dataclass
class Plan:
    rows: list[Row]
    seeds: list[int]
    out_dir: Path
    group: str = "compare"                       # names the runs (and their W&B ids)
    study: dict[str, Any] | None = None          # name, dir, best trial, params, objective, notes
    command: str = ""                            # the command that reproduces the comparison
    notes: list[str] = field(default_factory=list)
    report_dir: Path | None = None               # where compare.md/json/png go (the study folder)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.report_dir is None:
            self.report_dir = self.out_dir
        self.report_dir = Path(self.report_dir)

    def row(self, label: str) -> Row | None:
        return next((r for r in self.rows if r.label == label), None)

    def runs(self) -> list[RunEntry]:
        """Seed-major order: an interrupted comparison has every row at its first seeds."""
        out = []
        for seed in self.seeds:
            for row in self.rows:
                name = f"{self.group}-{row.slug}-s{seed}"
                out.append(RunEntry(row.label, seed, self.out_dir / row.slug / f"seed-{seed}", name, [*row.overrides, f"seed={seed}", f"name={name}"]))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "study": self.study,
            "command": self.command,
            "seeds": list(self.seeds),
            "out_dir": str(self.out_dir),
            "notes": list(self.notes),
            "rows": [{**asdict(r), "slug": r.slug} for r in self.rows],
            "runs": [{"row": e.row, "seed": e.seed, "out_dir": str(e.out_dir), "name": e.name, "overrides": e.overrides,
                      "command": "ickd train " + " ".join(shlex.quote(o) for o in e.overrides) + f" hydra.run.dir={shlex.quote(str(e.out_dir))}"}
                     for e in self.runs()],
        }

    def save(self) -> Path:
        """Write runs.json; refuses when a row's overrides differ from the saved plan's and that row
        already has runs (e.g. the study found a new best trial): they would be mixed with the old."""
        path = self.out_dir / PLAN_FILE
        saved = _read_json(path)
        before = {r.get("label"): r.get("overrides") for r in saved.get("rows", []) if isinstance(r, dict)}
        for row in self.rows:
            old = before.get(row.label)
            started = [p for p in (self.out_dir / row.slug).glob("seed-*") if RunDir(p).config.exists() or RunDir(p).metrics.exists()]
            if old is not None and old != row.overrides and started:
                changed = sorted(set(row.overrides) ^ set(old))
                raise ConfigError(
                    f"row {row.label!r} changed since its runs in {self.out_dir / row.slug} were trained (overrides now differ in: "
                    f"{' '.join(changed)}); its old runs must not be mixed with new ones: use another --out, or delete "
                    f"{self.out_dir / row.slug} to retrain the row"
                )
        atomic_write_json(path, self.to_dict())
        return path


def _hydra_value(path: Path | str) -> str:
    """A path as a Hydra override value (quoted when Hydra's grammar needs it)."""
    text = str(path)
    if all(c.isalnum() or c in "/._-+" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").strip()


def without_distill(overrides: Iterable[str]) -> list[str]:
    """The overrides minus the distill group and its keys: a baseline's recipe is its own config."""
    return [o for o in overrides if _key(o) != "distill" and not _key(o).startswith("distill.")]


def available_methods() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "distill").glob("*.yaml"))


def _compose(label: str, overrides: list[str]):
    try:
        return compose_run_config(overrides)
    except IckdError:
        raise
    except Exception as exc:  # Hydra/OmegaConf errors name the bad group or key
        hint = ""
        if "retrieval" in str(exc):
            hint = " (this checkout has no memory.retrieval switch: pass --no-ablation)"
        raise ConfigError(f"comparison row {label!r} does not compose: {exc}{hint}. Its overrides: {' '.join(overrides)}") from exc


def _study_best(handle) -> tuple[Any, list[str]]:
    """The study's best trial and its params as overrides (without the study's base)."""
    reader = StudyReader.open(handle)
    best = reader.best()
    if best is None:
        raise ConfigError(
            f"study {reader.name!r} has no completed trial yet: run `ickd sweep run {reader.name}` (or wait for its workers), "
            "then compare"
        )
    return best, reader.overrides(best.params)[len(reader.spec.base):]


def parse_baselines(spec: str | Sequence[str]) -> list[tuple[str, str | None]]:
    """``"ce,kd=STUDY2,crd:distill.nce_k=4096"`` (or a list) -> [("ce", None), ("kd", "STUDY2"),
    ("crd:distill.nce_k=4096", None)]. ``NAME:OVERRIDE[;OVERRIDE...]`` is the recipe of ``NAME`` with
    overrides of its own (e.g. CRD's negatives on a small training set); the whole item is its label."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[tuple[str, str | None]] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if ":" in item:
            if any(n == item for n, _ in out):
                raise ConfigError(f"--baselines names {item!r} twice")
            out.append((item, None))
            continue
        name, _, study = item.partition("=")
        name, study = name.strip(), study.strip() or None
        if any(n == name for n, _ in out):
            raise ConfigError(f"--baselines names {name!r} twice")
        out.append((name, study))
    return out


def plan_rows(
    handle,
    baselines: str | Sequence[str] = DEFAULT_BASELINES,
    *,
    ablation: bool = True,
    default: bool = True,
    overrides: Sequence[str] = (),
    root: str | os.PathLike | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """The rows of a study's comparison and facts about the study (name, best trial, notes).

    ``handle``: a :class:`ickd.sweep.studies.StudyHandle` (or a study name/folder, found under ``root``).
    """
    if not isinstance(handle, StudyHandle):
        handle = StudyHandle.load(handle, root)
    extra = list(overrides)
    base = list(handle.spec.base)
    parsed = parse_baselines(baselines)
    known = available_methods()
    for name, other in parsed:  # checked before anything else: a typo should not wait for a study
        if other is None and name.partition(":")[0] not in known:
            raise ConfigError(
                f"unknown baseline {name!r}: the distill configs are {', '.join(known)} (configs/distill/*.yaml); "
                "or give NAME=STUDY to use another study's best params"
            )
    best, params = _study_best(handle)
    tuned = [*base, *params, *extra]

    tuned_cfg = _compose(TUNED_LABEL, tuned)
    dist = tuned_cfg.distill
    rows: list[Row] = []
    for name, other in parsed:
        if other is not None:
            h2 = StudyHandle.load(other, root)
            b2, p2 = _study_best(h2)
            rows.append(Row(name, [*h2.spec.base, *p2, *extra], "baseline", f"study {h2.name} best trial {b2.number}"))
        elif name == KD_MATCHED:
            if str(dist.get("name")) != "ickd":
                raise ConfigError(f"kd_matched matches IC-KD's distillation weight, but the study's tuned row is distill={dist.get('name')}")
            parts = {k: float(dist.get(k) or 0.0) for k in ("kd_weight", "picd_weight", "nicd_weight")}
            weight = sum(parts.values())
            ce = float(dist.get("ce_weight"))
            source = (f"KD at IC-KD's total distillation weight: kd_weight = {parts['kd_weight']:g} + {parts['picd_weight']:g} + "
                      f"{parts['nicd_weight']:g} = {weight:g}, ce_weight = {ce:g} (of {TUNED_LABEL})")
            rows.append(Row(name, [*without_distill(base), "distill=kd_matched", f"distill.kd_weight={weight:.10g}", f"distill.ce_weight={ce:.10g}", *extra], "baseline", source))
        else:
            method, _, own = name.partition(":")
            own_overrides = [o.strip() for o in own.split(";") if o.strip()]
            source = "recipe (configs/distill)" + (f" with {', '.join(own_overrides)}" if own_overrides else "")
            rows.append(Row(name, [*without_distill(base), f"distill={method}", *own_overrides, *extra], "baseline", source))
    if default:
        rows.append(Row(DEFAULT_LABEL, [*without_distill(base), "distill=ickd", *extra], "ickd-default", "IC-KD defaults (configs/distill/ickd.yaml)"))
    params_text = " ".join(params) or "no searched params"
    rows.append(Row(TUNED_LABEL, tuned, "ickd-tuned", f"study {handle.name} best trial {best.number}: {params_text}"))
    if ablation:
        rows.append(Row(ABLATION_LABEL, [*tuned, "memory.retrieval=random"], "ablation",
                        f"{TUNED_LABEL} with same-class/other-class neighbours drawn at random instead of retrieved"))

    objective = handle.spec.objective
    study = {
        "name": handle.name,
        "dir": str(handle.dir.resolve()),
        "objective": {"metric": objective.metric, "mode": objective.mode, "direction": objective.direction},
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": dict(best.params),
        "study_seed": int(tuned_cfg.seed),
        "holdout": _holdout_of(tuned_cfg),
    }
    return rows, study


def _holdout_of(cfg) -> Any:
    ds = cfg.get("dataset") or {}
    try:
        return ds.get("holdout")
    except Exception:
        return None


def _finish_plan(plan: Plan, compose: bool = True) -> Plan:
    labels = [r.label for r in plan.rows]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"comparison rows must have distinct labels; repeated: {', '.join(dup)}")
    slugs = [r.slug for r in plan.rows]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"comparison row labels {labels} map to the same folder names {slugs}; rename them")
    if not plan.seeds:
        raise ConfigError("a comparison needs at least one seed (--seeds N, N >= 1)")
    if len(set(plan.seeds)) != len(plan.seeds):
        raise ConfigError(f"seeds repeat: {plan.seeds}")
    if compose:  # every row must compose before anything runs
        runs = plan.runs()
        for row in plan.rows:
            cfg = _compose(row.label, [*row.overrides, f"seed={plan.seeds[0]}"])
            row.method = str(cfg.distill.get("name"))
            _check_existing_runs(row, [e for e in runs if e.row == row.label], cfg)
    return plan


def _check_existing_runs(row: Row, entries: list[RunEntry], cfg) -> None:
    """Refuse to reuse run folders trained under another config than the row's today (changed
    defaults, config files or code): their numbers would describe another method. Same rule as a
    resume (``ickd.engine.trainer.config_differences``: only run-neutral keys may differ)."""
    current = OmegaConf.to_container(cfg, resolve=True)
    for entry in entries:
        saved_file = RunDir(entry.out_dir).config
        if not saved_file.is_file():
            continue
        saved = yaml.safe_load(saved_file.read_text()) or {}
        saved = {**saved, "seed": current.get("seed")}  # the seed differs per run by design
        diffs = config_differences(saved, current)
        if diffs:
            raise ConfigError(
                f"row {row.label!r}: the run in {entry.out_dir} was trained under another config than this row composes "
                f"to now (run -> now):\n{format_differences(diffs)}\nIts numbers would describe another setting: delete "
                f"{entry.out_dir.parent} to retrain the row, or use another --out"
            )


def plan_study(
    study,
    baselines: str | Sequence[str] = DEFAULT_BASELINES,
    *,
    seeds: int = 3,
    seed_start: int = DEFAULT_SEED_START,
    ablation: bool = True,
    default: bool = True,
    overrides: Sequence[str] = (),
    out: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    command: str | None = None,
) -> Plan:
    """The comparison of a study (a name, a folder or a StudyHandle): rows, seeds and run folders."""
    handle = study if isinstance(study, StudyHandle) else StudyHandle.load(study, root)
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: need at least 1 seed (2 or more for a confidence interval)")
    rows, info = plan_rows(handle, baselines, ablation=ablation, default=default, overrides=overrides, root=root)
    seed_list = list(range(seed_start, seed_start + seeds))
    notes = []
    if info["study_seed"] in seed_list:
        notes.append(f"seed {info['study_seed']} is also the seed the study's trials ran with: the tuned row is scored on it too "
                     f"(choose --seed-start above {info['study_seed']} to avoid it)")
    if info["holdout"] in (None, 0, 0.0):
        notes.append("the study selected its best trial on the test split (no dataset.holdout): the tuned row's test numbers are "
                     "optimistically biased")
    if command is None:
        # A study given by name keeps its name (and --root); one given as a folder, its folder: the
        # printed command works when pasted.
        by_name = isinstance(study, str) and os.sep not in study and study == handle.name
        parts = ["ickd", "compare", handle.name if by_name else str(handle.dir)]
        parts += ["--root", str(root)] if by_name and root is not None else []
        parts += ["--out", str(out)] if out is not None else []
        parts += ["--seeds", str(seeds), "--seed-start", str(seed_start),
                 "--baselines", ",".join(f"{n}={s}" if s else n for n, s in parse_baselines(baselines)) or "''"]
        parts += [] if ablation else ["--no-ablation"]
        parts += [] if default else ["--no-default"]
        for o in overrides:
            parts += ["-o", o]
        command = " ".join(shlex.quote(p) if p != "''" else p for p in parts)
    plan = Plan(rows, seed_list, Path(out) if out else handle.dir / "compare", group=f"{handle.name}-cmp", study=info,
                command=command, notes=notes, report_dir=handle.dir)
    return _finish_plan(plan)


def plan_from_rows(
    rows: Sequence[Row | tuple[str, Sequence[str]]],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    *,
    group: str = "compare",
    command: str = "",
    report_dir: str | os.PathLike | None = None,
    compose: bool = True,
) -> Plan:
    """A comparison without a study: ``rows`` are (label, overrides) pairs (or Rows). The rows
    labelled ``kd``, ``kd_matched`` and ``ce`` are the references of the differences; rows whose
    distill method is ickd get verdicts."""
    built = [r if isinstance(r, Row) else Row(str(r[0]), list(r[1])) for r in rows]
    return _finish_plan(Plan(built, list(seeds), Path(out_dir), group=group, command=command, report_dir=report_dir), compose=compose)


def load_plan(out_dir: str | os.PathLike) -> Plan:
    """The plan a previous comparison saved in ``out_dir/runs.json``."""
    path = Path(out_dir) / PLAN_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"no readable comparison plan {path}: {exc}") from exc
    rows = [Row(r["label"], list(r["overrides"]), r.get("role", "custom"), r.get("source", ""), r.get("method", "")) for r in data["rows"]]
    study = data.get("study")
    return Plan(rows, list(data["seeds"]), Path(data["out_dir"]), group=data.get("group", "compare"), study=study,
                command=data.get("command", ""), notes=list(data.get("notes", [])), report_dir=Path(study["dir"]) if study else None)


# ------------------------------------------------------------------------------------------------
# reading run folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        return None
    return float(x)


def read_run(out_dir: str | os.PathLike) -> dict[str, Any]:
    """A run folder's numbers: status, holdout top-1 (best epoch), test top-1 (last epoch and best
    epoch), epochs and wall time. Metrics come from metrics.jsonl; result.json fills gaps."""
    folder = Path(out_dir)
    run = RunDir(folder)
    result = run.read_result() or {}
    history = run.read_metrics()
    has_holdout = any("holdout/top1" in m for m in history) or result.get("selection_split") == "holdout"
    # Runs without dataset.holdout have no test/top1: their val/top1 is the test split.
    test_key = "test/top1" if any("test/top1" in m for m in history) else (None if has_holdout else "val/top1")
    tests = [v for v in (_num(m.get(test_key)) for m in history) if v is not None] if test_key else []
    holdouts = [v for v in (_num(m.get("holdout/top1")) for m in history) if v is not None]
    test_final = tests[-1] if tests else _num(result.get("last_test_top1"))
    # The first epoch with the best selection-split top-1 (what picked best.pt), and its test top-1.
    selected, best_sel = None, -math.inf
    for m in history:
        sel = _num(m.get("val/top1"))
        if sel is not None and sel > best_sel and test_key and _num(m.get(test_key)) is not None:
            best_sel, selected = sel, _num(m.get(test_key))
    epoch_time = sum(v for v in (_num(m.get("time/epoch_s")) for m in history) if v is not None)
    wall = _num(result.get("wall_time_s"))
    if "resumed_from_epoch" in result or wall is None:  # a resumed run's wall time covers its last start only
        wall = max(wall or 0.0, epoch_time) or None
    status = result.get("status") or ("started" if history or run.last_checkpoint.exists() else "pending")
    return {
        "status": status,
        "completed": status == "completed",
        "test_final": test_final,
        "test_best": max(tests) if tests else _num(result.get("best_test_top1")),
        "test_selected": selected if selected is not None else _num(result.get("test_top1_at_best")),
        "holdout": max(holdouts) if holdouts else _num(result.get("best_holdout_top1")),
        "epochs": len(history),
        "wall_time_s": wall,
    }


def _submitted(out_dir: Path) -> dict[str, Any]:
    return _read_json(out_dir / SUBMITTED_FILE)


def queued_runs(plan: Plan) -> dict[str, str]:
    """Run folders that a job of an earlier ``--profile`` submission still holds (queued or running):
    folder -> "launch L, job J (STATE)". Such runs are neither retrained locally nor resubmitted."""
    submitted = _submitted(plan.out_dir)
    if not submitted:
        return {}
    held: dict[str, str] = {}
    launches: dict[str, Any] = {}
    for folder, info in submitted.items():
        if read_run(folder)["completed"]:
            continue
        ldir = info.get("launch_dir")
        if ldir not in launches:
            try:
                launch = Launch.load(ldir)
                launches[ldir] = (launch, job_states(launch))
            except IckdError:
                launches[ldir] = None
        if launches[ldir] is None:
            continue
        launch, states = launches[ldir]
        entry = next((j for j in launch.jobs if j.get("out_dir") == folder), None)
        state = states.get(str(entry.get("job_id"))) if entry else None
        if state in ACTIVE:
            held[folder] = f"launch {launch.name}, job {entry['job_id']} ({state})"
    return held


def pending_runs(plan: Plan, held: Mapping[str, str] | None = None) -> list[RunEntry]:
    """Runs that are neither completed nor held by a live job."""
    held = queued_runs(plan) if held is None else held
    return [e for e in plan.runs() if not read_run(e.out_dir)["completed"] and str(e.out_dir.resolve()) not in held]


# ------------------------------------------------------------------------------------------------
# local execution


def _run_line(entry: RunEntry, info: Mapping[str, Any]) -> str:
    parts = [f"{entry.row} seed {entry.seed}:"]
    test = info.get("test_final")
    parts.append(f"test top-1 {test:.2f}" if test is not None else "test top-1 ?")
    if info.get("holdout") is not None:
        parts.append(f"holdout {info['holdout']:.2f}")
    if info.get("wall_time_s") is not None:
        parts.append(f"{info['wall_time_s']:.0f} s")
    return " ".join(parts[:1]) + " " + ", ".join(parts[1:])


def run_local(
    plan: Plan,
    workers: int = 1,
    *,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    stop_timeout: float = 600,
) -> dict[str, int]:
    """Train the plan's unfinished runs in ``workers`` local processes (``python -m ickd.train``), each
    with ``OMP_NUM_THREADS`` = cores // workers unless the environment sets it. Completed runs are
    skipped; started ones resume from their checkpoints. Each run's output goes to
    ``<run folder>/train.log``. Returns {run folder: exit code} of the runs started here.
    Ctrl-C stops the runs (their last epoch checkpoints stay; call again to resume)."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: need at least one worker")
    held = queued_runs(plan)
    todo = pending_runs(plan, held)
    total = len(plan.runs())
    if not todo:
        return {}
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=total - len(todo) - len(held), desc="compare", unit="run",
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    say = echo or bar.write
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # N processes each using every core oversubscribe the CPU; OpenMP's spin-waiting then makes
    # small-batch training many times slower (see ickd.sweep.cli._spawn_worker).
    env.setdefault("OMP_NUM_THREADS", str(threads_per_worker(workers)))
    say(f"compare: {len(todo)} of {total} runs to train with {workers} local worker(s)" + (f", {len(held)} held by launched jobs" if held else "") + f"; run logs in {plan.out_dir}/<row>/seed-<s>/{RunDir.TRAIN_LOG}")
    queue = list(todo)
    running: list[tuple[RunEntry, subprocess.Popen]] = []
    codes: dict[str, int] = {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                entry = queue.pop(0)
                entry.out_dir.mkdir(parents=True, exist_ok=True)
                with open(RunDir(entry.out_dir).train_log, "ab") as logf:  # the child keeps its own copy of the fd
                    # Own session: a Ctrl-C reaches us once, and we stop the children ourselves.
                    proc = subprocess.Popen(entry.train_command(), stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                running.append((entry, proc))
            time.sleep(0.5)
            for entry, proc in list(running):
                code = proc.poll()
                if code is None:
                    continue
                running.remove((entry, proc))
                codes[str(entry.out_dir)] = code
                info = read_run(entry.out_dir)
                if code == 0 and info["completed"]:
                    say(_run_line(entry, info))
                else:
                    say(f"{entry.row} seed {entry.seed}: FAILED (exit {code}, status {info['status']}); log: {RunDir(entry.out_dir).train_log}")
                bar.update(1)
    except KeyboardInterrupt:
        say("\nstopping the runs (their checkpoints stay; run the same command again to resume)...")
        for _, proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in running:
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        bar.close()
    return codes


# ------------------------------------------------------------------------------------------------
# SLURM (or submitit's local executor) through ickd.launch


def submit_runs(plan: Plan, profile, *, name: str | None = None, root: str | os.PathLike | None = None):
    """Submit the plan's unfinished runs as one job array through the launch layer (manifest, code
    snapshot, preemption-safe TrainTasks), with each run's folder in the comparison folder. Returns
    the Launch, or None when nothing is left to run."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    todo = pending_runs(plan)
    if not todo:
        return None
    launch = _prepare("compare", profile, name, str(root) if root else None, shlex.split(plan.command) if plan.command else ["ickd", "compare"],
                      compare={"out_dir": str(plan.out_dir.resolve()), "study": (plan.study or {}).get("name")})
    specs = []
    for i, entry in enumerate(todo):
        folder = str(entry.out_dir.resolve())
        specs.append(RunSpec(i, entry.name, run_id(plan.group, entry.name), folder, list(entry.overrides), launch.name))
        launch.jobs.append({"index": i, "run": entry.name, "run_id": specs[-1].run_id, "wandb_run_id": specs[-1].run_id,
                            "out_dir": folder, "overrides": list(entry.overrides), "job_id": None, "attempts": []})
    packs = _chunks(specs, profile.runs_per_job)
    tasks = [TrainTask(pack, profile.threads_per_run(len(pack))) for pack in packs]
    launch.data["status"] = "submitting"
    launch.save()
    job_ids = _submit(launch, profile, tasks, launch.name)
    for pack, job_id in zip(packs, job_ids):
        for spec in pack:
            launch.jobs[spec.index]["job_id"] = job_id
            launch.jobs[spec.index]["attempts"].append(job_id)
    launch.data["status"] = "submitted"
    launch.save()
    submitted = _submitted(plan.out_dir)
    for spec in specs:
        submitted[spec.out_dir] = {"launch": launch.name, "launch_dir": str(launch.dir), "job_id": launch.jobs[spec.index]["job_id"]}
    atomic_write_json(plan.out_dir / SUBMITTED_FILE, submitted)
    return launch


# ------------------------------------------------------------------------------------------------
# statistics


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None below 2 values."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) >= 2 else None)


def welch_ci(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float] | None:
    """Difference of means ``mean(a) - mean(b)`` with its Welch t confidence interval (unequal
    variances, Welch–Satterthwaite degrees of freedom). None when either side has fewer than 2 values."""
    from scipy.stats import t as student_t

    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return None
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    diff = ma - mb
    se = math.sqrt(va + vb)
    if se == 0.0:  # both rows identical over seeds: no spread, the interval is the point
        return {"diff": diff, "lo": diff, "hi": diff, "df": float(na + nb - 2), "se": 0.0}
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = float(student_t.ppf(0.5 + confidence / 2, df)) * se
    return {"diff": diff, "lo": diff - half, "hi": diff + half, "df": df, "se": se}


def significance(ci: Mapping[str, float] | None) -> str | None:
    """"gain" (CI above 0), "worse" (below 0), "none" (includes 0), None (no CI)."""
    if ci is None:
        return None
    if ci["lo"] > 0:
        return "gain"
    if ci["hi"] < 0:
        return "worse"
    return "none"


def verdict(label: str, reference: str, diff: float | None, ci: Mapping[str, float] | None) -> str:
    """One plain-language line, e.g. "ickd (tuned) vs KD: +0.12 [-0.30, +0.54] — no significant gain (the CI includes 0)"."""
    ref = REF_NAMES.get(reference, reference)
    if diff is None:
        return f"{label} vs {ref}: n/a (a row has no finished run)"
    if ci is None:
        return f"{label} vs {ref}: {diff:+.2f}, CI n/a — needs at least 2 finished seeds in both rows"
    head = f"{label} vs {ref}: {diff:+.2f} [{ci['lo']:+.2f}, {ci['hi']:+.2f}] — "
    return head + {
        "gain": "significant gain (the CI excludes 0)",
        "worse": "significantly worse (the CI is below 0)",
        "none": "no significant gain (the CI includes 0)" if diff >= 0 else "no significant difference (the CI includes 0)",
    }[significance(ci)]


def _delta(row_values: Sequence[float], ref_values: Sequence[float] | None) -> dict[str, Any] | None:
    if ref_values is None:
        return None
    ma, mb = mean_std(row_values)[0], mean_std(ref_values)[0]
    diff = None if ma is None or mb is None else ma - mb
    ci = welch_ci(row_values, ref_values)
    return {"diff": diff, "ci": ci, "significance": significance(ci), "n": [len(row_values), len(ref_values)]}


def summarise(plan: Plan, protocol: str = "final", held: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The comparison as plain data (JSON-safe): per row the per-seed numbers of its finished runs,
    mean +- std, differences to KD and kd_matched with Welch CIs, plus verdicts and pending runs."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol!r}: choose {' or '.join(PROTOCOLS)}")
    held = queued_runs(plan) if held is None else held
    metric = PROTOCOL_METRIC[protocol]
    rows: list[dict[str, Any]] = []
    pending: list[str] = []
    values: dict[str, list[float]] = {}
    for row in plan.rows:
        runs = []
        for seed in plan.seeds:
            folder = plan.out_dir / row.slug / f"seed-{seed}"
            info = read_run(folder)
            info.update(seed=seed, out_dir=str(folder), test=info[metric])
            if not info["completed"] or info["test"] is None:
                where = held.get(str(folder.resolve()))
                pending.append(f"{row.label} seed {seed}: " + (f"queued/running in {where}" if where else info["status"]))
            runs.append(info)
        done = [r for r in runs if r["completed"] and r["test"] is not None]
        tests = [r["test"] for r in done]
        holdouts = [r["holdout"] for r in done if r["holdout"] is not None]
        walls = [r["wall_time_s"] for r in done if r["wall_time_s"] is not None]
        values[row.label] = tests
        mean, std = mean_std(tests)
        hmean, hstd = mean_std(holdouts)
        rows.append({
            "label": row.label, "slug": row.slug, "role": row.role, "method": row.method, "source": row.source,
            "overrides": list(row.overrides), "runs": runs, "n": len(done), "n_planned": len(plan.seeds),
            "test_mean": mean, "test_std": std, "holdout_mean": hmean, "holdout_std": hstd,
            "wall_time_s_mean": statistics.fmean(walls) if walls else None,
        })
    refs = {ref: (values[ref] if ref in values else None) for ref in (KD, KD_MATCHED, CE)}
    for r in rows:
        r["delta"] = {ref: (_delta(values[r["label"]], refs[ref]) if r["label"] != ref else None) for ref in (KD, KD_MATCHED)}

    verdicts: list[dict[str, Any]] = []

    def add(label: str, ref: str) -> None:
        if label not in values or ref not in values or label == ref:
            return
        d = _delta(values[label], values[ref])
        verdicts.append({"row": label, "vs": ref, "diff": d["diff"], "ci": d["ci"], "significance": d["significance"],
                         "text": verdict(label, ref, d["diff"], d["ci"])})

    ickd_rows = [r["label"] for r in rows if r["method"] == "ickd" or r["role"] in ("ickd-default", "ickd-tuned", "ablation")]
    for label in ickd_rows:
        add(label, KD)
        add(label, KD_MATCHED)
    if TUNED_LABEL in values:
        add(TUNED_LABEL, ABLATION_LABEL)  # retrieval vs random neighbours
        add(TUNED_LABEL, DEFAULT_LABEL)   # does tuning help at all
    add(KD, CE)                           # does distillation help at all (it may not on short schedules)
    summary = {
        "protocol": protocol,
        "protocol_text": PROTOCOLS[protocol],
        "ci_method": CI_METHOD,
        "confidence": CONFIDENCE,
        "study": plan.study,
        "command": plan.command,
        "seeds": list(plan.seeds),
        "out_dir": str(plan.out_dir),
        "notes": list(plan.notes),
        "rows": rows,
        "verdicts": verdicts,
        "pending": pending,
        "complete": not pending,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    summary["bottom_line"] = _bottom_line(summary)
    return summary


def _bottom_line(summary: Mapping[str, Any]) -> str:
    """The plain answer: does the (tuned) IC-KD row beat KD and matched KD?"""
    labels = [r["label"] for r in summary["rows"]]
    main = TUNED_LABEL if TUNED_LABEL in labels else next((r["label"] for r in summary["rows"] if r["method"] == "ickd"), None)
    if main is None:
        return ""
    found = {(v["row"], v["vs"]): v for v in summary["verdicts"]}
    parts = []
    for ref in (KD, KD_MATCHED):
        v = found.get((main, ref))
        if v is None or v["significance"] is None:
            continue
        parts.append({"gain": f"beats {REF_NAMES[ref]}", "none": f"does NOT significantly beat {REF_NAMES[ref]}",
                      "worse": f"is significantly WORSE than {REF_NAMES[ref]}"}[v["significance"]])
    if not parts:
        return f"Bottom line: not enough finished seeds to say whether {main} beats KD (a CI needs >= 2 seeds per row)."
    n = next(r["n"] for r in summary["rows"] if r["label"] == main)
    return f"Bottom line: {main} " + " and ".join(parts) + f" ({n} seeds, {summary['ci_method']})."


# ------------------------------------------------------------------------------------------------
# output


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} ± n/a"


def _delta_cell(d: Mapping[str, Any] | None) -> str:
    if d is None:
        return "—"
    if d["diff"] is None:
        return "n/a"
    if d["ci"] is None:
        return f"{d['diff']:+.2f} [n/a]"
    return f"{d['diff']:+.2f} [{d['ci']['lo']:+.2f}, {d['ci']['hi']:+.2f}]"


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def table_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison table as header + rows of strings (the markdown table and the HTML report
    both use it)."""
    test_head = {"final": "test top-1 mean ± std", "best_test": "test top-1 (best epoch, literature protocol) mean ± std",
                 "selected": "test top-1 (selected epoch) mean ± std"}[summary["protocol"]]
    headers = ["method", "holdout top-1", test_head, "Δ vs KD [95% CI]", "Δ vs kd_matched [95% CI]", "n", "wall time / run"]
    body = []
    for r in summary["rows"]:
        n = str(r["n"]) if r["n"] == r["n_planned"] else f"{r['n']}/{r['n_planned']}"
        body.append([r["label"], _pm(r["holdout_mean"], r["holdout_std"]), _pm(r["test_mean"], r["test_std"]),
                     _delta_cell(r["delta"].get(KD)), _delta_cell(r["delta"].get(KD_MATCHED)), n, _wall(r["wall_time_s_mean"])])
    return headers, body


def format_table(summary: Mapping[str, Any], command: bool = True) -> str:
    """The comparison as markdown: what was compared, the table (Welch t, 95%), verdicts, pending runs."""
    study = summary.get("study")
    lines = []
    if study:
        lines.append(f"Study {study['name']}: best trial {study['best_trial']} "
                     f"({study['objective']['metric']} = {study['best_value']:.4g}) retrained over seeds {_seed_text(summary['seeds'])}.")
    else:
        lines.append(f"Seeds {_seed_text(summary['seeds'])}.")
    lines.append(f"Test metric: {summary['protocol_text']}. Differences: mean of the row minus mean of the reference, "
                 f"with a {summary['ci_method']} confidence interval (n < 2: n/a). Holdout: best epoch.")
    lines.append("")
    headers, body = table_rows(summary)
    headers = [h.replace("[95% CI]", f"[{summary['ci_method']}]") for h in headers]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    for cells in body:
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if summary.get("bottom_line"):
        lines += [summary["bottom_line"], ""]
    for v in summary["verdicts"]:
        lines.append(f"- {v['text']}")
    if summary["notes"]:
        lines.append("")
        lines += [f"Note: {n}." for n in summary["notes"]]
    if summary["pending"]:
        lines += ["", f"Pending ({len(summary['pending'])} run(s), not in the numbers above):"]
        lines += [f"- {p}" for p in summary["pending"]]
    if command and summary.get("command"):
        lines += ["", "Reproduce:", "", "```", summary["command"], "```"]
    return "\n".join(lines)


def _seed_text(seeds: Sequence[int]) -> str:
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}..{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def _markdown_document(summary: Mapping[str, Any]) -> str:
    title = f"# Comparison over seeds: {summary['study']['name']}" if summary.get("study") else "# Comparison over seeds"
    rows = ["", "## Rows", ""]
    for r in summary["rows"]:
        rows.append(f"- **{r['label']}** ({r['source']}): `ickd train {' '.join(shlex.quote(o) for o in r['overrides'])} seed=S`")
    return title + "\n\n" + format_table(summary) + "\n" + "\n".join(rows) + "\n"


def plot(summary: Mapping[str, Any]) -> bytes:
    """compare.png: each row's test top-1 per seed (points) with mean ± std (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
    for i, r in enumerate(rows):
        points = [run["test"] for run in r["runs"] if run["completed"] and run["test"] is not None]
        if points:
            offsets = [(j - (len(points) - 1) / 2) * 0.08 for j in range(len(points))]
            ax.scatter([i + o for o in offsets], points, s=18, color="tab:blue", alpha=0.7, zorder=3)
        if r["test_mean"] is not None:
            ax.errorbar([i + 0.3], [r["test_mean"]], yerr=[r["test_std"] or 0.0], fmt="s", color="black", capsize=4, zorder=4)
    kd = next((r for r in rows if r["label"] == KD and r["test_mean"] is not None), None)
    if kd is not None:
        ax.axhline(kd["test_mean"], color="gray", linestyle="--", linewidth=1, label="KD mean")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["label"] for r in rows], rotation=20, ha="right", fontsize=9)
    ax.set_ylabel("test top-1 (%)")
    which = {"final": "last epoch", "best_test": "best epoch, literature protocol", "selected": "selected epoch"}[summary["protocol"]]
    ax.set_title(f"test top-1 per seed and mean ± std ({which})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(summary: Mapping[str, Any], folder: str | os.PathLike) -> dict[str, Path]:
    """compare.md, compare.json and compare.png in ``folder`` (the study folder), each written atomically."""
    folder = Path(folder)
    paths = {name: folder / name for name in OUTPUT_FILES}
    atomic_write_text(paths["compare.md"], _markdown_document(summary))
    atomic_write_json(paths["compare.json"], summary)
    atomic_write_bytes(paths["compare.png"], plot(summary))
    return paths


def compare(study, *, workers: int = 1, protocol: str = "final", write: bool = True, **plan_kwargs: Any) -> dict[str, Any]:
    """Plan a study's comparison, train what is missing locally, and return (and write) the summary."""
    plan = plan_study(study, **plan_kwargs)
    plan.save()
    run_local(plan, workers)
    summary = summarise(plan, protocol)
    if write:
        write_outputs(summary, plan.report_dir)
    return summary


# ------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ickd compare",
        description="Retrain a study's best IC-KD, the default IC-KD, a random-neighbour ablation and baselines over seeds; "
                    "report test top-1 mean ± std and the difference to KD and matched KD with a Welch t 95% CI.",
    )
    p.add_argument("study", help="study name (under --root) or study folder")
    p.add_argument("--root", default=None, help="studies folder (default $ICKD_STUDIES or ./studies)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (default 3; >= 2 for confidence intervals)")
    p.add_argument("--seed-start", type=int, default=DEFAULT_SEED_START,
                   help=f"first seed (default {DEFAULT_SEED_START}: distinct from the study's own seed)")
    p.add_argument("--baselines", default=",".join(DEFAULT_BASELINES),
                   help="comma-separated distill configs, each optionally NAME=STUDY to use that study's best params "
                        f"(default {','.join(DEFAULT_BASELINES)})")
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                   help="the random-neighbour row: tuned IC-KD with memory.retrieval=random (default on)")
    p.add_argument("--default", action=argparse.BooleanOptionalAction, default=True, help="the default IC-KD row (default on)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--profile", default=None, help="submit the unfinished runs as one job array with this resource profile and return")
    p.add_argument("--out", default=None, help="folder of the runs (default <study folder>/compare)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="final",
                   help="final: test top-1 of the last epoch (default); best_test: best test top-1 over epochs (literature "
                        "protocol); selected: test top-1 at the epoch the selection split (holdout) picked")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="extra override for every row (repeatable)")
    return p


build_parser = _parser  # the name every CLI module exposes (tests walk their help texts)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        plan = plan_study(args.study, args.baselines, seeds=args.seeds, seed_start=args.seed_start, ablation=args.ablation,
                          default=args.default, overrides=args.override, out=args.out, root=args.root)
        if args.protocol != "final":
            plan.command += f" --protocol {args.protocol}"
        if args.root:
            plan.command += f" --root {shlex.quote(str(args.root))}"
        if args.out:
            plan.command += f" --out {shlex.quote(str(args.out))}"
        plan.save()
        if args.profile:
            launch = submit_runs(plan, args.profile)
            if launch is not None:
                units = len(launch.jobs)
                ids = sorted({str(j["job_id"]) for j in launch.jobs})
                print(f"launch {launch.name}: {units} run(s) of the comparison in {len(ids)} job(s) [{', '.join(ids[:6])}{', ...' if len(ids) > 6 else ''}]")
                print(f"run folders: {plan.out_dir}; manifest: {launch.dir / 'manifest.json'}")
                print(f"next: ickd jobs status {launch.name}")
                print(f"when the jobs are done: {plan.command}   (builds the table from what is complete)")
                return
            print("every run of the comparison is finished or held by a running job; building the table")
        else:
            codes = run_local(plan, args.workers)
        summary = summarise(plan, args.protocol)
        paths = write_outputs(summary, plan.report_dir)
    except IckdError as exc:
        print(f"ickd compare: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("ickd compare: stopped; run the same command again to resume (finished runs are kept)", file=sys.stderr)
        sys.exit(130)
    print()
    print(format_table(summary))
    print(f"\nwritten: {', '.join(str(p) for p in paths.values())}")
    failed = [] if args.profile else [k for k, c in codes.items() if c != 0]
    if failed:
        print(f"{len(failed)} run(s) failed; see {RunDir.TRAIN_LOG} in: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
