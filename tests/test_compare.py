"""`ickd compare`: Welch confidence intervals, verdicts, reading run folders, resumability, the
outputs (markdown, JSON, plot, HTML and W&B report sections), CLI errors, and an end-to-end
comparison of real runs retrained from a real study."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ickd.report import compare as cmp
from tests.helpers import REPO

SMOKE = REPO / "sweeps" / "synthetic_smoke.yaml"


def ickd(*args: str, cwd: Path = REPO, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ickd.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def fake_run(folder: Path, tests: list[float], holdouts: list[float] | None = None, status: str = "completed", wall: float = 10.0) -> Path:
    """A run folder as the trainer writes it: one metrics line per epoch and result.json. Used where
    the numbers must be known exactly; the end-to-end test below trains real runs."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, t in enumerate(tests):
        m = {"epoch": i + 1, "test/top1": t, "time/epoch_s": wall / len(tests)}
        if holdouts:
            m["holdout/top1"] = holdouts[i]
        m["val/top1"] = holdouts[i] if holdouts else t
        lines.append(json.dumps(m))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "result.json").write_text(json.dumps({"status": status, "wall_time_s": wall, "best_top1": max(tests), "last_top1": tests[-1]}))
    return folder


# ------------------------------------------------------------------------------------------------
# statistics


def test_welch_ci_matches_a_hand_computed_example():
    # a = 80, 82, 84 (mean 82, var 4); b = 79, 80, 81 (mean 80, var 1).
    # se = sqrt(4/3 + 1/3) = sqrt(5/3); df = (5/3)^2 / ((4/3)^2/2 + (1/3)^2/2) = 50/17;
    # t_{0.975, 50/17} = 3.2187586; half width = 3.2187586 * 1.2909944 = 4.1553995.
    ci = cmp.welch_ci([80, 82, 84], [79, 80, 81])
    assert ci["diff"] == pytest.approx(2.0)
    assert ci["df"] == pytest.approx(50 / 17)
    assert ci["se"] == pytest.approx(math.sqrt(5 / 3))
    assert ci["lo"] == pytest.approx(-2.1553995, abs=1e-6)
    assert ci["hi"] == pytest.approx(6.1553995, abs=1e-6)
    # An independent implementation agrees (unequal sizes too).
    from scipy import stats

    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 2.5]
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    ci = cmp.welch_ci(a, b)
    assert (ci["lo"], ci["hi"]) == pytest.approx((ref.low, ref.high))
    assert cmp.welch_ci([1.0], [1.0, 2.0]) is None  # n < 2: no interval
    same = cmp.welch_ci([5.0, 5.0], [4.0, 4.0])  # no spread at all: the interval is the point
    assert (same["lo"], same["hi"]) == (1.0, 1.0)


def test_verdict_wording():
    def line(a, b):
        ci = cmp.welch_ci(a, b)
        return cmp.verdict("ickd (tuned)", "kd", ci["diff"], ci)

    assert line([80, 82, 84], [79, 80, 81]) == "ickd (tuned) vs KD: +2.00 [-2.16, +6.16] — no significant gain (the CI includes 0)"
    assert line([90, 90.5, 91], [80, 80.5, 81]).endswith("— significant gain (the CI excludes 0)")
    assert line([70, 70.5, 71], [80, 80.5, 81]).endswith("— significantly worse (the CI is below 0)")
    assert line([79, 80, 81], [80, 82, 84]).endswith("— no significant difference (the CI includes 0)")
    assert cmp.verdict("ickd (tuned)", "kd_matched", 0.5, None) == (
        "ickd (tuned) vs kd_matched: +0.50, CI n/a — needs at least 2 finished seeds in both rows")
    assert "vs CE" in cmp.verdict("kd", "ce", -1.0, cmp.welch_ci([1, 2], [3, 4]))


# ------------------------------------------------------------------------------------------------
# summary and outputs from run folders with known numbers


