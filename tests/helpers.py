"""Compose real run configs from configs/ exactly as `ickd train` does (Hydra compose API)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ickd.config_store import compose_run_config
from ickd.engine import Callback

REPO = Path(__file__).resolve().parent.parent

# A fast CPU run on the synthetic dataset: 512 train / 128 val images, 16 batches an epoch.
FAST = [
    "dataset=synthetic",
    "teacher=resnet8",
    "student=resnet8",
    "optim=sgd_cosine",
    "optim.lr=0.1",
    "trainer.epochs=2",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=128",
    "trainer.device=cpu",
    "trainer.progress=off",
    "memory.k=4",
]


def compose_config(*overrides: str, base: list[str] | None = None) -> DictConfig:
    return compose_run_config([*(FAST if base is None else base), *overrides])


class StopAfter(Callback):
    """Asks the trainer to stop once epoch ``epochs`` has ended (an interrupted run, for resume tests)."""

    def __init__(self, epochs: int) -> None:
        self.epochs, self.seen = epochs, 0

    def on_epoch_end(self, epoch, metrics):
        self.seen = epoch

    def should_stop(self):
        return self.seen >= self.epochs


def run_ickd(*args: str, cwd: Path, timeout: float = 300, check: bool = True):
    """The `ickd` command in a fresh process (as users run it), in folder ``cwd``."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ickd.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    import time

    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def jobs_status_showing(launch: str, words: list[str], cwd: Path, timeout: float = 120) -> str:
    """`ickd jobs status LAUNCH` once its output contains every one of ``words``."""
    def check():
        out = run_ickd("jobs", "status", launch, cwd=cwd).stdout
        return out if all(w in out for w in words) else None

    return wait_for(check, timeout, f"`ickd jobs status {launch}` to show {words}", every=2)
