"""Refactors keep training bit-identical (issue 13's constraint): seeded short runs of every existing
method and paradigm end with the weights recorded before the refactor.

``tests/golden/weights.json`` holds, per run, a SHA-256 of every trained tensor (exact) and its sum
of squares (a float). On the machine that recorded it (same torch, same CPU instruction set: the
file's ``fingerprint``) the hashes must match exactly; elsewhere CPU kernels may round differently,
so only the sums of squares are compared, at rel 1e-4. Re-record only for an intended change of the
numbers: ``python -m tests.test_golden --write`` (and say why in the commit).
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).with_name("golden") / "weights.json"

RUNS: dict[str, list[str]] = {
    "ce": ["distill=ce"],
    "kd": ["distill=kd"],
    "dkd": ["distill=dkd"],
    "ickd": ["distill=ickd"],
    "ickd_online": ["distill=ickd", "paradigm=online"],
    "ickd_teacher_free": ["distill=ickd", "paradigm=teacher_free"],
}
COMMON = ["trainer.epochs=2", "trainer.max_batches_per_epoch=4", "trainer.deterministic=true", "trainer.threads=1",
          "dataset.kwargs.num_train=256", "dataset.kwargs.num_val=64", "seed=3"]


def fingerprint() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "sse", "amx"))))
                break
    except OSError:
        pass
    return f"torch={torch.__version__} machine={platform.machine()} cpu=[{flags}]"


def digest(state: dict[str, torch.Tensor]) -> dict[str, object]:
    h = hashlib.sha256()
    sq = 0.0
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
        sq += float(t.detach().double().pow(2).sum())
    return {"sha256": h.hexdigest(), "sumsq": sq}


def run_all(tmp: Path, teacher: Path) -> dict[str, dict[str, object]]:
    from ickd.engine import train
    from tests.helpers import compose_config

    out = {}
    for name, overrides in RUNS.items():
        # The offline methods but CE learn from the trained teacher; online/teacher-free need none.
        extra = [f"teacher.checkpoint={teacher}"] if name in ("kd", "dkd", "ickd") else []
        folder = tmp / name
        summary = train(compose_config(*overrides, *COMMON, *extra), folder)
        assert summary["status"] == "completed", summary
        ckpt = torch.load(folder / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        models = ckpt["distiller"]
        out[name] = {key: digest(value) for key, value in sorted(_model_states(models).items())}
    return out


def _model_states(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The trained networks' state_dicts (student, peer, ema) and the memory banks of a training
    checkpoint's distiller state."""
    found = {}
    for key in ("student", "peer", "ema"):
        if isinstance(state.get(key), dict):
            found[key] = state[key]
    for name, bank in (state.get("banks") or {}).items():
        found[f"bank:{name}"] = {k: v for k, v in bank.items() if isinstance(v, torch.Tensor)}
    if not found:
        raise KeyError(f"no model state in checkpoint keys {sorted(state)}")
    return found


def train_teacher(folder: Path) -> Path:
    """The runs' teacher, trained here on one thread (the session's shared teacher fixture uses every
    core, whose float sums differ with the core count: the weights would differ between machines)."""
    from ickd.engine import train
    from tests.helpers import compose_config

    summary = train(compose_config("stage=teacher", "trainer.epochs=3", "model=resnet8", "trainer.threads=1",
                                   "trainer.deterministic=true"), folder)
    assert summary["status"] == "completed"
    return folder


@pytest.mark.slow
def test_seeded_runs_end_with_the_recorded_weights(tmp_path):
    recorded = json.loads(GOLDEN.read_text())
    got = run_all(tmp_path, train_teacher(tmp_path / "teacher"))
    assert set(got) == set(recorded["runs"])
    exact = recorded["fingerprint"] == fingerprint()
    for run, models in recorded["runs"].items():
        for model, ref in models.items():
            new = got[run][model]
            if exact:
                assert new["sha256"] == ref["sha256"], f"{run}/{model}: weights changed (bit-level)"
            else:
                assert new["sumsq"] == pytest.approx(ref["sumsq"], rel=1e-4), f"{run}/{model}"


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = run_all(Path(tmp), train_teacher(Path(tmp) / "teacher"))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"fingerprint": fingerprint(), "runs": runs}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
