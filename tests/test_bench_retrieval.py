"""bench/retrieval.py --smoke runs end to end and prints every row, the summary and the table."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

BACKENDS = ("torch", "faiss_flat", "faiss_ivf")
SMOKE_BANKS = {("20000x256", 64), ("100000x128", 256)}


def run_smoke(device: str) -> tuple[list[dict], dict, str]:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "retrieval.py"), "--smoke", "--devices", device],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rows = [r for r in records if r["kind"] == "row"]
    summaries = [r for r in records if r["kind"] == "summary"]
    assert len(summaries) == 1
    return rows, summaries[0], proc.stdout


def check_measured(row: dict) -> None:
    assert row["ms_median"] > 0 and row["ms_min"] > 0 and row["first_ms"] > 0, row
    assert row["ms_min"] <= row["ms_median"]
    assert 0.0 <= row["recall_at_k"] <= 1.0
    assert row["valid_frac"] == 1.0  # a full bank always yields k neighbours
    if row["backend"] != "faiss_ivf":  # exact search: the same neighbours as the float32 reference
        # (an fp16 bank rounds features, which may swap near-ties at the k-th place)
        assert row["recall_at_k"] >= (0.99 if row["bank_dtype"] == "float32" else 0.9), row
    else:
        assert row["nprobe"] <= row["nlist"] and row["ms_incl_retrain"] >= row["ms_median"]


@pytest.mark.slow
def test_smoke_cpu_prints_every_row_summary_and_table():
    rows, summary, out = run_smoke("cpu")
    got = {(r["device"], r["backend"], r["bank"], r["queries"]) for r in rows}
    want = {("cpu", b, bank, q) for b in BACKENDS for bank, q in SMOKE_BANKS}
    assert got == want and len(rows) == len(want)
    for row in rows:
        assert "skipped" not in row, row
        assert row["k"] == 16 and row["bank_dtype"] == "float32"
        check_measured(row)
    assert summary["rows"] == len(rows) and summary["smoke"] is True
    assert "bench/retrieval.py --smoke" in summary["command"]
    env = summary["environment"]
    assert env["torch"] == torch.__version__ and env["faiss"] and env["torch_threads"] >= 1
    assert "cpu" in env["device_names"]
    assert {(b["bank"], b["queries"]) for b in summary["fastest_exact"]} == SMOKE_BANKS
    assert all(b["backend"] in ("torch", "faiss_flat") for b in summary["fastest_exact"])
    assert "| device | backend | bank MxD | dtype | queries | ms/batch (median) |" in out
    assert f"Command: `{summary['command']}`" in out
    assert out.count("\n| cpu | ") == len(rows)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_cuda_rows_measured_or_skipped_with_reason():
    rows, summary, out = run_smoke("cuda")
    got = {(r["backend"], r["bank"], r["queries"]) for r in rows}
    assert got == {(b, bank, q) for b in BACKENDS for bank, q in SMOKE_BANKS}
    for row in rows:
        assert row["device"] == "cuda"
        if row["backend"] == "torch":
            assert row["bank_dtype"] == "float16"
            check_measured(row)
        elif "skipped" in row:
            assert "faiss" in row["skipped"] and "skipped: " in out
        else:
            check_measured(row)
    assert "cuda" in summary["environment"]["device_names"]