def _plan(tmp_path: Path, seeds=(100, 101, 102)) -> cmp.Plan:
    rows = [cmp.Row("ce", ["distill=ce"], method="ce"), cmp.Row("kd", ["distill=kd"], method="kd"),
            cmp.Row("kd_matched", ["distill=kd_matched"], method="kd_matched"),
            cmp.Row(cmp.TUNED_LABEL, ["distill=ickd"], "ickd-tuned", method="ickd")]
    return cmp.plan_from_rows(rows, list(seeds), tmp_path / "runs", compose=False, command="ickd compare demo --seeds 3")


NUMBERS = {  # row slug -> per seed (per-epoch test top-1, per-epoch holdout top-1)
    "ce": [([70, 75], [71, 74]), ([71, 76], [72, 75]), ([72, 77], [73, 76])],
    "kd": [([79, 80], [78, 81]), ([80, 81], [79, 82]), ([81, 82], [80, 83])],
    "kd_matched": [([80, 81], [79, 80]), ([81, 82], [80, 81]), ([82, 83], [81, 82])],
    "ickd-tuned": [([84, 80], [85, 80]), ([83, 82], [84, 83]), ([85, 84], [86, 85])],
}


def _fill(plan: cmp.Plan, skip: set[tuple[str, int]] = frozenset()) -> None:
    for slug_, per_seed in NUMBERS.items():
        for seed, (tests, holdouts) in zip(plan.seeds, per_seed):
            if (slug_, seed) not in skip:
                fake_run(plan.out_dir / slug_ / f"seed-{seed}", tests, holdouts)


def test_read_run_picks_last_epoch_test_best_holdout_and_the_selected_epoch(tmp_path):
    info = cmp.read_run(fake_run(tmp_path / "r", tests=[80.0, 83.0, 82.0], holdouts=[70.0, 75.0, 74.0]))
    assert info["completed"] and info["test_final"] == 82.0 and info["test_best"] == 83.0
    assert info["holdout"] == 75.0 and info["test_selected"] == 83.0 and info["wall_time_s"] == pytest.approx(10.0)
    assert cmp.read_run(tmp_path / "nothing")["status"] == "pending"
    # A run from before holdouts existed: val/top1 is the test split.
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val/top1": 60.0}) + "\n" + json.dumps({"epoch": 2, "val/top1": 58.0}) + "\n")
    (old / "result.json").write_text(json.dumps({"status": "completed"}))
    info = cmp.read_run(old)
    assert (info["test_final"], info["test_best"], info["holdout"]) == (58.0, 60.0, None)


