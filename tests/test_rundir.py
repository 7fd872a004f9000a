"""RunDir owns every file name of a run folder (docs/design.md, "Architecture").

The source test parses every module of ``ickd/`` with ``ast`` and fails on a string constant outside
``ickd/runs/rundir.py`` that spells one of those names (docstrings and comments aside)."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from ickd.runs.rundir import RunDir

PKG = Path(__file__).resolve().parent.parent / "ickd"
OWNER = PKG / "runs" / "rundir.py"
# Names only a run folder has. ("wandb" is also the logger's and the command's name; RunDir owns the
# folder all the same: RunDir.wandb_dir.)
FILES = {RunDir.CONFIG, RunDir.METRICS, RunDir.RESULT, RunDir.PROGRESS, RunDir.EVENTS, RunDir.JOB_LOG, RunDir.TRAIN_LOG,
         RunDir.LAST, RunDir.BEST, RunDir.WITH_BANK}
# Also plain words or keys elsewhere ("their checkpoints stay", a manifest's "wandb_run_id" field): a
# hit only as a whole constant or a path part ("checkpoints/...").
WORDS = {RunDir.CHECKPOINTS, RunDir.WANDB_RUN_ID, RunDir.WANDB_LAST_EPOCH}
TOKEN = re.compile(r"[A-Za-z0-9_.\-]+")
# Not this change's to edit (another change is rewriting ickd/distill/ now): the teacher lookup of a run
# folder (``resolve_checkpoint_path``). Replace with RunDir(p).best_checkpoint and drop the entry.
PENDING: set[tuple[str, str]] = set()  # (file, name) allowed while a change is in flight; none now


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _keys(tree: ast.AST) -> set[int]:
    """Constants used as mapping keys (dict displays, subscripts, .get/.pop/.setdefault arguments)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            ids.update(id(k) for k in node.keys if k is not None)
        elif isinstance(node, ast.Subscript):
            ids.add(id(node.slice))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop", "setdefault") and node.args:
            ids.add(id(node.args[0]))
    return ids


def spelled_names(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    skip, keys = _docstrings(tree), _keys(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
            hits = {t.strip(".") for t in TOKEN.findall(text)} & FILES
            hits |= {w for w in WORDS if (text == w and id(node) not in keys) or re.search(rf"(^|/){w}/", text)}
            found += [(node.lineno, h) for h in sorted(hits)]
    return found


def test_no_module_but_rundir_spells_a_run_folder_file_name():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path == OWNER or "_shipped" in path.parts:
            continue
        rel = str(path.relative_to(PKG.parent))
        bad += [f"{rel}:{line}: {name!r}" for line, name in spelled_names(path) if (rel, name) not in PENDING]
    assert not bad, "run-folder file names outside RunDir (use ickd.runs.rundir.RunDir):\n" + "\n".join(bad)


def test_the_names_on_disk_are_unchanged(tmp_path):
    run = RunDir(tmp_path)
    rel = {k: str(getattr(run, k).relative_to(tmp_path)) for k in (
        "config", "metrics", "result", "progress", "events", "job_log", "train_log", "checkpoints", "last_checkpoint",
        "best_checkpoint", "with_bank_checkpoint", "wandb_dir", "wandb_run_id", "wandb_last_epoch", "downloads")}
    assert rel == {
        "config": "config.yaml", "metrics": "metrics.jsonl", "result": "result.json", "progress": "progress.json",
        "events": "events.jsonl", "job_log": "job.log", "train_log": "train.log", "checkpoints": "checkpoints",
        "last_checkpoint": "checkpoints/last.pt", "best_checkpoint": "checkpoints/best.pt",
        "with_bank_checkpoint": "checkpoints/with_bank.pt", "wandb_dir": "wandb", "wandb_run_id": "wandb_run_id",
        "wandb_last_epoch": "wandb_last_epoch", "downloads": "checkpoints/wandb",
    }
    assert run.stage_log("teacher") == tmp_path / "teacher.log"


def test_reads_and_writes(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.read_result() is None and run.read_metrics() == [] and run.read_config() == {} and not run.has_started()
    run.write_result({"status": "completed", "best_top1": 1.5})
    assert run.is_completed() and json.loads(run.result.read_text())["best_top1"] == 1.5
    run.append_metrics({"epoch": 1})
    run.append_metrics({"epoch": 2})
    with open(run.metrics, "a") as f:
        f.write('{"epoch": 3')  # a line torn by a crash is skipped
    assert [m["epoch"] for m in run.read_metrics()] == [1, 2]
    run.write_metrics('{"epoch": 1}\n')
    assert run.read_metrics() == [{"epoch": 1}] and run.has_started()
    run.config.write_text("seed: 3\nstage: distill\n")
    assert run.read_config() == {"seed": 3, "stage": "distill"}
    run.append_event({"event": "start"})
    assert json.loads(run.events.read_text()) == {"event": "start"}
