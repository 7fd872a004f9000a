"""A W&B report of a study, built offline and published only on request.

The report is described first as plain data (``wandb_report_spec``: dicts and lists, unit-tested
without W&B), then turned into ``wandb_workspaces.reports.v2`` objects (``build_wandb_report``).
Constructing those objects needs no server (checked with wandb-workspaces 0.4.13: Report, PanelGrid,
Runset and the panels validate offline); serialising them (``Report._to_model``, called by ``save``)
looks up the project on the server, so only ``publish_wandb_report`` needs an API key and network.

The runs are the trials' W&B runs: group = study name, config = the run config (nested, so a space
key such as ``memory.k`` is the W&B config key ``memory.k``), one history row per epoch with an
``epoch`` key.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from ickd.errors import IckdError
from ickd.report.compare import format_table


class WandbReportError(IckdError):
    """The W&B report cannot be published (no API key, no server)."""


def objective_summary_key(objective: Mapping[str, str]) -> str:
    """The run-summary key that holds a trial's objective. W&B keeps the *last* logged value in the
    summary; the trainer logs ``val/best_top1``, ``holdout/best_top1`` and ``test/best_top1``
    (running bests) each epoch, so for a best-top-1 objective that key's summary is the objective."""
    metric, mode = objective["metric"], objective.get("mode", "best")
    if mode == "best" and metric in ("val/top1", "holdout/top1", "test/top1"):
        return metric.replace("/top1", "/best_top1")
    return metric


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown(summary: Mapping[str, Any]) -> str:
    obj = summary["objective"]
    counts = ", ".join(f"{k.lower()} {v}" for k, v in summary["counts"].items()) or "no trials"
    lines = [
        f"**Objective:** {obj['direction']} `{obj['metric']}` ({obj['mode']} epoch). "
        f"**Budget:** {summary['n_trials']} trials. **Trials by state:** {counts}.",
        "",
    ]
    best = summary.get("best")
    if best is None:
        lines.append("No completed trial yet.")
    else:
        lines.append(f"**Best:** trial {best['number']}, `{obj['metric']}` = {_fmt(best['value'])}")
        lines.append("")
        lines += ["| parameter | value |", "|---|---|"] + [f"| `{k}` | {_fmt(v)} |" for k, v in best["params"].items()]
        lines += ["", "Reproduce it:", "", "```", best["command"], "```"]
    if summary.get("median") is not None:
        lines += ["", f"Median of completed trials: {_fmt(summary['median'])}."]
    return "\n".join(lines)