def test_summary_table_and_outputs(tmp_path):
    plan = _plan(tmp_path)
    _fill(plan)
    s = cmp.summarise(plan, "final")
    rows = {r["label"]: r for r in s["rows"]}
    # final protocol: the last epoch's test top-1 of each seed.
    assert rows["kd"]["test_mean"] == pytest.approx(81.0) and rows["kd"]["test_std"] == pytest.approx(1.0)
    assert rows[cmp.TUNED_LABEL]["test_mean"] == pytest.approx(82.0) and rows[cmp.TUNED_LABEL]["test_std"] == pytest.approx(2.0)
    assert rows[cmp.TUNED_LABEL]["holdout_mean"] == pytest.approx(85.0)  # best epoch's holdout: 85, 84, 86
    d = rows[cmp.TUNED_LABEL]["delta"]["kd"]
    assert d["diff"] == pytest.approx(1.0) and d["ci"] == pytest.approx(cmp.welch_ci([80, 82, 84], [80, 81, 82]))
    assert rows["kd"]["delta"]["kd"] is None  # no difference of a reference to itself
    assert s["complete"] and not s["pending"]
    texts = [v["text"] for v in s["verdicts"]]
    assert any(t.startswith("ickd (tuned) vs KD: +1.00 [") and "no significant gain" in t for t in texts)
    assert any(t.startswith("ickd (tuned) vs kd_matched: +0.00 [") for t in texts)
    assert any(t.startswith("kd vs CE: +5.00 [") and "significant gain" in t for t in texts)
    assert "does NOT significantly beat KD" in s["bottom_line"]

    table = cmp.format_table(s)
    assert "| method | holdout top-1 | test top-1 mean ± std | Δ vs KD [Welch t, 95%] | Δ vs kd_matched [Welch t, 95%] | n | wall time / run |" in table
    assert "| ickd (tuned) | 85.00 ± 1.00 | 82.00 ± 2.00 | +1.00 [" in table
    assert "| kd | 82.00 ± 1.00 | 81.00 ± 1.00 | — | -1.00 [" in table
    assert "ickd compare demo --seeds 3" in table

    best = cmp.summarise(plan, "best_test")
    assert {r["label"]: r["test_mean"] for r in best["rows"]}[cmp.TUNED_LABEL] == pytest.approx(84.0)  # 84, 83, 85
    assert "literature protocol" in cmp.format_table(best)

    paths = cmp.write_outputs(s, tmp_path / "study")
    data = json.loads(paths["compare.json"].read_text())
    assert data["protocol"] == "final" and data["ci_method"] == "Welch t, 95%"
    assert [r["test"] for r in data["rows"][1]["runs"]] == [80, 81, 82]
    assert "## Rows" in paths["compare.md"].read_text()
    assert paths["compare.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The study's HTML and W&B reports pick the comparison up from compare.json.
    from ickd.report.study import _compare_html
    from ickd.report.wandb_report import wandb_report_spec

    html_ = _compare_html(tmp_path / "study")
    assert 'id="compare-table"' in html_ and "Comparison over seeds" in html_ and "no significant gain" in html_
    assert _compare_html(tmp_path / "elsewhere") == ""
    summary = {"name": "demo", "folder": str(tmp_path / "study"), "space": {}, "counts": {}, "n_trials": 1, "best": None,
               "median": None, "objective": {"metric": "holdout/top1", "mode": "best", "direction": "maximize"}}
    blocks = wandb_report_spec(summary, "p", None)["blocks"]
    assert any(b["type"] == "MarkdownBlock" and "Comparison over seeds" in b["text"] and "| ickd (tuned) |" in b["text"] for b in blocks)
    summary["folder"] = str(tmp_path / "elsewhere")
    assert not any("Comparison over seeds" in b.get("text", "") for b in wandb_report_spec(summary, "p", None)["blocks"])


def test_missing_runs_are_pending_and_single_seeds_have_no_ci(tmp_path):
    plan = _plan(tmp_path, seeds=(100, 101))
    _fill(plan, skip={("ickd-tuned", 101)})
    s = cmp.summarise(plan)
    tuned = next(r for r in s["rows"] if r["label"] == cmp.TUNED_LABEL)
    assert tuned["n"] == 1 and tuned["test_std"] is None and tuned["delta"]["kd"]["ci"] is None
    assert s["pending"] == ["ickd (tuned) seed 101: pending"] and not s["complete"]
    table = cmp.format_table(s)
    assert "| ickd (tuned) | 85.00 ± n/a | 80.00 ± n/a | -0.50 [n/a] |" in table and "| 1/2 |" in table
    assert "Pending (1 run(s)" in table and "not enough finished seeds" in s["bottom_line"]


def test_completed_runs_are_not_retrained(tmp_path):
    plan = _plan(tmp_path, seeds=(100, 101))
    _fill(plan)
    before = {p: p.stat().st_mtime_ns for p in plan.out_dir.rglob("*") if p.is_file()}
    assert cmp.pending_runs(plan) == []
    assert cmp.run_local(plan, workers=2, progress=False) == {}  # nothing started
    after = {p: p.stat().st_mtime_ns for p in plan.out_dir.rglob("*") if p.is_file()}
    assert after == before and not list(plan.out_dir.rglob("train.log"))
    # A run that did not complete is pending again (it would resume from its checkpoint).
    folder = plan.out_dir / "kd" / "seed-101"
    fake_run(folder, [1.0], status="interrupted")
    assert [(e.row, e.seed) for e in cmp.pending_runs(plan)] == [("kd", 101)]


def test_plan_runs_and_baseline_recipes(tmp_path):
    plan = _plan(tmp_path, seeds=(7, 8))
    runs = plan.runs()
    assert [(r.row, r.seed) for r in runs[:4]] == [("ce", 7), ("kd", 7), ("kd_matched", 7), (cmp.TUNED_LABEL, 7)]  # seed-major
    assert runs[0].out_dir == tmp_path / "runs" / "ce" / "seed-7"
    assert runs[0].overrides == ["distill=ce", "seed=7", "name=compare-ce-s7"]
    cmd = runs[0].train_command()
    assert cmd[1:3] == ["-m", "ickd.train"] and f"hydra.run.dir={tmp_path / 'runs' / 'ce' / 'seed-7'}" in cmd
    assert cmp.without_distill(["dataset=synthetic", "distill=ickd", "distill.picd_weight=0", "+distill.x=1", "memory.k=4"]) == ["dataset=synthetic", "memory.k=4"]
    assert cmp.parse_baselines("ce, kd=other_study,,dkd") == [("ce", None), ("kd", "other_study"), ("dkd", None)]
    # a recipe with its own overrides keeps them in its label (and is not a study)
    assert cmp.parse_baselines("crd:distill.nce_k=64;distill.feat_weight=1") == [("crd:distill.nce_k=64;distill.feat_weight=1", None)]
    with pytest.raises(cmp.ConfigError, match="twice"):
        cmp.parse_baselines("kd,kd")
    with pytest.raises(cmp.ConfigError, match="distinct labels"):
        cmp.plan_from_rows([("kd", []), ("kd", [])], [0], tmp_path, compose=False)
    plan.save()
    assert json.loads((plan.out_dir / "runs.json").read_text())["runs"][0]["out_dir"] == str(runs[0].out_dir)
    loaded = cmp.load_plan(plan.out_dir)
    assert loaded.rows == plan.rows and loaded.seeds == [7, 8] and [r.out_dir for r in loaded.runs()] == [r.out_dir for r in runs]
    # A row whose recipe changed (e.g. the study found a new best trial) is never mixed with its old runs.
    fake_run(plan.out_dir / "ickd-tuned" / "seed-7", [50.0])
    plan.rows[1].overrides = ["distill=kd", "distill.temperature=2"]  # kd has no runs yet: a new recipe is fine
    plan.save()
    plan.rows[3].overrides = ["distill=ickd", "memory.k=8"]
    with pytest.raises(cmp.ConfigError, match=r"row 'ickd \(tuned\)' changed since its runs .* memory.k=8.* another --out"):
        plan.save()


# ------------------------------------------------------------------------------------------------
# CLI errors


def _bare_study(root: Path, name: str = "bare") -> None:
    from ickd.sweep.spec import load_spec
    from ickd.sweep.studies import StudyHandle

    StudyHandle.create(load_spec(SMOKE, name=name), root)


def test_cli_errors_exit_2_with_a_clear_message(tmp_path):
    root = tmp_path / "studies"
    proc = ickd("compare", "no_such_study", "--root", str(root))
    assert proc.returncode == 2 and "ickd compare: no study 'no_such_study'" in proc.stderr and "ickd sweep create" in proc.stderr
    _bare_study(root)
    proc = ickd("compare", "bare", "--root", str(root), "--baselines", "ce,kdd")
    assert proc.returncode == 2 and "unknown baseline 'kdd'" in proc.stderr and "kd_matched" in proc.stderr
    proc = ickd("compare", "bare", "--root", str(root), "--baselines", "ce")
    assert proc.returncode == 2 and "no completed trial yet" in proc.stderr and "ickd sweep run bare" in proc.stderr


# ------------------------------------------------------------------------------------------------
# end to end: a real 2-trial study, then every row retrained over 2 seeds by 2 local workers


@pytest.fixture(scope="module")
def study(tmp_path_factory, teacher_dir):
    """A real 2-trial study of the smoke study file (synthetic data, 1 epoch, offline from the
    session's teacher, selected on its holdout)."""
    from ickd.sweep.spec import load_spec
    from ickd.sweep.studies import StudyHandle
    from ickd.sweep.worker import run_worker

    root = tmp_path_factory.mktemp("compare") / "studies"
    spec = yaml.safe_load(SMOKE.read_text())
    spec["base"] = [*spec["base"], "paradigm=offline", f"teacher.checkpoint={teacher_dir}", "trainer.epochs=1"]
    spec["n_trials"] = 2
    handle = StudyHandle.create(load_spec(spec, name="cmp"), root)
    run_worker(str(handle.dir))
    assert len([t for t in handle.study().get_trials() if t.value is not None]) == 2
    return handle


@pytest.mark.slow
def test_compare_end_to_end_on_a_real_study(study):
    handle, root = study, study.dir.parent
    args = ["compare", "cmp", "--root", str(root), "--seeds", "2", "--workers", "2", "--baselines", "ce,kd,kd_matched"]
    proc = ickd(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labels = ["ce", "kd", "kd_matched", cmp.DEFAULT_LABEL, cmp.TUNED_LABEL, cmp.ABLATION_LABEL]
    data = json.loads((handle.dir / "compare.json").read_text())
    assert [r["label"] for r in data["rows"]] == labels and data["complete"]
    for r in data["rows"]:
        assert r["n"] == 2 and math.isfinite(r["test_mean"]) and math.isfinite(r["test_std"]) and math.isfinite(r["holdout_mean"])
        assert [run["seed"] for run in r["runs"]] == [100, 101]
        if r["label"] not in ("kd", "kd_matched"):
            for ref in ("kd", "kd_matched"):
                ci = r["delta"][ref]["ci"]
                assert math.isfinite(ci["lo"]) and ci["lo"] <= r["delta"][ref]["diff"] <= ci["hi"]
    # The matched baseline carries the tuned row's total distillation weight.
    from ickd.config_store import compose_run_config
    from ickd.sweep.space import params_to_overrides

    best = data["study"]["best_params"]
    tuned_cfg = compose_run_config([*handle.spec.base, *params_to_overrides(best)]).distill
    weight = tuned_cfg.kd_weight + tuned_cfg.picd_weight + tuned_cfg.nicd_weight
    assert tuned_cfg.picd_weight == best["distill.picd_weight"]  # the smoke study tunes it
    matched = yaml.safe_load((handle.dir / "compare" / "kd_matched" / "seed-100" / "config.yaml").read_text())
    assert matched["distill"]["name"] == "kd_matched" and matched["seed"] == 100
    assert matched["distill"]["kd_weight"] == pytest.approx(weight) and matched["distill"]["ce_weight"] == pytest.approx(tuned_cfg.ce_weight)
    # Every row is a real run of its own method, and each seed trained its own run.
    assert yaml.safe_load((handle.dir / "compare" / "ce" / "seed-101" / "config.yaml").read_text())["distill"]["name"] == "ce"
    tuned = yaml.safe_load((handle.dir / "compare" / "ickd-tuned" / "seed-100" / "config.yaml").read_text())
    assert tuned["distill"]["picd_weight"] == pytest.approx(best["distill.picd_weight"]) and tuned["memory"]["k"] == best["memory.k"]
    ablated = yaml.safe_load((handle.dir / "compare" / "ickd-random-neighbours" / "seed-101" / "config.yaml").read_text())
    assert ablated["memory"]["retrieval"] == "random" and ablated["memory"]["k"] == best["memory.k"]
    default = yaml.safe_load((handle.dir / "compare" / "ickd-default" / "seed-100" / "config.yaml").read_text())
    from omegaconf import OmegaConf

    shipped = OmegaConf.to_container(compose_run_config(["distill=ickd"]).distill, resolve=True)
    assert default["distill"] == shipped  # the shipped IC-KD defaults, none of the study's values
    md = (handle.dir / "compare.md").read_text()
    assert "| ickd (tuned) |" in md and "Welch t, 95%" in md and (handle.dir / "compare.png").stat().st_size > 0
    assert "ickd (tuned) vs KD:" in proc.stdout and "ce seed 100: test top-1" in proc.stdout
    assert (handle.dir / "compare" / "runs.json").is_file()

    # Resumable: finished runs are left alone; an interrupted one is started again in its folder and
    # the trainer resumes it from its checkpoint (here: nothing left to train, so it just completes).
    files = sorted(p for p in (handle.dir / "compare").rglob("result.json"))
    redo = handle.dir / "compare" / "kd" / "seed-101" / "result.json"
    result = json.loads(redo.read_text())
    redo.write_text(json.dumps({**result, "status": "interrupted"}))
    before = {p: p.stat().st_mtime_ns for p in files}
    proc = ickd(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"1 of {len(labels) * 2} runs to train" in proc.stdout
    changed = [p for p in files if p.stat().st_mtime_ns != before[p]]
    assert changed == [redo] and json.loads(redo.read_text())["status"] == "completed"
    assert json.loads(redo.read_text()).get("resumed_from_epoch") == 1

    # A finished run trained under another config than its row composes to now (e.g. the shipped
    # defaults changed since) is never reused silently: exit 2, naming the run and the key.
    stale = handle.dir / "compare" / "ickd-default" / "seed-100" / "config.yaml"
    original = stale.read_text()
    cfg = yaml.safe_load(original)
    cfg["distill"]["picd_weight"] = cfg["distill"]["picd_weight"] + 1.0
    stale.write_text(yaml.safe_dump(cfg))
    try:
        proc = ickd(*args)
    finally:
        stale.write_text(original)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "ickd-default/seed-100 was trained under another config" in proc.stderr and "distill.picd_weight" in proc.stderr


@pytest.mark.slow
def test_compare_as_a_launch_then_the_table(study, tmp_path):
    """--profile submits the unfinished runs as one job array through ickd.launch (submitit's local
    executor here) into the comparison folder and returns; a later `ickd compare` trains nothing
    that a live job holds and builds the table once the jobs are done."""
    from tests.helpers import wait_for

    env = {"ICKD_LAUNCHES": str(tmp_path / "launches")}
    out = tmp_path / "cmp"
    args = ["compare", "cmp", "--root", str(study.dir.parent), "--seeds", "1", "--seed-start", "7", "--baselines", "ce",
            "--no-default", "--no-ablation", "--out", str(out)]
    proc = ickd(*args, "--profile", "local", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 run(s) of the comparison in" in proc.stdout
    # The printed command works when pasted: it names the study's root and the comparison folder.
    assert f"when the jobs are done: ickd compare cmp --root {study.dir.parent} --out {out} --seeds 1" in proc.stdout
    manifest = json.loads(next((tmp_path / "launches").glob("compare-*/manifest.json")).read_text())
    assert sorted(j["out_dir"] for j in manifest["jobs"]) == sorted(str(out / r / "seed-7") for r in ("ce", "ickd-tuned"))
    again = ickd(*args, env=env)  # while the jobs run: nothing is trained here
    assert again.returncode == 0, again.stdout + again.stderr
    assert "runs to train" not in again.stdout
    pending = json.loads((study.dir / "compare.json").read_text())["pending"]
    assert all("queued/running in launch compare-" in p for p in pending)
    wait_for(lambda: all(cmp.read_run(out / r / "seed-7")["completed"] for r in ("ce", "ickd-tuned")), 600, "the launched runs")
    final = ickd(*args, env=env)
    assert final.returncode == 0, final.stdout + final.stderr
    data = json.loads((study.dir / "compare.json").read_text())
    assert data["complete"] and [r["n"] for r in data["rows"]] == [1, 1] and "runs to train" not in final.stdout
    assert "| ickd (tuned) |" in final.stdout and "not enough finished seeds" in final.stdout  # one seed: no interval
