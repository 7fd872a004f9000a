"""bench/gpu_check.sh, the GPU check, works before it meets a GPU: its smoke mode passes on a CPU, its
checks fail on the faults they are there for, and its wheel bundle installs offline into a Python
that has only torch.

No GPU here: the CUDA-only checks run with CPU stand-ins (the graph is
``ickd.engine.cpu_graph.CpuReplayGraphStep``, which re-runs the captured body on the static inputs; sync detection only
exercises the region; recapture memory counts captures, not bytes). The real ones run on a GPU.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def _fast_cell(**kw):
    return {"kind": "cell", "method": "ickd", "batch": 64, "path": "fast", "step": "graph", "timed_batches": 300,
            "graph_replays": 300, "eager_steps": 0, "graph_captures": 0, "images_per_s": 1.0, **kw}


def test_replay_check_fails_a_silent_eager_fallback(tmp_path):
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps({"cells": [_fast_cell(), {**_fast_cell(path="classic"), "step": "eager"}]}))
    assert all(r["pass"] for r in gpu_check.check_replays(path, require_graph=True))
    for bad in (_fast_cell(graph_replays=0, eager_steps=300), _fast_cell(graph_replays=299, eager_steps=1),
                _fast_cell(step="eager-fallback"), _fast_cell(error="RuntimeError: boom")):
        path.write_text(json.dumps({"cells": [_fast_cell(batch=512), bad]}))
        rows = gpu_check.check_replays(path, require_graph=True)
        assert [r["pass"] for r in rows] == [True, False], bad
    path.write_text(json.dumps({"cells": []}))
    assert not gpu_check.check_replays(path, require_graph=False)[0]["pass"]  # nothing measured is a failure


def _correctness(batch: int = 16) -> dict[str, dict]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        runs = gpu_check.Runs(torch.device("cpu"), True, 8 * batch + batch // 2, Path(tmp))
        return {r["check"]: r for r in gpu_check.check_correctness(runs, batch)}


@pytest.mark.slow
def test_correctness_checks_pass_and_catch_dropped_graph_gradients(monkeypatch):
    rows = _correctness()
    assert all(r["pass"] for r in rows.values()), rows
    pointer_check = "gradient pointers stable (short batch, next epoch)"
    # The mutant of issue 12: the eager steps drop the graph-owned gradients (set_to_none=True).
    from ickd.engine.step import TrainStep

    monkeypatch.setattr(TrainStep, "zero_grad", lambda self, set_to_none: self.optimizer.zero_grad(set_to_none=True))
    rows = _correctness()
    assert not rows[pointer_check]["pass"], rows[pointer_check]


@pytest.mark.slow
def test_gpu_check_smoke_passes_on_cpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "GPU_CHECK_PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert "| FAIL |" not in table
    for check in ("no host sync", "gradient pointers stable", "recaptures", "graph vs eager gradients",
                  "graph replays", "IC-KD/KD step time b16", "fit() overhead", "loss curve", "retrieval cpu torch"):
        assert check in table, check
    correctness = json.loads((tmp_path / "correctness.json").read_text())
    assert all("CPU" in r["note"] for r in correctness if r["check"] != "capture" or "stand-in" in r["note"])


# ---------------------------------------------------------------------------------- the wheel bundle
def _torch_only_site(folder: Path) -> Path:
    """A folder of links to torch, torchvision and what they need except numpy and pillow (which the
    bundle brings), from this Python: the torch-only Python of an air-gapped GPU machine."""
    site = folder / "torch-only"
    site.mkdir()
    todo, seen = ["torch", "torchvision"], set()
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen or name in ("numpy", "pillow"):
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
        base = Path(str(dist.locate_file("")))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = base / top
            if src.exists() and not (site / top).exists() and top != ".." and not top.endswith(".pth"):
                (site / top).symlink_to(src)
    return site


@pytest.mark.slow
def test_wheel_bundle_fits_and_installs_offline_into_a_torch_only_python(tmp_path):
    bundle = tmp_path / "bundle"
    pyv = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "BUNDLE_PYTHON_VERSION": pyv, "BUNDLE_BUILD_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "build_wheel_bundle.sh"), str(bundle)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and re.search(r"No matching distribution|Could not fetch|NewConnectionError|Network is unreachable",
                                          proc.stderr):
        pytest.skip(f"no package index reachable to build the bundle: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MiB (limit 64 MiB)" in proc.stdout
    names = {w.name.split("-")[0].lower() for w in bundle.glob("*.whl")}
    assert {"ickd", "hydra_core", "omegaconf", "antlr4_python3_runtime", "pyyaml", "tqdm"} <= names
    assert not names & {"torch", "torchvision", "optuna", "wandb", "submitit", "scipy", "matplotlib"}
    assert sum(w.stat().st_size for w in bundle.glob("*.whl")) < 64 * 2**20

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    (Path(site) / "torch_only.pth").write_text(str(_torch_only_site(tmp_path)) + "\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL")}
    has = subprocess.run([str(py), "-c", "import torch; print(torch.__file__)"], env=clean, capture_output=True, text=True)
    assert has.returncode == 0, has.stderr  # torch is there ...
    for module in ("hydra", "omegaconf", "yaml", "tqdm", "PIL", "ickd"):  # ... and nothing the bundle brings
        missing = subprocess.run([str(py), "-c", f"import {module}"], cwd=tmp_path, env=clean, capture_output=True, text=True)
        assert missing.returncode != 0, module
    # gpu_check.sh installs the bundle offline for that Python and runs (parts of) the check with it.
    site_dir, out = tmp_path / "site", tmp_path / "out"
    check = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**clean, "OMP_NUM_THREADS": "1", "GPU_CHECK_SMOKE": "1", "GPU_CHECK_PYTHON": str(py),
                                "GPU_CHECK_BUNDLE": str(bundle), "GPU_CHECK_SITE": str(site_dir), "OUT": str(out),
                                "GPU_CHECK_PARTS": "correctness fit"})
    assert check.returncode == 0, check.stdout[-6000:] + check.stderr[-3000:]
    assert "bundle ok: ickd from " + str(site_dir) in check.stdout
    assert (out / "correctness.json").exists() and (out / "fit.json").exists() and not (out / "throughput.log").exists()
    # From outside the checkout, the installed ickd and the bundled dependencies import.
    imported = subprocess.run([str(py), "-c", "import ickd, hydra, omegaconf, yaml, tqdm, numpy, PIL, torchvision; "
                               "from ickd.config_store import compose_run_config; print(ickd.__file__)"],
                              cwd=tmp_path, env={**clean, "PYTHONPATH": str(site_dir)}, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0 and str(site_dir) in imported.stdout, imported.stdout + imported.stderr