def _compare_markdown(summary: Mapping[str, Any]) -> str | None:
    """The `ickd compare` table from ``<study folder>/compare.json``, as markdown; None without one."""
    import json
    from pathlib import Path

    try:
        data = json.loads((Path(summary["folder"]) / "compare.json").read_text())
    except (KeyError, OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("rows"):
        return None

    return "## Comparison over seeds\n\n" + format_table(data)


def wandb_report_spec(summary: Mapping[str, Any], project: str, entity: str | None, group: str | None = None) -> dict[str, Any]:
    """The report as plain data. ``group`` defaults to the study name (the trials' W&B group)."""
    group = group or summary["name"]
    params = list(summary["space"])
    target = objective_summary_key(summary["objective"])
    # The scatter plot's x: the best trial's first parameter that is numeric, else the first one.
    best_params = (summary.get("best") or {}).get("params", {})
    numeric = [p for p in params if isinstance(best_params.get(p), (int, float)) and not isinstance(best_params.get(p), bool)]
    key_param = (numeric or params or [None])[0]
    panels: list[dict[str, Any]] = [
        {"type": "ParallelCoordinatesPlot", "columns": [{"config": p} for p in params] + [{"summary": target}]},
        {"type": "ParameterImportancePlot", "with_respect_to": target},
        {"type": "LinePlot", "title": "val/top1 per epoch", "x": "epoch", "y": ["val/top1"], "groupby": "group"},
    ]
    if key_param is not None:
        panels.append({"type": "ScatterPlot", "title": f"{target} vs {key_param}", "x": {"config": key_param}, "y": {"summary": target}})
    return {
        "project": project,
        "entity": entity,
        "title": f"ickd study {summary['name']}"[:128],
        "description": f"Optuna study {summary['name']}: {summary['objective']['direction']} {summary['objective']['metric']}",
        "blocks": [
            {"type": "H1", "text": f"Study {summary['name']}"},
            {"type": "MarkdownBlock", "text": _markdown(summary)},
            # `ickd compare`'s table over seeds, when the study has one.
            *([{"type": "MarkdownBlock", "text": _compare_markdown(summary)}] if _compare_markdown(summary) else []),
            {
                "type": "PanelGrid",
                "runsets": [{
                    "name": f"study {group}",
                    "project": project,
                    "entity": entity,
                    # W&B's filter grammar: Metric('Group') is the run's group attribute.
                    "filters": f"Metric('Group') == {group!r}",
                }],
                "panels": panels,
            },
        ],
    }


def _metric(ref: Any):
    import wandb_workspaces.reports.v2 as wr

    if isinstance(ref, Mapping):
        (kind, name), = ref.items()
        return wr.Config(name) if kind == "config" else wr.SummaryMetric(name)
    return ref


def report_from_spec(spec: Mapping[str, Any]):
    """``wandb_workspaces.reports.v2.Report`` objects from the plain spec; needs no server."""
    import wandb_workspaces.reports.v2 as wr

    panels = []
    grid_spec = next(b for b in spec["blocks"] if b["type"] == "PanelGrid")
    for p in grid_spec["panels"]:
        kind = p["type"]
        if kind == "ParallelCoordinatesPlot":
            panels.append(wr.ParallelCoordinatesPlot(columns=[wr.ParallelCoordinatesPlotColumn(metric=_metric(c)) for c in p["columns"]]))
        elif kind == "ParameterImportancePlot":
            panels.append(wr.ParameterImportancePlot(with_respect_to=p["with_respect_to"]))
        elif kind == "LinePlot":
            panels.append(wr.LinePlot(title=p["title"], x=p["x"], y=list(p["y"]), groupby=p["groupby"]))
        elif kind == "ScatterPlot":
            panels.append(wr.ScatterPlot(title=p["title"], x=_metric(p["x"]), y=_metric(p["y"])))
        else:  # the spec is ours: an unknown type is a bug here, not user input
            raise ValueError(f"unknown panel type {kind!r}")
    runsets = [wr.Runset(entity=r["entity"] or "", project=r["project"], name=r["name"], filters=r["filters"]) for r in grid_spec["runsets"]]
    blocks = []
    for b in spec["blocks"]:
        if b["type"] == "H1":
            blocks.append(wr.H1(text=b["text"]))
        elif b["type"] == "MarkdownBlock":
            blocks.append(wr.MarkdownBlock(text=b["text"]))
        elif b["type"] == "PanelGrid":
            blocks.append(wr.PanelGrid(runsets=runsets, panels=panels))
    # entity "" offline: Report's default would ask the server for the user's default entity.
    return wr.Report(project=spec["project"], entity=spec["entity"] or "", title=spec["title"], description=spec["description"], blocks=blocks)


def build_wandb_report(study_summary: Mapping[str, Any], project: str, entity: str | None = None, group: str | None = None):
    """The study's W&B report (not saved). ``study_summary`` is ``ickd.report.study.study_summary``."""
    return report_from_spec(wandb_report_spec(study_summary, project, entity, group))


NO_KEY = ("no W&B API key: run `wandb login` or set WANDB_API_KEY; the local report is "
          "ickd report {study} --out {out}")


def publish_wandb_report(study_summary: Mapping[str, Any], project: str, entity: str | None = None, group: str | None = None,
                         local_hint: str = "report.html") -> str:
    """Build and save the report on the W&B server; returns its URL. The only networked step."""
    study = study_summary["name"]
    try:
        import wandb
        from wandb.errors import UsageError
    except ImportError:
        raise WandbReportError("the W&B report needs `pip install wandb wandb-workspaces`") from None
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        raise WandbReportError(f"WANDB_MODE={os.environ['WANDB_MODE']}: a report can only be saved online; unset WANDB_MODE. "
                               f"The local report is ickd report {study} --out {local_hint}")
    try:
        api = wandb.Api()  # reads WANDB_API_KEY or ~/.netrc; raises before any request when neither has a key
    except UsageError:
        raise WandbReportError(NO_KEY.format(study=study, out=local_hint)) from None
    entity = entity or api.default_entity
    report = build_wandb_report(study_summary, project, entity, group)
    try:
        report.save()
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WandbReportError(
            f"saving the W&B report to {entity}/{project} failed: {reason}. Check the server ($WANDB_BASE_URL), "
            f"the project name and your access; the local report is ickd report {study} --out {local_hint}"
        ) from None
    return report.url
