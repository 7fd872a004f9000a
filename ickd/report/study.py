"""A study report as one self-contained HTML file (plotly.js embedded once; no server, no network).

``write_local_report(study, out_path)`` gathers the study's summary (``study_summary``, plain data
that the W&B report builder reuses), Optuna's plotly visualisations, learning curves from the trials'
metrics.jsonl, a table of trials and a table comparing the best trial with baseline runs (CE/KD/DKD
run folders). Everything that cannot be drawn (no completed trial, importances on constant
parameters) becomes a note in its figure's container instead of an error.
"""
from __future__ import annotations

import html
import json
import logging
import os
import shlex
import statistics
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import optuna  # noqa: F401  (the reports read Optuna studies)
from optuna.trial import TrialState

from ickd.report.compare import table_rows
from ickd.runs.atomic import atomic_write_text
from ickd.runs.rundir import RunDir
from ickd.sweep.reader import StudyReader
from ickd.sweep.studies import StudyHandle

log = logging.getLogger("ickd.track")

# Figure containers, in page order: id -> heading. Tests and users address them by these ids.
FIGURES = {
    "fig-history": "Optimisation history",
    "fig-parallel": "Parallel coordinates: searched parameters vs objective",
    "fig-importance": "Parameter importances",
    "fig-slice": "Objective vs each parameter",
    "fig-curves": "Learning curves of the top trials",
}
TOP_CURVES = 5
# Config keys that must agree for a baseline to be "the same experiment" as the study's best trial.
SETUP_KEYS = ("dataset.name", "dataset.holdout", "student.name", "teacher.name", "trainer.epochs")


