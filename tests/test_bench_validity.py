"""bench/validity.py runs end to end on real Fashion-MNIST (shrunk) and prints complete results.

Run as a subprocess, exactly as a user runs it. No accuracy is asserted: at this size the numbers
are noise; what must hold is that every row and every diagnostic is there, finite, and reproducible
from the printed command.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="needs `apt-get install dataset-fashion-mnist` (CI installs it)")
def test_validity_bench_prints_the_compare_table_and_the_signal_diagnostics(tmp_path):
    out = tmp_path / "validity"
    args = ["--out", str(out), "--seeds", "2", "--study-trials", "2", "dataset.train_subset=1200", "dataset.holdout=500", "trainer.epochs=1"]
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "validity.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "validity.json").read_text())
    labels = [r["label"] for r in result["compare"]["rows"]]
    assert labels == ["ce", "kd", "kd_matched", "fitnet", "at", "crd:distill.nce_k=1024", "reviewkd",
                      "ickd (default)", "ickd (tuned)", "ickd (random neighbours)"]
    for row in result["compare"]["rows"]:
        assert row["n"] == 2 and math.isfinite(row["test_mean"]) and math.isfinite(row["holdout_mean"]), row
    for rows in result["diagnostics"].values():
        assert [r["setting"] for r in rows] == ["first implementation", "shipped defaults", "defaults, random neighbours"]
        for r in rows:
            assert {"picd", "nicd", "kd"} <= set(r["grad_norm"]) and all(math.isfinite(v) for v in r["grad_share"].values())
        first, default = rows[0], rows[1]
        assert default["sim_row_spread"] > first["sim_row_spread"]  # the transform spreads the similarities
    printed = proc.stdout
    assert "test top-1 mean ± std" in printed and "Signal diagnostics, student at initialisation" in printed
    assert f"python bench/validity.py --out {out}" in printed and "Bottom line:" in printed
    assert (out / "validity.md").read_text().startswith("# bench/validity.py")
