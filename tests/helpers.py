"""Compose real run configs from configs/ exactly as `ickd train` does (Hydra compose API)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ickd.config_store import compose_run_config

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
