"""W&B checkpoint artifacts as a resume source: ``trainer.resume=wandb:[[ENTITY/]PROJECT/]NAME[:ALIAS]``.

The core trainer knows only local files (``trainer.resume`` = auto | never | PATH), so the
application layer (``ickd train``, launched runs, study trials) calls :func:`resolve_resume` before
it calls the trainer: it downloads the artifact with ``wandb.Api`` into the run folder
(``checkpoints/wandb/<artifact>/``) and hands the trainer that local ``last.pt``. The trainer's
resume config check (``RESUME_MUTABLE_KEYS``) applies to it like to any other checkpoint.

- A run folder that already has its own ``checkpoints/last.pt`` (a requeue of a run that started
  from an artifact) resumes from that, newer, file: the artifact is not downloaded again.
- NAME is the artifact's name as ``logger.log_checkpoints`` writes it (``<W&B run id>-last``);
  ALIAS defaults to ``latest`` (``epoch-<n>`` and ``v<k>`` pin one). Without PROJECT (or ENTITY)
  the run config's ``logger.project`` (``logger.entity``, else the API key's default entity) apply.
- The W&B run the checkpoint came from continues (its id goes to the folder's ``wandb_run_id``)
  unless the layer above names the run (launch and study runs have their own ids).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ickd.errors import ConfigError
from ickd.runs.atomic import atomic_write_text
from ickd.runs.rundir import RunDir

log = logging.getLogger("ickd.track")

PREFIX = "wandb:"
CHECKPOINT_TYPE = "checkpoint"
_PART = r"[A-Za-z0-9_.\-]+"
_REF = re.compile(rf"^(?:(?:(?P<entity>{_PART})/)?(?P<project>{_PART})/)?(?P<name>{_PART})(?::(?P<alias>{_PART}))?$")
_COMPLETE = ".complete"


def is_artifact_ref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def artifact_path(ref: str, logger: Mapping[str, Any] | None = None) -> str:
    """``wandb:[[ENTITY/]PROJECT/]NAME[:ALIAS]`` -> ``[ENTITY/]PROJECT/NAME:ALIAS`` for ``wandb.Api().artifact``
    (PROJECT and ENTITY from the ``logger`` section when left out; ALIAS ``latest``)."""
    logger = logger or {}
    match = _REF.match(ref[len(PREFIX):] if ref.startswith(PREFIX) else ref)
    if not match:
        raise ConfigError(
            f"trainer.resume={ref!r} is not a W&B artifact reference; write trainer.resume=wandb:ENTITY/PROJECT/NAME:ALIAS "
            "(e.g. wandb:mylab/ickd/<run id>-last:latest; ENTITY/PROJECT default to logger.entity/logger.project)"
        )
    project = match["project"] or logger.get("project") or "ickd"
    entity = match["entity"] or (logger.get("entity") if not match["project"] else None)
    return "/".join(p for p in (entity, project, f"{match['name']}:{match['alias'] or 'latest'}") if p)


def _default_api() -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError(f"trainer.resume=wandb:... needs the wandb package ({exc}); install it with `pip install -e '.[wandb]'`") from exc
    return wandb.Api()


def _with_resume(cfg: Any, value: str) -> Any:
    """A copy of ``cfg`` (DictConfig or mapping) with ``trainer.resume`` set to ``value``."""
    from omegaconf import DictConfig, OmegaConf, open_dict, read_write

    if isinstance(cfg, DictConfig):
        out = copy.deepcopy(cfg)
        with read_write(out), open_dict(out):
            OmegaConf.update(out, "trainer.resume", value, merge=False)
        return out
    out = copy.deepcopy(dict(cfg))
    out["trainer"] = {**dict(out.get("trainer") or {}), "resume": value}
    return out


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.select(cfg, key, default=None)
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _checkpoint_in(folder: Path, ref: str) -> Path:
    candidates = [folder / RunDir.LAST] + sorted(p for p in folder.rglob("*.pt") if p.name != RunDir.LAST)
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"W&B artifact {ref} holds no checkpoint file (*.pt) in {folder}; resume from a `<run id>-last` artifact, which logger.log_checkpoints=true writes")


def _continue_wandb_run(out_dir: Path, metadata: Mapping[str, Any]) -> None:
    """Let the W&B logger continue the run the checkpoint came from (unless the folder has one)."""
    from ickd.track.wandb_logger import _VALID_ID  # same layer; wandb_logger imports this module's callers

    run_id, epoch = metadata.get("run_id"), metadata.get("epoch")
    run_dir = RunDir(out_dir)
    if not isinstance(run_id, str) or not _VALID_ID.match(run_id) or run_dir.wandb_run_id.exists():
        return
    atomic_write_text(run_dir.wandb_run_id, run_id + "\n")
    if isinstance(epoch, int):  # W&B already has the epochs up to the checkpoint's
        atomic_write_text(run_dir.wandb_last_epoch, f"{epoch}\n")


def resolve_resume(cfg: Any, out_dir: str | os.PathLike, api: Callable[[], Any] | None = None, wait_s: float = 900.0) -> Any:
    """``cfg`` unchanged unless ``trainer.resume`` is a ``wandb:`` reference; then a copy whose
    ``trainer.resume`` is the local checkpoint (downloaded into the run folder) or ``auto`` when the
    folder has its own ``checkpoints/last.pt``. ``api`` makes the ``wandb.Api`` (tests pass a
    stand-in). In a multi-rank job rank 0 downloads and the other ranks wait for it (up to
    ``wait_s``) on the shared run folder."""
    value = _select(cfg, "trainer.resume")
    if not is_artifact_ref(value):
        return cfg
    out = Path(out_dir)
    own = RunDir(out).last_checkpoint
    if own.is_file():
        log.info("trainer.resume=%s: %s has its own, newer checkpoint %s; resuming from that", value, out, own)
        return _with_resume(cfg, "auto")
    logger = _select(cfg, "logger")
    ref = artifact_path(value, logger if isinstance(logger, Mapping) else None)
    folder = RunDir(out).downloads / re.sub(r"[^A-Za-z0-9_.\-]+", "_", ref)
    done = folder / _COMPLETE
    if int(os.environ.get("RANK") or 0) > 0:
        end = time.time() + wait_s
        while not done.is_file():
            if time.time() > end:
                raise ConfigError(f"rank {os.environ.get('RANK')}: rank 0 did not download W&B artifact {ref} into {folder} within {wait_s:.0f} s; is the run folder on a shared filesystem?")
            time.sleep(1.0)
    elif not done.is_file():
        try:
            artifact = (api or _default_api)().artifact(ref, type=CHECKPOINT_TYPE)
        except ConfigError:
            raise
        except Exception as exc:  # wandb raises CommError/ValueError for unknown names, missing keys, no network
            raise ConfigError(
                f"trainer.resume={value}: cannot fetch W&B artifact {ref} ({type(exc).__name__}: {exc}). Check the name "
                "(`<run id>-last`, see the run's Artifacts tab), that this machine is online and logged in (`wandb login` "
                "or WANDB_API_KEY), or resume from a local file with trainer.resume=PATH"
            ) from exc
        folder.mkdir(parents=True, exist_ok=True)
        artifact.download(root=str(folder))
        metadata = dict(getattr(artifact, "metadata", None) or {})
        atomic_write_text(done, json.dumps({"artifact": ref, "metadata": metadata}, sort_keys=True) + "\n")
        _continue_wandb_run(out, metadata)
    path = _checkpoint_in(folder, ref)
    log.info("trainer.resume=%s: resuming from W&B artifact %s, downloaded to %s", value, ref, path)
    return _with_resume(cfg, str(path))
