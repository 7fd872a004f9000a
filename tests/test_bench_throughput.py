"""The benchmarks in bench/ run in smoke mode on a CPU and print complete, well-formed results.

They run as subprocesses, exactly as a user (or bench/gpu_check.sh) runs them. No timing is asserted:
speed is what the benchmarks measure, not what tests check.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, timeout: float = 300) -> tuple[int, list[dict], str]:
    """(exit status, the JSON lines of stdout, the whole stdout) of ``bench/<script> args``."""
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, lines, proc.stdout + proc.stderr


def test_throughput_smoke_reports_every_cell(tmp_path):
    out_file = tmp_path / "throughput.json"
    status, lines, output = run_bench("throughput.py", "--smoke", "--out", str(out_file))
    assert status == 0, output
    cells = [line for line in lines if line.get("kind") == "cell"]
    summaries = [line for line in lines if line.get("kind") == "summary"]
    assert len(summaries) == 1
    summary = summaries[0]
    expected = {(m, b, p) for m in ("ce", "kd", "dkd", "ickd") for b in (64, 512) for p in ("classic", "fast")}
    assert {(c["method"], c["batch"], c["path"]) for c in cells} == expected
    for c in cells:
        assert "error" not in c, c
        assert c["images_per_s"] > 0 and c["ms_per_step"] > 0 and c["timed_batches"] >= 1
        # The path settings really took effect (CPU: no graph, no bf16, NCHW).
        assert c["pipeline"] == ("classic" if c["path"] == "classic" else "device")
        assert c["step"] == "eager" and c["amp"] == "off" and c["channels_last"] is False
        if c["method"] == "ickd":
            assert c["fill_s"] > 0  # the memory bank was filled before timing
    assert summary["failed_cells"] == 0
    assert "bench/throughput.py --smoke" in summary["command"]
    assert summary["env"]["device"] == "cpu" and summary["env"]["torch"]
    ratios = {(r["path"], r["batch"]): r["ratio"] for r in summary["step_time_ickd_vs_kd"]}
    assert set(ratios) == {(p, b) for p in ("classic", "fast") for b in (64, 512)}
    assert all(r > 0 for r in ratios.values())
    assert {(s["method"], s["batch"]) for s in summary["speedup_fast_vs_classic"]} == {(m, b) for m in ("ce", "kd", "dkd", "ickd") for b in (64, 512)}
    # Targets are listed with their measured values but judged only on CUDA in full mode.
    assert summary["targets_apply"] is False
    assert len(summary["targets"]) == 5 and all(t["pass"] is None and t["value"] is not None for t in summary["targets"])
    # The table and the file carry the same run.
    assert "| ickd | 512 |" in output and "IC-KD / KD step time" in output
    saved = json.loads(out_file.read_text())
    assert len(saved["cells"]) == len(expected) and saved["command"] == summary["command"]


def test_throughput_reports_a_failed_cell_and_exits_nonzero():
    # A classic path with a negative worker count is a configuration error of that cell only.
    status, lines, output = run_bench("throughput.py", "--smoke", "--methods", "ce", "--batches", "64", "--classic-workers", "-1")
    assert status == 1, output
    cells = {c["path"]: c for c in lines if c.get("kind") == "cell"}
    assert "num_workers" in cells["classic"]["error"]
    assert cells["fast"]["images_per_s"] > 0
    assert "FAILED ce batch 64 classic" in output


def test_packing_smoke_measures_one_and_two_trials(tmp_path):
    status, lines, output = run_bench("packing.py", "--smoke", "--out", str(tmp_path / "packing.json"))
    assert status == 0, output
    rows = [line for line in lines if line.get("kind") == "trials"]
    assert [r["n"] for r in rows] == [1, 2]
    for r in rows:
        assert "error" not in r, r
        assert r["aggregate_images_per_s"] > 0 and r["span_s"] > 0
        assert len(r["per_trial_images_per_s"]) == r["n"] and all(v > 0 for v in r["per_trial_images_per_s"])
    summary = next(line for line in lines if line.get("kind") == "summary")
    assert summary["failed"] == 0 and summary["rows"][0]["speedup_vs_1"] == 1.0
    assert summary["rows"][1]["efficiency"] > 0
    assert json.loads((tmp_path / "packing.json").read_text())["rows"] == summary["rows"]


def test_curve_check_classic_and_fast_paths_agree_on_cpu():
    status, lines, output = run_bench("curve_check.py", "--device", "cpu")
    assert status == 0, output
    (result,) = lines
    assert result["pass"] is True and result["failures"] == []
    assert result["same_first_batch"] is True
    assert result["classic"]["pipeline"] == "classic" and result["fast"]["pipeline"] == "device"
    steps = result["setup"]["steps"] // result["setup"]["window"]
    assert len(result["classic"]["losses"]) == len(result["fast"]["losses"]) == steps
    assert result["max_rel_diff"] <= result["tolerance"] == 1e-4
    assert result["curve_move"] > 2 * result["tolerance"]


def test_curve_check_detects_a_bf16_sized_difference():
    # bf16 autocast on the fast run changes the loss by ~1e-3: the fp32 tolerance must catch it.
    status, lines, output = run_bench("curve_check.py", "--device", "cpu", "--fast-amp", "bf16", "--steps", "4",
                                      "--window", "1", "--tolerance", "1e-4")
    assert status == 1, output
    (result,) = lines
    assert result["pass"] is False and result["fast"]["amp"] == "bf16"
    assert result["max_rel_diff"] > 1e-4
    assert any("differs by" in f for f in result["failures"])


def test_fit_overhead_prints_fit_next_to_step_throughput_and_the_bank_policies_differ(tmp_path):
    """bench/fit_overhead.py (issue 12): fit() end-to-end images/s next to step-only images/s, per
    bank-checkpoint policy; a frozen, pass-filled bank never goes into last.pt."""
    status, lines, output = run_bench("fit_overhead.py", "--epochs", "2", "--num-train", "2048", "--batches-per-epoch", "3")
    assert status == 0, output
    cells = {c["policy"]: c for c in lines if c.get("kind") == "cell"}
    assert set(cells) == {"bank-every-epoch", "bank-every-5", "frozen-rebuilt"}, output
    for c in cells.values():
        assert c["step_images_per_s"] > 0 and c["fit_images_per_s"] > 0 and c["saves"] >= 2
    # The bank (2048 x feature dim + logits) dominates a checkpoint that carries it.
    assert cells["frozen-rebuilt"]["last_pt_mb_max"] * 5 < cells["bank-every-epoch"]["last_pt_mb_max"]
    assert "| policy | epochs | step img/s | fit img/s |" in output and "command:" in output