# ------------------------------------------------------------------------------------------------
# data


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _select(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node




def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def split_numbers(run_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Holdout and test top-1 of a run, side by side: ``selection`` (the split that picked its best
    epoch), ``holdout_top1`` (best holdout top-1), ``test_top1`` (test top-1 at the selected epoch:
    the honest number), ``best_test_top1`` (max over epochs: the literature's protocol).

    From metrics.jsonl (there while a run trains), else result.json. Runs from before holdouts
    existed logged the test split as ``val/top1`` only: they count as selected on test.
    """
    out: dict[str, Any] = {"selection": None, "holdout_top1": None, "test_top1": None, "best_test_top1": None}
    if not run_dir:
        return out
    history = RunDir(run_dir).read_metrics()
    if history:
        test_key = "test/top1" if any("test/top1" in m for m in history) else "val/top1"  # old runs: val was test
        best, at = -1.0, None
        for m in history:
            top1 = _number(m.get("val/top1"))
            if top1 is not None and top1 > best:
                best, at = top1, _number(m.get(test_key))
        holdout = [v for v in (_number(m.get("holdout/top1")) for m in history) if v is not None]
        tests = [v for v in (_number(m.get(test_key)) for m in history) if v is not None]
        out.update(selection="holdout" if holdout else "test", holdout_top1=max(holdout) if holdout else None,
                   test_top1=at, best_test_top1=max(tests) if tests else None)
        return out
    result = RunDir(run_dir).read_result()
    if result:
        old = "selection_split" not in result
        out.update(
            selection=result.get("selection_split", "test"),
            holdout_top1=_number(result.get("best_holdout_top1")),
            test_top1=_number(result.get("best_top1") if old else result.get("test_top1_at_best")),
            best_test_top1=_number(result.get("best_top1") if old else result.get("best_test_top1")),
        )
    return out


def study_summary(study: StudyReader | StudyHandle | str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The study's facts as plain data (JSON-safe): the local and the W&B report both start here."""
    reader = StudyReader.open(study, root)
    spec = reader.spec
    complete = [t for t in reader.trials() if t.state == TrialState.COMPLETE and t.value is not None]
    best = reader.best()
    summary: dict[str, Any] = {
        "name": spec.name,
        "folder": str(reader.folder),
        "storage": reader.storage_label,  # redacted: never a password
        "objective": {"metric": spec.objective.metric, "mode": spec.objective.mode, "direction": spec.objective.direction},
        "n_trials": spec.n_trials,
        "space": dict(spec.raw_space),
        "base": list(spec.base),
        "counts": reader.counts(),  # the same numbers `ickd sweep status` prints
        "n_complete": len(complete),
        "median": statistics.median(t.value for t in complete) if complete else None,
        "best": None,
    }
    if best is not None:
        overrides = reader.overrides(best.params)
        summary["best"] = {
            "number": best.number,
            "value": best.value,
            "params": dict(best.params),
            "run_dir": best.user_attrs.get("run_dir"),
            "run_id": best.user_attrs.get("run_id"),
            "command": "ickd train " + " ".join(shlex.quote(o) for o in overrides),
            **split_numbers(best.user_attrs.get("run_dir")),
        }
    return summary


def trial_rows(reader: StudyReader) -> list[dict[str, Any]]:
    rows = []
    for t in reader.trials():
        run_dir = t.user_attrs.get("run_dir")
        epochs = len(RunDir(run_dir).read_metrics()) if run_dir else 0
        rows.append({
            "number": t.number,
            "state": t.state.name.lower(),
            "params": dict(t.params),
            "value": t.value,
            "epochs": epochs or len(t.intermediate_values),
            "run_dir": run_dir,
            "note": str(t.user_attrs.get("fail_reason", "")),
            "retry_of": t.user_attrs.get("retry_of"),
            **split_numbers(run_dir),
        })
    return rows


def discover_baselines(paths: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Run folders among ``paths``: each path is a run folder (a config and a result) or a folder
    whose direct children are run folders. Raises FileNotFoundError for a path that is neither."""
    skip = {Path(p).resolve() for p in exclude}
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if _is_run_dir(path):
            candidates = [path]
        elif path.is_dir():
            candidates = sorted(p for p in path.iterdir() if _is_run_dir(p))
            if not candidates:
                raise FileNotFoundError(
                    f"--baselines {path}: no run folder there (a run folder holds {RunDir.CONFIG} and {RunDir.RESULT}); "
                    "pass run folders or the folder that contains them"
                )
        else:
            raise FileNotFoundError(f"--baselines {path}: no such folder; pass run folders of `ickd train` or the folder that contains them")
        for c in candidates:
            if c.resolve() not in skip and c.resolve() not in {f.resolve() for f in found}:
                found.append(c)
    return found


def _is_run_dir(path: Path) -> bool:
    run = RunDir(path)
    return run.config.is_file() and run.result.is_file()


def baseline_rows(run_dirs: Iterable[Path], best_run_dir: str | None) -> list[dict[str, Any]]:
    """The study's best trial first, then each baseline, with the setup keys that differ from it."""
    reference = RunDir(best_run_dir).read_config() if best_run_dir else {}
    rows = []
    if best_run_dir:
        result = RunDir(best_run_dir).read_result() or {}
        rows.append(_run_row("study best", Path(best_run_dir), reference, result, reference))
    for run_dir in run_dirs:
        run = RunDir(run_dir)
        rows.append(_run_row("baseline", run_dir, run.read_config(), run.read_result() or {}, reference))
    return rows


def _run_row(role: str, run_dir: Path, config: Mapping, result: Mapping, reference: Mapping) -> dict[str, Any]:
    differs = [k for k in SETUP_KEYS if reference and _select(config, k) != _select(reference, k)]
    return {
        "role": role,
        # A teacher run's config still carries the default distill group: its stage says what it is.
        "method": "teacher (ce)" if _select(config, "stage") == "teacher" else (_select(config, "distill.name") or "?"),
        "run_dir": str(run_dir),
        "best_top1": result.get("best_top1"),
        "last_top1": result.get("last_top1"),
        **split_numbers(run_dir),
        "epochs": result.get("epochs_completed"),
        "differs": [f"{k}={_select(config, k)}" for k in differs],
    }


# ------------------------------------------------------------------------------------------------
# figures


def _quiet(fn, *args, **kwargs):
    """The figure, or a note saying why it could not be drawn: a report never fails on one figure."""
    # Optuna's visualisations warn (ExperimentalWarning, "no completed trials"): the report says so itself.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            log.warning("report: %s failed: %s", fn.__name__, exc)
            return f"{fn.__name__} could not draw this study: {type(exc).__name__}: {exc}"


def _figures(reader: StudyReader, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Figure id -> plotly Figure, or a str: the note shown instead."""
    import plotly.graph_objects as go
    from optuna import visualization as vis

    study = reader.study()
    metric = summary["objective"]["metric"]
    complete = [t for t in reader.trials() if t.state == TrialState.COMPLETE and t.value is not None]
    # Only parameters some completed trial has (Optuna raises for unknown ones, e.g. after a space edit).
    params = [p for p in reader.spec.space if any(p in t.params for t in complete)]
    out: dict[str, Any] = {}
    none = f"no completed trial yet ({_state_text(summary['counts'])}): nothing to plot"
    if not complete:
        return {fid: none for fid in FIGURES}
    target_name = f"{metric} ({summary['objective']['mode']})"
    out["fig-history"] = _quiet(vis.plot_optimization_history, study, target_name=target_name)
    out["fig-parallel"] = _quiet(vis.plot_parallel_coordinate, study, params=params, target_name=target_name)
    varying = [p for p in params if len({repr(t.params.get(p)) for t in complete}) > 1]
    if len(complete) < 2:
        out["fig-importance"] = f"parameter importances need at least 2 completed trials; the study has {len(complete)}"
    elif not varying:
        out["fig-importance"] = "parameter importances need parameters that vary between completed trials; all completed trials used the same values"
    else:
        out["fig-importance"] = _quiet(vis.plot_param_importances, study, params=varying, target_name=target_name)
    out["fig-slice"] = _quiet(vis.plot_slice, study, params=params, target_name=target_name)

    reverse = summary["objective"]["direction"] == "maximize"
    top = sorted(complete, key=lambda t: t.value, reverse=reverse)[:TOP_CURVES]
    curves = go.Figure()
    for t in top:
        history = RunDir(t.user_attrs["run_dir"]).read_metrics() if t.user_attrs.get("run_dir") else []
        points = [(m["epoch"], m[metric]) for m in history if "epoch" in m and isinstance(m.get(metric), (int, float))]
        if not points:
            continue
        label = f"trial {t.number}: " + ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in t.params.items())
        curves.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=label))
    if curves.data:
        curves.update_layout(title=f"{metric} per epoch, top {len(curves.data)} trials by objective", xaxis_title="epoch", yaxis_title=metric)
        out["fig-curves"] = curves
    else:
        out["fig-curves"] = f"no {RunDir.METRICS} with {metric} found in the completed trials' run folders"
    return out


def _state_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k.lower()} {v}" for k, v in counts.items()) or "no trials"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ------------------------------------------------------------------------------------------------
# HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1280px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr.best td { background: #eef7ee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { background: #f6f6f6; font-size: 12px; } pre { padding: 8px; white-space: pre-wrap; word-break: break-all; }
.note { color: #8a6d3b; background: #fcf8e3; border: 1px solid #faebcc; padding: 8px 12px; }
.figure { margin: 12px 0 24px; } .meta { color: #666; font-size: 13px; }
.state-complete { color: #2e7d32; } .state-fail { color: #c62828; } .state-pruned { color: #6d4c41; } .state-running { color: #1565c0; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(headers: list[str], rows: list[list[str]], table_id: str, row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(row) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _td(value: Any, num: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("num" if num else "", cls) if c)
    return f"<td{f' class={chr(34)}{classes}{chr(34)}' if classes else ''}>{_e(value)}</td>"


def _summary_html(s: Mapping[str, Any]) -> str:
    obj = s["objective"]
    best = s["best"]
    items = [
        ("study", s["name"]),
        ("objective", f"{obj['direction']} {obj['metric']} ({obj['mode']} epoch)"),
        ("budget", f"{s['n_trials']} trials"),
        ("trials by state", _state_text(s["counts"])),
        ("median of completed", _fmt(s["median"]) if s["median"] is not None else "no completed trial"),
        ("search space", "; ".join(f"{k}: {v}" for k, v in s["space"].items())),
        ("storage", s["storage"]),
        ("folder", s["folder"]),
    ]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    out = f'<table id="summary-table">{rows}</table>'
    if best is None:
        out += f'<p class="note" id="no-best">No completed trial yet ({_e(_state_text(s["counts"]))}); run <code>ickd sweep run {_e(s["name"])}</code>.</p>'
    else:
        params = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in best["params"].items())
        test = best.get("test_top1")
        tested = (f' (test top-1 at its selected epoch {_fmt(test)}, selected on {best.get("selection")})'
                  if test is not None else "")
        out += (
            f'<h3>Best: trial {_e(best["number"])}, {_e(obj["metric"])} = {_e(_fmt(best["value"]))}{_e(tested)}</h3>'
            f'<table id="best-params">{params}</table>'
            f'<p class="meta">run folder: <code>{_e(best["run_dir"])}</code></p>'
            f'<p>Reproduce it:</p><pre id="reproduce">{_e(best["command"])}</pre>'
        )
    return out


def _trials_html(rows: list[dict], keys: list[str], best_number: int | None) -> str:
    if not rows:
        return '<p class="note">The study has no trials yet.</p>'
    headers = ["trial", "state", *keys, "value", "holdout top-1", "test top-1 (selected epoch)", "best test top-1", "epochs", "run folder", "note"]
    body, classes = [], []
    for r in rows:
        body.append([
            _td(r["number"], num=True),
            _td(r["state"], cls=f"state-{r['state']}"),
            *(_td(_fmt(r["params"].get(k)), num=True) for k in keys),
            _td(_fmt(r["value"]), num=True),
            _td(_fmt(r.get("holdout_top1")), num=True),
            _td(_fmt(r.get("test_top1")), num=True),
            _td(_fmt(r.get("best_test_top1")), num=True),
            _td(r["epochs"], num=True),
            _td(r["run_dir"] or ""),
            _td((r["note"] + (f" (retry of trial {r['retry_of']})" if r["retry_of"] is not None else "")).strip()),
        ])
        classes.append("best" if r["number"] == best_number else "")
    return _table(headers, body, "trials-table", classes)


def _baselines_html(rows: list[dict], searched: bool) -> str:
    if not rows:
        return '<p class="note" id="no-baselines">No study best and no baseline runs to compare.</p>'
    note = ""
    if len(rows) == 1 and rows[0]["role"] == "study best":
        note = ('<p class="note" id="no-baselines">No baseline runs given: pass CE/KD/DKD run folders of the same '
                "experiment with <code>--baselines DIR</code> (a run folder or a folder of run folders).</p>")
    elif not searched:
        note = '<p class="note">No completed trial: baselines are shown without the study best.</p>'
    # Compared on the test top-1 at each run's selected epoch: the number a paper may report.
    ref = next((r.get("test_top1") for r in rows if r["role"] == "study best"), None)
    body, classes = [], []
    for r in rows:
        mine = r.get("test_top1")
        delta = mine - ref if isinstance(mine, (int, float)) and isinstance(ref, (int, float)) and r["role"] != "study best" else None
        body.append([
            _td(r["method"]), _td(r["role"]), _td(r.get("selection") or ""),
            _td(_fmt(r.get("holdout_top1")), num=True),
            _td(_fmt(mine), num=True), _td(_fmt(r.get("best_test_top1")), num=True),
            _td(_fmt(r["last_top1"]), num=True),
            _td("" if delta is None else f"{delta:+.2f}", num=True),
            _td(r["epochs"], num=True), _td(r["run_dir"]),
            _td("same setup" if not r["differs"] else "differs: " + ", ".join(r["differs"])),
        ])
        classes.append("best" if r["role"] == "study best" else "")
    note += ('<p class="meta">Selected on: the split that picked each run\'s best epoch (holdout when '
             "dataset.holdout is set). Test top-1 at the selected epoch is the honest number; best test top-1 "
             "(max over epochs) is the published tables' protocol, for comparison only.</p>")
    headers = ["method", "role", "selected on", "best holdout top-1", "test top-1 (selected epoch)", "best test top-1",
               "last top-1 (selection split)", "test top-1 minus study best", "epochs", "run folder", "setup"]
    return note + _table(headers, body, "baselines-table", classes)


def _figure_html(fid: str, title: str, fig: Any) -> str:
    if isinstance(fig, str):
        inner = f'<p class="note">{_e(fig)}</p>'
    else:
        height = 160 + 40 * len(fig.data[0].y) if fid == "fig-importance" and fig.data else 480
        fig.update_layout(height=height, margin={"t": 50, "l": 60, "r": 30, "b": 50})
        # plotly.js is in the page head once; every figure only carries its data (escaped JSON).
        inner = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{fid}-plot", default_width="100%", config={"displaylogo": False})
    return f'<div class="figure" id="{fid}"><h2>{_e(title)}</h2>{inner}</div>'


def _compare_html(folder: str | os.PathLike) -> str:
    """The "Comparison over seeds" section from ``<study folder>/compare.json`` (written by
    ``ickd compare``); empty when the study has none."""
    data = _read_json(Path(folder) / "compare.json")
    if not data.get("rows"):
        return ""
    headers, body = table_rows(data)
    table = _table([h.replace("[95% CI]", f"[{data.get('ci_method', 'Welch t, 95%')}]") for h in headers],
                   [[_td(c, num=i > 0) for i, c in enumerate(cells)] for cells in body], "compare-table")
    verdicts = "".join(f"<li>{_e(v['text'])}</li>" for v in data.get("verdicts", []))
    pending = data.get("pending") or []
    return (
        '<section id="compare"><h2>Comparison over seeds</h2>'
        f'<p class="meta">Seeds {_e(", ".join(str(s) for s in data.get("seeds", [])))}; test metric: {_e(data.get("protocol_text"))}; '
        f'written {_e(data.get("generated"))} by <code>{_e(data.get("command"))}</code>.</p>'
        f'{table}<p><b>{_e(data.get("bottom_line", ""))}</b></p><ul id="compare-verdicts">{verdicts}</ul>'
        + "".join(f'<p class="note">{_e(n)}</p>' for n in data.get("notes", []))
        + (f'<p class="note" id="compare-pending">{len(pending)} run(s) pending, not in the numbers: {_e("; ".join(pending))}</p>' if pending else "")
        + "</section>"
    )


def render_html(summary: Mapping[str, Any], figures: Mapping[str, Any], trials: list[dict], baselines: list[dict], keys: list[str]) -> str:
    from plotly.offline import get_plotlyjs

    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    best_number = summary["best"]["number"] if summary["best"] else None
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ickd study report: {_e(summary['name'])}</title>",
        f"<style>{CSS}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>Study {_e(summary['name'])}</h1>",
        f'<p class="meta">ickd study report, generated {_e(generated)}. Self-contained: open it in any browser, no server needed.</p>',
        f'<section id="summary"><h2>Summary</h2>{_summary_html(summary)}</section>',
        '<section id="figures">',
        *(_figure_html(fid, title, figures[fid]) for fid, title in FIGURES.items()),
        "</section>",
        f'<section id="baselines"><h2>Best trial vs baselines</h2>{_baselines_html(baselines, summary["best"] is not None)}</section>',
        _compare_html(summary["folder"]),
        f'<section id="trials"><h2>Trials</h2>{_trials_html(trials, keys, best_number)}</section>',
        "</body></html>",
    ]
    return "\n".join(parts)


def write_local_report(
    study: str | os.PathLike | StudyHandle | StudyReader,
    out_path: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    baselines: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write the study's HTML report (default ``<study folder>/report.html``); returns its path.

    ``baselines``: run folders, or folders of run folders, of the same experiment (CE/KD/DKD runs)
    to compare with the best trial.
    """
    reader = StudyReader.open(study, root)
    summary = study_summary(reader)
    trials = trial_rows(reader)
    own = [r["run_dir"] for r in trials if r["run_dir"]]
    runs = discover_baselines(baselines, exclude=own)
    best_dir = summary["best"]["run_dir"] if summary["best"] else None
    rows = baseline_rows(runs, best_dir)
    figures = _figures(reader, summary)
    text = render_html(summary, figures, trials, rows, list(reader.spec.space))
    out = Path(out_path) if out_path else reader.folder / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)  # mode 0666 minus the umask, like any new file of the user
    return out
