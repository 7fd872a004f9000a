"""Build everything a run needs from its (Hydra-composed) config and train it.

This is the core's public entry point: ``ickd train`` calls it, and sweeps, launchers and trackers
(later layers) call it too, passing their callbacks.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from ickd.data import build_data
from ickd.distill import build_distiller
from ickd.engine import distributed
from ickd.engine.callbacks import Callback
from ickd.engine.trainer import Trainer, TrainerConfig, resolve_device, seed_everything, write_config_yaml
from ickd.errors import ConfigError
from ickd.runs.rundir import RunDir

log = logging.getLogger(__name__)


def to_container(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def run_name(cfg: Mapping[str, Any]) -> str:
    if cfg["name"]:
        return str(cfg["name"])
    if cfg["stage"] == "teacher":
        model = (cfg["model"] or cfg["teacher"])["name"]
        return f"teacher-{model}-{cfg['dataset']['name']}"
    return f"{cfg['distill']['name']}-{cfg['paradigm']['name']}-{cfg['student']['name']}-{cfg['dataset']['name']}"


def build_data_from_config(cfg: Mapping[str, Any]):
    ds = cfg["dataset"]
    return build_data(
        str(ds["name"]),
        root=ds["root"],
        download=bool(ds["download"]),
        train_subset=ds["train_subset"],
        val_subset=ds["val_subset"],
        seed=int(ds["subset_seed"]),
        holdout=ds["holdout"],
        **dict(ds["kwargs"] or {}),
    )


def train(cfg: DictConfig | Mapping[str, Any], out_dir: str | os.PathLike, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train the run described by ``cfg`` into ``out_dir``; returns the summary (also result.json).

    With WORLD_SIZE > 1 in the environment (torchrun, submitit, ``from_slurm_env``) this process is
    one rank of a data-parallel run (:mod:`ickd.engine.distributed`): every rank calls ``train`` with
    the same config and ``out_dir`` (on a shared filesystem); only rank 0 writes files and calls
    ``callbacks``.
    """
    config = to_container(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer_cfg = TrainerConfig.from_mapping(config["trainer"])
    world = distributed.env_world_size()
    # Checked before joining the process group, so a bad config fails fast on every rank.
    distributed.per_rank_batch(trainer_cfg.batch_size, world, "trainer.batch_size")
    distributed.per_rank_batch(trainer_cfg.eval_batch_size, world, "trainer.eval_batch_size")
    if trainer_cfg.threads:
        torch.set_num_threads(int(trainer_cfg.threads))
    seed = int(config["seed"])
    seed_everything(seed, trainer_cfg.deterministic)
    device = resolve_device(trainer_cfg.device)
    dist_env = distributed.init_distributed(device.type)
    if dist_env.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)

    data = build_data_from_config(config)
    mem_size = config["memory"]["size"]
    if mem_size is not None and int(mem_size) > data.num_train:
        raise ConfigError(
            f"memory.size={mem_size} is larger than the training set of {config['dataset']['name']} "
            f"(N={data.num_train}); use memory.size=null (the whole set) or a value <= {data.num_train}"
        )
    distiller = build_distiller(config, data.num_classes, data.in_channels, data.num_train, device,
                                image_size=int(getattr(data, "image_size", 32)))
    trainer = Trainer(
        distiller,
        data,
        trainer_cfg,
        config["optim"],
        out,
        seed=seed,
        run_name=run_name(config),
        stage=str(config["stage"]),
        run_config=config,
        callbacks=callbacks,
        device=device,
        dist_env=dist_env,
    )
    # A resumed run's config.yaml is written by Trainer.resume once its config check passed: a refused
    # resume must not relabel the run folder.
    if dist_env.is_main and trainer.find_resume_checkpoint() is None:
        write_config_yaml(RunDir(out).config, config)
    log.info(
        "run %s: %s, %d train / %d holdout / %d test samples, output %s",
        trainer.run_info.name, data.source, data.num_train, getattr(data, "num_holdout", 0), data.num_val, out,
    )
    return trainer.fit()
