"""Study reports: the local HTML report rendered by a real headless Chromium (plotly runs, every
figure draws), studies without completed trials, secrets, the `ickd report` command, and the W&B
report built offline. Only `Report.save()` (the network call to a W&B server) is not exercised:
no W&B server can run here; the test of `publish_wandb_report` stops at the missing API key."""
from __future__ import annotations

import json
import os
import re
from html import escape as html_escape
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from ickd.sweep.spec import load_spec
from ickd.sweep.studies import StudyHandle
from ickd.sweep.worker import run_worker
from ickd.report.study import FIGURES, study_summary, write_local_report
from ickd.report.wandb_report import WandbReportError, build_wandb_report, publish_wandb_report, wandb_report_spec
from tests.helpers import REPO, compose_config

SMOKE = REPO / "sweeps" / "synthetic_smoke.yaml"


def chromium() -> str:
    """The headless browser, or skip (fail under CI) with the command that installs it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    reason = "chromium is not installed: `apt-get install chromium` (Debian) renders the report in the tests"
    if os.environ.get("CI"):
        pytest.fail(f"CI must render the report: {reason}")
    pytest.skip(reason)


def browse(html: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'profile'}", *args, html.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def figure_chunks(dom: str) -> dict[str, str]:
    """Figure id -> the DOM between its container's start and the next figure's (or the section end)."""
    out = {}
    for fid in FIGURES:
        start = dom.index(f'<div class="figure" id="{fid}"')
        end = min([i for i in (dom.find('<div class="figure"', start + 1), dom.find("</section>", start)) if i != -1])
        out[fid] = dom[start:end]
    return out


def make_study(tmp: Path, teacher_dir: Path | None, name: str, n_trials: int, **changes) -> StudyHandle:
    """The shipped smoke study; without a teacher its trials cannot run (enough for reports of no trial)."""
    spec = yaml.safe_load(SMOKE.read_text())
    teacher_dir = teacher_dir or tmp / "no-teacher"
    spec["base"] = [*spec["base"], "paradigm=offline", f"teacher.checkpoint={teacher_dir}"]
    spec.update(changes)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return StudyHandle.create(load_spec(path, name=name, n_trials=n_trials), tmp / "studies")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_dir):
    """A real 3-trial study (space: memory.k x distill.picd_weight) and CE/KD baseline runs of the
    same experiment, all on the synthetic dataset."""
    from ickd.engine import train

    tmp = tmp_path_factory.mktemp("report")
    handle = make_study(tmp, teacher_dir, "rep", 3)
    run_worker(str(handle.dir))
    for method in ("ce", "kd"):
        # The study's split (synthetic_smoke.yaml: dataset.holdout=64), so the runs are comparable.
        summary = train(compose_config(f"distill={method}", "paradigm=offline", f"teacher.checkpoint={teacher_dir}", "dataset.holdout=64"),
                        tmp / "baselines" / method)
        assert summary["status"] == "completed"
    return handle, tmp


@pytest.mark.slow
def test_report_renders_every_figure_in_headless_chromium(finished, tmp_path):
    handle, tmp = finished
    trials = handle.study().get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert len({(t.params["memory.k"], t.params["distill.picd_weight"]) for t in trials}) == 3
    out = write_local_report(handle.name, tmp_path / "report.html", root=tmp / "studies", baselines=[tmp / "baselines"])
    html = out.read_text()
    # Self-contained: plotly.js embedded exactly once, nothing fetched from anywhere.
    from plotly.offline import get_plotlyjs

    assert html.count(get_plotlyjs()[:300]) == 1
    page = html.replace(get_plotlyjs(), "")  # plotly.js itself names CDN URLs (for map data we never draw)
    assert not re.search(r"<script[^>]+src=", page) and "cdn.plot.ly" not in page and "https://" not in page
    assert 'class="note"' not in html.split('<section id="baselines"')[0]  # every figure drew

    dom = browse(out, tmp_path, "--dump-dom", "--virtual-time-budget=15000")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for fid, chunk in figure_chunks(dom.stdout).items():
        assert 'class="main-svg"' in chunk, f"{fid} did not render a plot"
    # Parallel coordinates and slices show both searched parameters; curves one line per trial.
    chunks = figure_chunks(dom.stdout)
    for fid in ("fig-parallel", "fig-slice", "fig-importance"):
        assert "memory.k" in chunks[fid] and "distill.picd_weight" in chunks[fid], fid
    assert len(re.findall(r'class="trace scatter', chunks["fig-curves"])) == 3

    # Summary, best, reproduce command, trials and baselines tables.
    best = handle.study().best_trial
    assert f"Best: trial {best.number}" in html
    assert f"memory.k={best.params['memory.k']}" in html.split('id="reproduce"')[1].split("</pre>")[0]
    trials_table = html.split('id="trials-table"')[1].split("</table>")[0]
    assert trials_table.count("<tr") == 4  # header + 3 trials
    # Holdout (the objective) and test side by side, from each trial's run folder.
    assert "<th>holdout top-1</th>" in trials_table and "<th>test top-1 (selected epoch)</th>" in trials_table
    for t in handle.study().get_trials(deepcopy=False):
        result = json.loads((Path(t.user_attrs["run_dir"]) / "result.json").read_text())
        assert t.value == result["best_holdout_top1"]
        cells = next(c for c in (re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr.*?</tr>", trials_table)) if c and c[0] == str(t.number))
        assert f"{result['best_holdout_top1']:.4g}" in cells and f"{result['test_top1_at_best']:.4g}" in cells
    baselines = html.split('id="baselines-table"')[1].split("</table>")[0]
    rows = re.findall(r"<tr.*?</tr>", baselines)[1:]
    assert [re.findall(r"<td[^>]*>(.*?)</td>", r)[:3] for r in rows] == [["ickd", "study best", "holdout"], ["ce", "baseline", "holdout"], ["kd", "baseline", "holdout"]]
    assert all("same setup" in r for r in rows)

    shot = tmp_path / "report.png"
    proc = browse(out, tmp_path, "--window-size=1400,4000", f"--screenshot={shot}", "--virtual-time-budget=15000")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    assert shot.stat().st_size > 50_000
    from PIL import Image

    with Image.open(shot) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 500  # charts, not a blank or single-colour page


@pytest.mark.slow
def test_wandb_report_from_a_real_study_summary(finished):
    handle, _ = finished
    summary = study_summary(handle)
    report = build_wandb_report(summary, project="ickd-test", entity="team")
    grid = report.blocks[-1]
    columns = [c.metric.name for c in grid.panels[0].columns]
    # Objective best holdout/top1: the run summary's holdout/best_top1 (the running best the trainer logs).
    assert columns == [*handle.spec.space, "holdout/best_top1"] and set(handle.spec.space) == {"memory.k", "distill.picd_weight"}
    best = summary["best"]
    assert f"trial {best['number']}" in report.blocks[1].text and "complete 3" in report.blocks[1].text


@pytest.mark.slow
def test_demo_writes_the_study_report_with_its_runs_as_baselines(finished, tmp_path, capsys):
    from ickd.demo import _report

    handle, tmp = finished
    compared = tmp_path / "compare"  # the demo's layout: <study>/compare/<row>/seed-<s>/
    for name in ("ce", "kd"):
        (compared / name).mkdir(parents=True)
        (compared / name / "seed-100").symlink_to(tmp / "baselines" / name)
    link = handle.dir / "compare"
    link.symlink_to(compared)
    try:
        _report(tmp_path, str(handle.dir))
    finally:
        link.unlink()  # the study fixture is shared with other tests
    assert f"study report: {tmp_path / 'report.html'}" in capsys.readouterr().out
    baselines = (tmp_path / "report.html").read_text().split('id="baselines-table"')[1].split("</table>")[0]
    assert [re.findall(r"<td[^>]*>(.*?)</td>", r)[0] for r in re.findall(r"<tr.*?</tr>", baselines)[1:]] == ["ickd", "ce", "kd"]


def test_study_without_completed_trials_renders_notes(tmp_path):
    # Every trial fails at once (memory.k beyond the bank): failed trials only, no value anywhere.
    handle = make_study(tmp_path, None, "failing", 2, space={"memory.k": "choice(600, 700)"},
                        sampler={"name": "random", "seed": 0}, retry={"max_retries": 0, "max_failures": 1})
    run_worker(str(handle.dir))
    assert [t.state for t in handle.study().get_trials()] == [TrialState.FAIL]
    html = write_local_report(handle.dir, tmp_path / "failing.html").read_text()
    for fid in FIGURES:
        chunk = html.split(f'id="{fid}"')[1].split('<div class="figure"')[0]
        assert 'class="note"' in chunk and "no completed trial yet (fail 1)" in chunk and "plotly-graph-div" not in chunk
    assert 'id="no-best"' in html
    assert "memory.k" in html.split('id="trials-table"')[1] and "state-fail" in html  # the failed trial is listed ...
    reason = handle.study().get_trials()[0].user_attrs["fail_reason"]
    assert reason and html_escape(reason[:40]) in html  # ... with its (escaped) failure reason

    # A study with no trial at all: notes too, and a browser still renders the page.
    empty = make_study(tmp_path, None, "empty", 2)
    out = write_local_report(empty.dir, tmp_path / "empty.html")
    assert "The study has no trials yet" in out.read_text()
    dom = browse(out, tmp_path, "--dump-dom", "--virtual-time-budget=5000")
    body = dom.stdout.split("<body>")[1]  # the head holds plotly.js, whose source names main-svg
    assert dom.returncode == 0 and 'id="fig-history"' in body and "main-svg" not in body


@pytest.mark.slow
def test_importances_note_when_only_one_trial_completed(tmp_path, teacher_dir):
    handle = make_study(tmp_path, teacher_dir, "one", 1)
    run_worker(str(handle.dir))
    html = write_local_report(handle.dir, tmp_path / "one.html").read_text()
    chunk = html.split('id="fig-importance"')[1].split('<div class="figure"')[0]
    assert "need at least 2 completed trials; the study has 1" in chunk
    assert "plotly-graph-div" in html.split('id="fig-history"')[1].split('<div class="figure"')[0]


def test_storage_password_never_reaches_the_html(tmp_path):
    handle = make_study(tmp_path, None, "secret", 2)
    assert handle.storage is not None  # the real (journal) storage stays open; only the URL shown changes
    handle.spec.storage = "postgresql+psycopg2://alice:hunter2secret@db.example:5432/optuna?password=hunter2secret"
    html = write_local_report(handle, tmp_path / "secret.html").read_text()
    assert "hunter2secret" not in html
    assert "postgresql+psycopg2://alice:***@db.example:5432/optuna" in html


def ickd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ickd.cli", *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


@pytest.mark.slow
def test_cli_errors_clearly_for_a_missing_study_or_baseline(tmp_path):
    proc = ickd("report", "nope", "--root", str(tmp_path / "studies"))
    assert proc.returncode == 2
    assert "no study 'nope'" in proc.stderr and "ickd sweep create" in proc.stderr
    make_study(tmp_path, None, "cli", 2)
    proc = ickd("report", "cli", "--root", str(tmp_path / "studies"), "--baselines", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "--baselines" in proc.stderr and "no such folder" in proc.stderr
    proc = ickd("report", "cli", "--root", str(tmp_path / "studies"), "--out", str(tmp_path / "r.html"))
    assert proc.returncode == 0 and proc.stdout.strip() == f"report: {tmp_path / 'r.html'}"
    assert (tmp_path / "r.html").stat().st_size > 1_000_000  # plotly.js inside


def no_wandb_key_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc, no wandb settings
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


@pytest.mark.slow
def test_wandb_publish_without_api_key_fails_clearly_and_keeps_the_local_report(tmp_path, monkeypatch):
    make_study(tmp_path, None, "wb", 2)
    env = no_wandb_key_env(tmp_path)
    out = tmp_path / "wb.html"
    proc = ickd("report", "wb", "--root", str(tmp_path / "studies"), "--out", str(out), "--wandb", "--project", "p", env=env)
    assert proc.returncode == 2
    assert "no W&B API key: run `wandb login` or set WANDB_API_KEY" in proc.stderr
    assert f"the local report is ickd report wb --out {out}" in proc.stderr
    assert out.is_file() and f"report: {out}" in proc.stdout
    # In-process too: the check happens before any network request.
    for key in [k for k in os.environ if k.startswith("WANDB_")] + ["NETRC"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", env["HOME"])
    with pytest.raises(WandbReportError, match="no W&B API key"):
        publish_wandb_report(SUMMARY, "p")


SUMMARY = {
    "name": "s1",
    "objective": {"metric": "val/top1", "mode": "best", "direction": "maximize"},
    "n_trials": 4,
    "space": {"memory.size": "choice(1024, 4096)", "memory.k": "choice(4, 8)", "distill.picd_weight": "interval(0.1, 2.0)"},
    "counts": {"COMPLETE": 3, "FAIL": 1},
    "median": 41.5,
    "best": {"number": 2, "value": 45.25, "params": {"memory.size": 4096, "memory.k": 8, "distill.picd_weight": 0.7},
             "command": "ickd train distill=ickd memory.k=8", "run_dir": "/runs/t2", "run_id": "x"},
}


def test_wandb_report_spec_and_offline_build():
    from wandb_workspaces import expr
    import wandb_workspaces.reports.v2 as wr

    spec = wandb_report_spec(SUMMARY, project="proj", entity="team")
    assert [b["type"] for b in spec["blocks"]] == ["H1", "MarkdownBlock", "PanelGrid"]
    md = spec["blocks"][1]["text"]
    assert "trial 2" in md and "45.25" in md and "complete 3, fail 1" in md and "| `memory.k` | 8 |" in md
    grid = spec["blocks"][2]
    assert grid["runsets"][0]["filters"] == "Metric('Group') == 's1'"
    # Objective "best val/top1": the run summary's val/best_top1 (the running best, logged each epoch).
    assert grid["panels"][0]["columns"][-1] == {"summary": "val/best_top1"}
    assert [c["config"] for c in grid["panels"][0]["columns"][:-1]] == list(SUMMARY["space"])
    assert spec_with(objective={"metric": "val/loss", "mode": "last", "direction": "minimize"})["blocks"][2]["panels"][1]["with_respect_to"] == "val/loss"
    # The default objective (best holdout/top1) and best test/top1 map to the running bests the trainer logs.
    assert spec_with(objective={"metric": "holdout/top1", "mode": "best", "direction": "maximize"})["blocks"][2]["panels"][1]["with_respect_to"] == "holdout/best_top1"
    assert spec_with(objective={"metric": "test/top1", "mode": "best", "direction": "maximize"})["blocks"][2]["panels"][1]["with_respect_to"] == "test/best_top1"

    report = build_wandb_report(SUMMARY, project="proj", entity="team", group="other-group")
    assert isinstance(report, wr.Report) and report.project == "proj" and report.entity == "team"
    h1, md_block, panel_grid = report.blocks
    assert isinstance(md_block, wr.MarkdownBlock) and "45.25" in md_block.text
    (runset,) = panel_grid.runsets
    parsed = expr.expr_to_filters(runset.filters)  # W&B's own parser: run attribute group == study
    assert (parsed.key.section, parsed.key.name, parsed.op, parsed.value) == ("run", "group", "=", "other-group")
    pc, imp, line, scatter = panel_grid.panels
    assert isinstance(pc, wr.ParallelCoordinatesPlot)
    assert [type(c.metric).__name__ for c in pc.columns] == ["Config", "Config", "Config", "SummaryMetric"]
    assert [c.metric.name for c in pc.columns] == ["memory.size", "memory.k", "distill.picd_weight", "val/best_top1"]
    assert isinstance(imp, wr.ParameterImportancePlot) and imp.with_respect_to == "val/best_top1"
    assert isinstance(line, wr.LinePlot) and line.x == "epoch" and line.y == ["val/top1"] and line.groupby == "group"
    assert isinstance(scatter, wr.ScatterPlot) and scatter.x == wr.Config("memory.size") and scatter.y == wr.SummaryMetric("val/best_top1")
    # No completed trial yet: still a report, with the note.
    empty = build_wandb_report({**SUMMARY, "best": None, "median": None, "counts": {"RUNNING": 1}}, project="proj", entity=None)
    assert "No completed trial yet" in empty.blocks[1].text and len(empty.blocks[2].panels) == 4


def spec_with(**changes) -> dict:
    return wandb_report_spec({**SUMMARY, **changes}, project="p", entity=None)


def test_runs_with_and_without_holdout_show_holdout_and_test_side_by_side(tmp_path):
    """split_numbers/baseline rows on hand-written run folders: a holdout run, and an old run from
    before holdouts existed (val/top1 was the test split; no test/* keys) that must still render."""
    from ickd.report.study import _baselines_html, baseline_rows, split_numbers

    new, old = tmp_path / "new", tmp_path / "old"
    for folder, holdout in ((new, 64), (old, None)):
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump({"dataset": {"name": "synthetic", "holdout": holdout}, "distill": {"name": "kd"}}))
    history = [
        {"epoch": 1, "val/top1": 50.0, "holdout/top1": 50.0, "test/top1": 48.0},
        {"epoch": 2, "val/top1": 60.0, "holdout/top1": 60.0, "test/top1": 55.0},
        {"epoch": 3, "val/top1": 60.0, "holdout/top1": 60.0, "test/top1": 57.0},  # a tie: the first epoch stays selected
    ]
    (new / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    (new / "result.json").write_text(json.dumps({"best_top1": 60.0, "last_top1": 60.0, "selection_split": "holdout", "epochs_completed": 3}))
    (old / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "val/top1": v}) + "\n" for e, v in ((1, 40.0), (2, 45.0))))
    (old / "result.json").write_text(json.dumps({"best_top1": 45.0, "last_top1": 45.0, "epochs_completed": 2}))
    assert split_numbers(new) == {"selection": "holdout", "holdout_top1": 60.0, "test_top1": 55.0, "best_test_top1": 57.0}
    assert split_numbers(old) == {"selection": "test", "holdout_top1": None, "test_top1": 45.0, "best_test_top1": 45.0}
    (old / "metrics.jsonl").unlink()  # result.json alone (no per-epoch file) is enough too
    assert split_numbers(old) == {"selection": "test", "holdout_top1": None, "test_top1": 45.0, "best_test_top1": 45.0}
    rows = baseline_rows([old], str(new))
    assert rows[1]["differs"] == ["dataset.holdout=None"]  # selected on another split: flagged
    html = _baselines_html(rows, searched=True)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr.*?</tr>", html)[1:]]
    assert cells[0][:7] == ["kd", "study best", "holdout", "60", "55", "57", "60"]
    assert cells[1][:8] == ["kd", "baseline", "test", "", "45", "45", "45", "-10.00"]
