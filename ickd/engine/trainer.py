"""The training loop: one step per batch (``ickd.engine.step.TrainStep``), per-epoch evaluation, atomic checkpoints and
exact resume. Everything above the core plugs in through :mod:`ickd.engine.callbacks`."""
from __future__ import annotations

import ast
import contextlib
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from ickd.distill import Distiller
from ickd.engine import distributed
from ickd.engine.callbacks import Callback, CallbackList, MetricsFile, RunInfo
from ickd.engine.checkpoint import atomic_link, atomic_write_text, load_checkpoint, save_checkpoint
from ickd.engine.distributed import DistEnv
from ickd.engine.optim import build_optimizer, build_scheduler
from ickd.engine.progress import ProgressTracker, format_duration
from ickd.engine.step import EpochMeters, TrainStep
from ickd.errors import CheckpointError, ConfigError, DiskWriteError, NonFiniteLossError
from ickd.runs.rundir import RunDir

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
#: The newest checkpoint that carries every memory bank training changes, kept beside last.pt when
#: trainer.bank_checkpoint_every > 1 (a hard link to the last.pt it was).
WITH_BANK_FILE = RunDir.WITH_BANK
#: A bank's M-sized entries: what a checkpoint leaves out of a bank the resume rebuilds.
BANK_ENTRIES = ("feats", "logits", "labels", "sample_idx")

# Config keys a resumed run may change (a key matches itself and everything under it): they change
# how long, where, how fast or how visibly a run trains, never what it trains, so the resumed run is
# still the run its folder is labelled as. `memory.backend` & co. pick among exact-equivalent
# searches or a declared approximation (faiss_ivf). Every other key (method, models, teacher
# checkpoint, data, optimiser, seed, batch limits) must equal the checkpoint's: otherwise resuming
# would silently relabel the run (docs/design.md, "Resume safety").
RESUME_MUTABLE_KEYS = (
    "trainer.epochs", "trainer.progress", "trainer.progress_interval_s", "trainer.resume", "trainer.resume_config_check", "trainer.threads",
    "trainer.num_workers", "trainer.eval_batch_size", "trainer.eval_every", "trainer.checkpoint_every", "trainer.bank_checkpoint_every",
    "trainer.nonfinite_check_every", "trainer.device", "trainer.pipeline", "trainer.step",
    "logger", "name", "hydra",
    "memory.backend", "memory.nlist", "memory.nprobe", "memory.use_gpu",
)
RESUME_DIFFS_SHOWN = 10
# Keys the typed configs (ickd.config_schema) added with the value their absence meant: a checkpoint
# written before them, resumed under that value, continues the same config.
ADDED_KEYS: dict[str, Any] = {"pair": None, "model": None, "teacher.trust_checkpoint": False, "optim.min_lr_factor": 0.0}


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()  # a key one of the two configs does not have


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as JSON data (dicts, lists, strings, numbers, bools, None): what a checkpoint stores
    (``torch.load(weights_only=True)`` reads it back) and what resume compares."""
    return json.loads(json.dumps(config, default=str))


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, Mapping) and config:
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: config}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def resume_mutable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MUTABLE_KEYS)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, checkpoint's value, this run's value) for every key outside
    ``RESUME_MUTABLE_KEYS`` that differs; method/model names first, so the headline change shows."""
    old, new = _flatten(plain_config(saved)), _flatten(plain_config(current))
    keys = [k for k in set(old) | set(new) if not resume_mutable(k) and not _same(old.get(k, _ABSENT), new.get(k, _ABSENT))
            and not (k not in old and k in ADDED_KEYS and _same(new[k], ADDED_KEYS[k]))]
    keys.sort(key=lambda k: (not (k == "stage" or k.endswith(".name")), k))
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys]


def format_differences(diffs: list[tuple[str, Any, Any]], shown: int = RESUME_DIFFS_SHOWN) -> str:
    def value(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 80 else text[:77] + "..."

    lines = [f"  {k}: {value(a)} -> {value(b)}" for k, a, b in diffs[:shown]]
    if len(diffs) > shown:
        lines.append(f"  and {len(diffs) - shown} more")
    return "\n".join(lines)


def write_config_yaml(path: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """The run folder's ``config.yaml``: its label (what `ickd report` and users read)."""
    from omegaconf import OmegaConf

    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(dict(config))))


class _Interrupted(Exception):
    """A callback asked to stop mid-epoch; carries the epoch's progress for the checkpoint."""

    def __init__(self, partial: dict[str, Any]) -> None:
        super().__init__("interrupted")
        self.partial = partial


@dataclass(kw_only=True)
class TrainerConfig:
    """The trainer's settings. No defaults here: configs/trainer/default.yaml states them (one place);
    build it with :meth:`from_mapping` from a composed config's ``trainer`` section."""

    epochs: int
    batch_size: int
    eval_batch_size: int
    device: str
    amp: str  # auto (bf16 on CUDA) | bf16 | off
    channels_last: str  # auto (on CUDA) | on | off
    deterministic: bool
    num_workers: int
    checkpoint_every: int
    bank_checkpoint_every: int  # epochs between checkpoints carrying a bank that training changes (see Trainer.save)
    resume: str  # auto | never | PATH to a last.pt
    progress: str  # auto (bar on a terminal, else log lines) | on (bar) | off (neither)
    progress_interval_s: float  # seconds between progress lines/progress.json ticks inside an epoch; 0 disables
    max_batches_per_epoch: int | None
    eval_every: int
    threads: int | None
    nonfinite_check_every: int | None  # batches between NaN/inf checks (each syncs the device); None: 1 on CPU, 50 on CUDA
    pipeline: str  # auto (the dataset's default) | device | classic
    step: str  # auto (graph on CUDA when the step allows it) | eager | graph
    resume_config_check: bool  # refuse to resume a checkpoint written under another config (RESUME_MUTABLE_KEYS may differ)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "TrainerConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown trainer keys {unknown}; valid keys: {sorted(known)}")
        missing = sorted(known - set(cfg))
        if missing:
            raise ConfigError(f"trainer keys {missing} are missing; compose the config (configs/trainer/default.yaml states every default)")
        tc = cls(**{k: v for k, v in cfg.items()})
        if tc.epochs <= 0 or tc.batch_size <= 0:
            raise ConfigError(f"trainer.epochs={tc.epochs} and trainer.batch_size={tc.batch_size} must be > 0")
        if not isinstance(tc.bank_checkpoint_every, int) or isinstance(tc.bank_checkpoint_every, bool) or tc.bank_checkpoint_every < 1:
            raise ConfigError(f"trainer.bank_checkpoint_every={tc.bank_checkpoint_every!r} must be an integer >= 1")
        if tc.step not in STEP_MODES:
            raise ConfigError(f"trainer.step={tc.step!r} is not valid; use one of: {', '.join(STEP_MODES)}")
        if not isinstance(tc.resume_config_check, bool):
            raise ConfigError(f"trainer.resume_config_check={tc.resume_config_check!r} must be true or false")
        if isinstance(tc.progress, bool):  # YAML 1.1 reads a bare on/off as a boolean
            tc.progress = "on" if tc.progress else "off"
        if tc.progress not in PROGRESS_MODES:
            raise ConfigError(f"trainer.progress={tc.progress!r} is not valid; use one of: {', '.join(PROGRESS_MODES)}")
        if not isinstance(tc.progress_interval_s, (int, float)) or isinstance(tc.progress_interval_s, bool) or tc.progress_interval_s < 0:
            raise ConfigError(f"trainer.progress_interval_s={tc.progress_interval_s!r} must be a number of seconds >= 0 (0 disables the progress lines)")
        if tc.nonfinite_check_every is not None and int(tc.nonfinite_check_every) < 1:
            raise ConfigError(f"trainer.nonfinite_check_every={tc.nonfinite_check_every} must be >= 1 or null (auto)")
        return tc


STEP_MODES = ("auto", "eager", "graph")
PROGRESS_MODES = ("auto", "on", "off")  # auto: a tqdm bar on a terminal, log lines off one; on: the bar; off: neither


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available here; use trainer.device=cpu or auto")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _best_of(history: Iterable[Mapping[str, Any]], key: str) -> float | None:
    """Max of ``key`` over the epochs that report it (None when none does)."""
    values = [m[key] for m in history if isinstance(m.get(key), (int, float))]
    return max(values) if values else None


def _at_selected_epoch(history: Iterable[Mapping[str, Any]], key: str) -> float | None:
    """``key`` at the epoch selection picked: the first epoch with the highest ``val/top1`` (the
    epoch best.pt holds). From the history, so a resumed run gives the same answer."""
    best, value = -1.0, None
    for m in history:
        top1 = m.get("val/top1")
        if isinstance(top1, (int, float)) and top1 > best:
            best, value = top1, m.get(key)
    return value


def _bank_digest(bank: Any) -> str:
    """SHA-256 of a bank's entries (bytes on the host): what a rebuilt bank must reproduce."""
    import hashlib

    digest = hashlib.sha256()
    state = bank.state_dict()
    for key in BANK_ENTRIES:
        tensor = state[key].detach().contiguous().cpu()
        digest.update(key.encode())
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@contextlib.contextmanager
def _deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Iterable[int]) -> list[torch.Tensor]:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.unsqueeze(1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


class Trainer:
    """Train ``distiller`` on ``data`` (an :class:`ickd.data.DataBundle`) into ``out_dir``."""

    # The config this run's checkpoints record and its config.yaml shows: the resolved run config,
    # or, after a resume that kept going past differences (trainer.resume_config_check=false), the
    # checkpoint's own; None until resume decides (then run_config is used).
    _label_config: dict[str, Any] | None = None

    def __init__(
        self,
        distiller: Distiller,
        data: Any,
        trainer_cfg: TrainerConfig,
        optim_cfg: Mapping[str, Any],
        out_dir: str | os.PathLike,
        *,
        seed: int = 0,
        run_name: str = "run",
        stage: str = "student",
        run_config: dict[str, Any] | None = None,
        callbacks: list[Callback] | None = None,
        device: torch.device | None = None,
        dist_env: DistEnv | None = None,
    ) -> None:
        self.cfg = trainer_cfg
        self.distiller = distiller
        self.data = data
        self.seed = seed
        self.out_dir = Path(out_dir)
        self.run_dir = RunDir(self.out_dir)  # every file name of the run folder
        self.ckpt_dir = self.run_dir.checkpoints
        self.device = device or resolve_device(trainer_cfg.device)
        self.dist = dist_env or DistEnv.current()
        self.run_info = RunInfo(self.out_dir, run_name, stage, run_config or {}, total_epochs=trainer_cfg.epochs)
        # Only rank 0 writes metrics and runs callbacks; its decisions are broadcast (_agree).
        self.callbacks = CallbackList([MetricsFile(self.run_dir.metrics), *(callbacks or [])] if self.dist.is_main else [])
        cuda = self.device.type == "cuda"
        self.optimizer = build_optimizer(distiller.trainable_parameters(), optim_cfg, fused=cuda)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, trainer_cfg.epochs)
        amp = trainer_cfg.amp if trainer_cfg.amp != "auto" else ("bf16" if cuda else "off")
        if amp not in ("bf16", "off"):
            raise ConfigError(f"trainer.amp={trainer_cfg.amp!r} is not valid; use auto, bf16 or off")
        self.autocast_dtype = torch.bfloat16 if amp == "bf16" else None
        cl = trainer_cfg.channels_last
        self.channels_last = (cl == "auto" and cuda) or cl in ("on", True)
        if self.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.start_epoch = 0
        self._bank_epoch: int | None = None  # epoch of the newest checkpoint carrying the changing banks
        self._banks_in_last = True  # whether last.pt carries them
        self._fingerprints: dict[str, str] = {}  # rebuilt banks: their entries' digest (frozen: computed once)
        self._fill_batch: int | None = None  # the fill pass's batch if not eval_batch_size (a rebuild uses the original's)
        self.partial: dict[str, Any] | None = None  # progress inside an epoch, from a mid-epoch checkpoint
        self.best_top1 = -1.0
        self.history: list[dict[str, Any]] = []
        self._ddp: torch.nn.Module | None = None
        self._shard: dict[str, int] = {}  # loader kwargs of this rank's data shard (none: one process)
        batch, self._eval_batch = trainer_cfg.batch_size, trainer_cfg.eval_batch_size
        if self.dist.world_size > 1:
            world = self.dist.world_size
            self._shard = {"rank": self.dist.rank, "world_size": world}
            batch = distributed.per_rank_batch(batch, world, "trainer.batch_size")
            self._eval_batch = distributed.per_rank_batch(self._eval_batch, world, "trainer.eval_batch_size")
            for name, bank in list(distiller.banks.items()):
                if not isinstance(bank, distributed.GatheredBank):  # a distiller reused by a second Trainer
                    distiller.banks[name] = distributed.GatheredBank(bank)
            self._ddp = distributed.wrap_ddp(distiller, self.device)
        # Interrupt polls cost a collective per batch with several ranks: skip them when no callback
        # of rank 0 can ask (rank 0's answer is shared once, here).
        self._interruptible = self._agree(any(type(cb).interrupt_requested is not Callback.interrupt_requested for cb in self.callbacks.callbacks))
        self.step_mode = self.resolve_step_mode()
        self.check_every = int(trainer_cfg.nonfinite_check_every or (50 if cuda else 1))
        self.meters = EpochMeters(self.device)
        # The one owner of a training step (graph or eager); the loop only asks it for steps.
        self.step = TrainStep(distiller, self.optimizer, self.meters,
                              forward=distiller.forward_train if self._ddp is None else self._ddp, device=self.device,
                              autocast_dtype=self.autocast_dtype, channels_last=self.channels_last,
                              mode=self.step_mode, batch_size=batch)
        self.pipeline = data.check_pipeline(trainer_cfg.pipeline)
        self._loader_kw = {"device": self.device, "num_workers": trainer_cfg.num_workers, "pipeline": self.pipeline, **self._shard}
        self.train_loader = data.train_loader(batch, shuffle=True, augment=True, seed=seed, **self._loader_kw)
        self.val_loader = data.val_loader(self._eval_batch, **self._loader_kw)
        # dataset.holdout: a split of the train set; with one, it (not the test set) selects best.pt.
        self.holdout_loader = data.holdout_loader(self._eval_batch, **self._loader_kw) if getattr(data, "num_holdout", 0) else None
        self.selection_split = "holdout" if self.holdout_loader is not None else "test"
        # Progress lines off a terminal and the run folder's progress.json (rank 0 only).
        self.progress = ProgressTracker(
            self.run_dir.progress if self.dist.is_main else None,
            epochs=trainer_cfg.epochs, eval_every=trainer_cfg.eval_every, interval_s=trainer_cfg.progress_interval_s,
            log_lines=self.dist.is_main and self._progress_mode() == "lines", logger=log,
            eval_images=int(getattr(data, "num_val", 0) or 0) + int(getattr(data, "num_holdout", 0) or 0),
            world_size=self.dist.world_size,
        )

    # --- one step ----------------------------------------------------------------------------
    def resolve_step_mode(self) -> str:
        mode = self.cfg.step
        cuda = self.device.type == "cuda"
        if mode == "graph" and not cuda:
            raise ConfigError(f"trainer.step=graph needs a CUDA device (this run uses {self.device}); use trainer.step=auto or eager")
        if mode == "graph" and self.dist.world_size > 1:
            raise ConfigError("trainer.step=graph does not support multi-process (DDP) training yet; use trainer.step=auto or eager")
        if mode == "auto":
            mode = "graph" if cuda and self.dist.world_size == 1 else "eager"
        log.info("training step: %s", mode)
        return mode

    # --- loops -------------------------------------------------------------------------------
    def _batches_per_epoch(self) -> int:
        limit = self.cfg.max_batches_per_epoch
        return len(self.train_loader) if limit is None else min(limit, len(self.train_loader))

    def _progress_mode(self) -> str:
        """``bar`` (tqdm), ``lines`` (a log line every trainer.progress_interval_s) or ``off``."""
        mode = self.cfg.progress
        if mode in ("on", True):
            return "bar"
        if mode == "auto":
            return "bar" if sys.stderr.isatty() else "lines"
        return "off"

    def _progress(self, iterable, total: int, desc: str):
        if self._progress_mode() != "bar" or not self.dist.is_main:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)

    def train_epoch(self, epoch: int, partial: Mapping[str, Any] | None = None) -> dict[str, float]:
        """One epoch; ``partial`` (from a mid-epoch checkpoint) continues it after its last batch."""
        self.distiller.train()
        self.train_loader.set_epoch(epoch)
        limit = self.cfg.max_batches_per_epoch
        n_batches = len(self.train_loader) if limit is None else min(limit, len(self.train_loader))
        first = int(partial["step"]) if partial else 0
        self.meters.reset(partial)
        seen = int(partial["seen"]) if partial else 0
        done = first
        start = time.perf_counter() - (float(partial["elapsed_s"]) if partial else 0.0)
        # The epoch's order and augmentation depend only on (seed, epoch), so skipping the batches
        # already trained reproduces exactly the batches an uninterrupted run would see next.
        batches = itertools.islice(iter(self.train_loader), first, n_batches)
        bar = self._progress(batches, n_batches - first, f"epoch {epoch + 1}/{self.cfg.epochs}")
        self.progress.epoch_started(epoch, n_batches, first)
        for step, (x, y, idx) in enumerate(bar, start=first):
            total, losses, stats, logits = self.step(x, y, idx, epoch)
            seen += y.shape[0]
            if (step + 1) % self.check_every == 0 or step + 1 == n_batches:
                self.check_finite(epoch)
            if hasattr(bar, "set_postfix") and step % 20 == 0:
                bar.set_postfix(loss=f"{total.item():.3f}")
            done = step + 1
            self.progress.batch_done(done, y.shape[0])  # a clock check; a line/progress.json when due
            if self._interrupt_requested():
                self.check_finite(epoch)
                raise _Interrupted({
                    "epoch": epoch, "step": done, "sums": {k: v.item() for k, v in self.meters.sums.items()},
                    "correct": self.meters.correct.item(), "seen": seen, "elapsed_s": time.perf_counter() - start,
                })
        self.progress.epoch_trained()
        sums, correct = self.meters.sums, self.meters.correct
        if self.dist.world_size > 1:
            sums, correct, seen = self._reduce_epoch(sums, correct, seen)
        elapsed = time.perf_counter() - start
        metrics = {f"train/{k}": (v / max(1, done)).item() for k, v in sums.items()}
        metrics["train/top1"] = 100.0 * correct.item() / max(1, seen)
        metrics["time/epoch_s"] = elapsed
        metrics["time/images_per_s"] = seen / max(elapsed, 1e-9)
        return metrics

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision on every rank (callbacks run on rank 0 only)."""
        return distributed.agree(flag) if self.dist.world_size > 1 else flag

    def _interrupt_requested(self) -> bool:
        if self.dist.world_size == 1:
            return self.callbacks.interrupt_requested()
        return self._interruptible and self._agree(self.callbacks.interrupt_requested())

    def _reduce_epoch(self, sums: dict[str, torch.Tensor], correct: torch.Tensor, seen: int):
        """Train metrics of the whole global batch: loss/stat sums averaged over ranks, hits and
        samples summed. Also syncs rank 0's buffers (BN statistics) to all ranks."""
        distributed.broadcast_buffers(self.distiller)
        keys = sorted(sums)
        packed = torch.stack([sums[k].double() for k in keys] + [correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=correct.device)])
        distributed.all_reduce_sum(packed)
        world = self.dist.world_size
        return {k: packed[i] / world for i, k in enumerate(keys)}, packed[-2], int(packed[-1].item())

    def check_finite(self, epoch: int) -> None:
        found = self.meters.nonfinite()
        step, bad = found if found else (-1, [])
        if self.dist.world_size > 1 and distributed.any_rank(bool(found)) and not found:
            bad = [f"(on another rank than rank {self.dist.rank})"]  # every rank stops together
        if bad:
            where = f", batch {step + 1}" if step >= 0 else ""
            raise NonFiniteLossError(
                f"loss component(s) {bad} became NaN/inf at epoch {epoch + 1}{where}; the run stopped and "
                f"its last good checkpoint is kept in {self.ckpt_dir}. Lower optim.lr, the loss weights or the "
                "temperature, or turn trainer.amp=off, then resume or restart."
            )

    @torch.no_grad()
    def _accuracy(self, loader: Any, models: Mapping[str, torch.nn.Module]) -> dict[str, tuple[float, float]]:
        """Model name -> (top-1, top-5) in percent over ``loader`` (all ranks' shards together)."""
        counts = {name: [torch.zeros((), device=self.device) for _ in range(2)] for name in models}
        total = 0
        for x, y, _ in loader:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.step.autocast():
                for name, model in models.items():
                    logits, _ = model(x)
                    c1, c5 = topk_correct(logits.float(), y, (1, 5))
                    counts[name][0] += c1
                    counts[name][1] += c5
            total += y.shape[0]
        if self.dist.world_size > 1:  # each rank evaluated its shard of the split
            packed = torch.stack([c.float() for name in models for c in counts[name]] + [torch.tensor(float(total), device=self.device)])
            distributed.all_reduce_sum(packed)
            counts = {name: [packed[2 * i], packed[2 * i + 1]] for i, name in enumerate(models)}
            total = int(packed[-1].item())
        return {name: (100.0 * c[0].item() / max(1, total), 100.0 * c[1].item() / max(1, total)) for name, c in counts.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``test/*`` (the dataset's test split), ``holdout/*`` (with dataset.holdout) and ``val/*``:
        the selection split (holdout when there is one, else test) that picks best.pt and
        ``best_top1``. Extra models (online peers, EMA) report ``val_<name>/*`` on the selection
        split, plus ``test_<name>/top1`` when that is the holdout."""
        metrics: dict[str, float] = {}
        models = self.distiller.eval_models()
        for model in models.values():
            model.eval()
        test = self._accuracy(self.val_loader, models)
        held = self._accuracy(self.holdout_loader, models) if self.holdout_loader is not None else None
        selection = held if held is not None else test
        for i, name in enumerate(models):
            if i == 0:
                metrics["test/top1"], metrics["test/top5"] = test[name]
                if held is not None:
                    metrics["holdout/top1"], metrics["holdout/top5"] = held[name]
            elif held is not None:
                metrics[f"test_{name}/top1"] = test[name][0]
            prefix = "val" if i == 0 else f"val_{name}"
            metrics[f"{prefix}/top1"], metrics[f"{prefix}/top5"] = selection[name]
        return metrics

    # --- checkpoints -------------------------------------------------------------------------
    def _rebuilt_banks(self) -> list[str]:
        """Banks a resume rebuilds instead of loading: filled by a no-grad pass of a frozen teacher
        before training and never written after it (memory.update=frozen), so the pass, run again,
        gives them back exactly (checked against their digest)."""
        if not self.distiller.banks or self.distiller.bank_fill_source() is None:
            return []
        return [name for name, bank in self.distiller.banks.items() if getattr(bank, "update_rule", None) == "frozen"]

    def _fingerprint(self, name: str) -> str:
        if name not in self._fingerprints:
            self._fingerprints[name] = _bank_digest(self.distiller.banks[name])
        return self._fingerprints[name]

    def _distiller_state(self, with_banks: bool) -> dict[str, Any]:
        state = self.distiller.training_state()
        banks = state.get("banks", {})
        rebuilt = self._rebuilt_banks()
        for name in list(banks):
            if name in rebuilt:
                banks[name] = {"rebuilt_on_resume": True, "fingerprint": self._fingerprint(name), "fill_batch": self._fill_batch or self._eval_batch,
                               "state": {k: v for k, v in banks[name].items() if k not in BANK_ENTRIES}}
            elif not with_banks:
                banks[name] = {"saved_in": WITH_BANK_FILE}
        return state

    def _state(self, epoch: int, partial: dict[str, Any] | None = None, with_banks: bool = True) -> dict[str, Any]:
        return {
            "partial": partial,  # None at an epoch boundary
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,  # epochs completed
            "distiller": self._distiller_state(with_banks),
            "bank_epoch": epoch if with_banks else self._bank_epoch,  # the checkpoint that carries the banks
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_top1": self.best_top1,
            "history": self.history,
            "rng": rng_state(),
            "run_name": self.run_info.name,
            "run_config": self._recorded_config(),  # None: run without a config (checked on resume)
        }

    def _recorded_config(self) -> dict[str, Any] | None:
        if self._label_config is not None:
            return self._label_config
        return plain_config(self.run_info.config) if self.run_info.config else None

    def _check_resume_config(self, path: Path, saved: Mapping[str, Any] | None) -> None:
        """Refuse (CheckpointError, exit 2) to continue a checkpoint written under another config:
        it would relabel the run. Only RESUME_MUTABLE_KEYS may differ."""
        current = self.run_info.config
        if not current:
            return  # a Trainer built without its run config (library use): nothing to compare
        if saved is None:
            log.warning(
                "checkpoint %s records no run config (written before ickd checked resumes): cannot check that "
                "this run continues the same config; continuing", path,
            )
            return
        diffs = config_differences(saved, current)
        if not diffs:
            return
        listing = format_differences(diffs)
        if self.cfg.resume_config_check:
            raise CheckpointError(
                f"checkpoint {path} does not match this run's config (checkpoint -> now):\n{listing}\n"
                "Resuming would continue that run under another label. Resume with the original config, use a new run "
                "folder (hydra.run.dir=...), set trainer.resume=never to start afresh, or trainer.resume_config_check=false "
                "to continue anyway (the run keeps its original label)."
            )
        # Continue, but keep recording (and showing in config.yaml) the config the run started with.
        self._label_config = plain_config(saved)
        log.warning(
            "resuming %s although its config differs (trainer.resume_config_check=false); the run keeps its original "
            "label and %s:\n%s", path, RunDir.CONFIG, listing,
        )

    def save(self, epoch: int, is_best: bool, partial: dict[str, Any] | None = None, *, banks: bool = False) -> None:
        """last.pt (and best.pt). Banks training changes are in it every trainer.bank_checkpoint_every
        epochs, at the last epoch, mid-epoch and whenever ``banks`` (a stop or interrupt); a rebuilt
        bank (:meth:`_rebuilt_banks`) never. A full last.pt is also kept as checkpoints/with_bank.pt
        when the next ones may lack the banks, so a resume can start there exactly."""
        changing = [name for name in self.distiller.banks if name not in self._rebuilt_banks()]
        every = self.cfg.bank_checkpoint_every
        with_banks = (not changing or banks or partial is not None or epoch >= self.cfg.epochs
                      or self._bank_epoch is None or epoch - self._bank_epoch >= every)
        if with_banks:
            self._bank_epoch = epoch
        self._banks_in_last = with_banks
        if not self.dist.is_main:  # all ranks hold the same state; rank 0 writes it
            return
        path = self.run_dir.last_checkpoint
        save_checkpoint(path, self._state(epoch, partial, with_banks))
        if changing and with_banks and every > 1:
            atomic_link(path, self.run_dir.with_bank_checkpoint)
        if is_best:
            # The published CIFAR teacher format, so a teacher trained here loads like theirs.
            best = {"model": self.distiller.student.state_dict(), "epoch": epoch, "best_acc": self.best_top1}
            save_checkpoint(self.run_dir.best_checkpoint, best)
        self.callbacks.on_checkpoint(path, epoch)

    def find_resume_checkpoint(self) -> Path | None:
        mode = str(self.cfg.resume)
        if mode in ("never", "false", "False", "none", "None"):
            return None
        if mode == "auto":
            path = self.run_dir.last_checkpoint
            return path if path.is_file() else None
        path = Path(mode)
        if path.is_dir():
            path = RunDir(path).last_checkpoint
        if not path.is_file():
            raise CheckpointError(f"trainer.resume={mode}: no checkpoint at {path}; give a {RunDir.LAST} file, a run folder, or trainer.resume=auto")
        return path

    def resume(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if state.get("version") != CHECKPOINT_VERSION or "distiller" not in state:
            raise CheckpointError(f"{path} is not an ickd training checkpoint (version {state.get('version')}); resume from a {RunDir.CHECKPOINTS}/{RunDir.LAST} written by ickd")
        self._check_resume_config(path, state.get("run_config"))
        banks = state["distiller"].get("banks") or {}
        if any(isinstance(s, dict) and "saved_in" in s for s in banks.values()):
            path, state = self._checkpoint_with_banks(path, state)
            banks = state["distiller"].get("banks") or {}
        rebuilt = [name for name, s in banks.items() if isinstance(s, dict) and s.get("rebuilt_on_resume")]
        if rebuilt:
            self._rebuild_banks(path, banks, rebuilt)
        try:
            self.distiller.load_training_state(state["distiller"])
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(
                f"checkpoint {path} does not match this run's models or memory bank ({exc}). "
                "It was written by a run with another teacher/student/dataset/memory config: resume with the same config, "
                "or set trainer.resume=never to start afresh."
            ) from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"])
        self._bank_epoch = state.get("bank_epoch", self.start_epoch)
        self.partial = state.get("partial")
        self.best_top1 = float(state["best_top1"])
        self.history = list(state["history"])
        set_rng_state(state["rng"])
        # Rewrite the metrics file from the checkpoint's history: epochs after the checkpoint were
        # lost with the interruption and will be run again, so they must not be counted twice.
        lines = "".join(json.dumps(m, sort_keys=True) + "\n" for m in self.history)
        if self.dist.is_main:
            self.run_dir.write_metrics(lines)
            label = self._recorded_config()
            if label is not None:  # only now that the config check passed (run.py skips it on resume)
                write_config_yaml(self.run_dir.config, label)
        where = f", batch {self.partial['step']}" if self.partial else ""
        log.info("resumed from %s at epoch %d%s", path, self.start_epoch, where)

    def _checkpoint_with_banks(self, path: Path, state: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        """``path`` lacks the banks that training changes (trainer.bank_checkpoint_every): resume from
        checkpoints/with_bank.pt, the newest checkpoint with them, and train the epochs since then
        again (exact: every epoch depends only on the state at its start). Refused when that file is
        gone or is not the one ``path`` names."""
        full = path.parent / WITH_BANK_FILE
        wanted = state.get("bank_epoch")
        if not full.is_file():
            raise CheckpointError(
                f"checkpoint {path} (epoch {state['epoch']}) holds no memory bank (trainer.bank_checkpoint_every) and "
                f"{full}, the checkpoint of epoch {wanted} that holds it, is missing: the run cannot be resumed exactly. "
                "Put that file back, or start afresh with trainer.resume=never."
            )
        older = load_checkpoint(full, map_location=self.device)
        if older.get("version") != CHECKPOINT_VERSION or older.get("epoch") != wanted or older.get("run_name") != state.get("run_name"):
            raise CheckpointError(
                f"{full} is not the checkpoint of epoch {wanted} that {path} names for its memory bank "
                f"(it is epoch {older.get('epoch')} of run {older.get('run_name')!r}): the run cannot be resumed exactly. "
                "Start afresh with trainer.resume=never."
            )
        log.warning(
            "%s (epoch %d) holds no memory bank; resuming from %s (epoch %d), the newest checkpoint with it: "
            "epochs %d-%d are trained again", path, int(state["epoch"]), full, wanted, wanted + 1, int(state["epoch"]),
        )
        return full, older

    def _rebuild_banks(self, path: Path, banks: dict[str, Any], names: list[str]) -> None:
        """Refill the banks a checkpoint left out (:meth:`_rebuilt_banks`) with the fill pass, check
        their entries against the digest saved, and put their (small) saved state over them."""
        self._fill_batch = int(banks[names[0]].get("fill_batch", self._eval_batch))
        log.info("rebuilding the frozen memory bank(s) %s with the fill pass (the checkpoint leaves them out)", names)
        self.fill_banks()
        for name in names:
            saved = banks[name]
            bank = self.distiller.banks.get(name)
            if bank is None:
                raise CheckpointError(f"checkpoint {path} has memory bank {name!r}, which this run does not")
            digest = _bank_digest(bank)
            if digest != saved["fingerprint"]:
                raise CheckpointError(
                    f"the memory bank {name!r} rebuilt by the fill pass differs from the one checkpoint {path} was "
                    "trained with (another teacher file, dataset or fill nondeterminism): the run cannot be resumed "
                    "exactly. Resume with the original teacher and data, or start afresh with trainer.resume=never."
                )
            self._fingerprints[name] = digest
            banks[name] = {**bank.state_dict(), **saved["state"]}

    # --- the run -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resume_path = self.find_resume_checkpoint()
        if self.dist.world_size > 1 and not distributed.all_ranks_agree(resume_path is not None):
            raise CheckpointError(
                f"the ranks disagree on whether {self.run_dir.last_checkpoint} exists: the run folder must be on a "
                "filesystem shared by all ranks (or pass the same trainer.resume path to every rank)"
            )
        if resume_path is not None:
            self.resume(resume_path)
            self.progress.start(self.start_epoch, self._batches_per_epoch())
        else:
            if self.dist.is_main:
                self.run_dir.metrics.unlink(missing_ok=True)
                self.run_dir.with_bank_checkpoint.unlink(missing_ok=True)  # an earlier run's
            self.progress.start(0, self._batches_per_epoch())
            self.fill_banks()
        self.run_info.start_epoch = self.start_epoch
        self.run_info.extra["start_batch"] = int(self.partial["step"]) if self.partial else 0
        self.callbacks.on_run_start(self.run_info)
        status = "completed"
        start = time.perf_counter()
        last: dict[str, Any] = self.history[-1] if self.history else {}
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                metrics = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
                partial, self.partial = self.partial, None
                try:
                    metrics.update(self.train_epoch(epoch, partial if partial and int(partial["epoch"]) == epoch else None))
                except _Interrupted as interrupted:
                    self.save(epoch, False, interrupted.partial)
                    status = "interrupted"
                    log.warning("interrupted at epoch %d batch %d: checkpoint saved", epoch + 1, interrupted.partial["step"])
                    break
                self.scheduler.step()
                if (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.cfg.epochs:
                    self.progress.phase("evaluating")
                    metrics.update(self.evaluate())
                    self.progress.eval_done()
                metrics.update(self.distiller.bank_stats())
                metrics.update(self.step.metrics())
                top1 = metrics.get("val/top1", -1.0)
                is_best = top1 > self.best_top1
                self.best_top1 = max(self.best_top1, top1)
                metrics["val/best_top1"] = self.best_top1
                for split in ("test", "holdout"):  # running bests (W&B summaries, the literature's best test)
                    best = _best_of([*self.history, metrics], f"{split}/top1")
                    if best is not None:
                        metrics[f"{split}/best_top1"] = best
                self.history.append(metrics)
                saved = (epoch + 1) % self.cfg.checkpoint_every == 0 or epoch + 1 == self.cfg.epochs or is_best
                if saved:
                    self.save(epoch + 1, is_best)
                self.callbacks.on_epoch_end(epoch + 1, metrics)
                last = metrics
                loss = metrics.get("train/loss", math.nan)
                eta = format_duration(self.progress.epoch_end(epoch + 1))
                if self.holdout_loader is not None:
                    log.info(
                        "epoch %d/%d loss %.4f holdout top1 %.2f (best %.2f) test top1 %.2f %.1fs eta %s",
                        epoch + 1, self.cfg.epochs, loss, top1, self.best_top1, metrics.get("test/top1", math.nan), metrics["time/epoch_s"], eta,
                    )
                else:
                    log.info(
                        "epoch %d/%d loss %.4f test top1 %.2f (best %.2f; no holdout: selection on test) %.1fs eta %s",
                        epoch + 1, self.cfg.epochs, loss, top1, self.best_top1, metrics["time/epoch_s"], eta,
                    )
                if epoch + 1 < self.cfg.epochs and self._interrupt_requested():
                    if not saved or not self._banks_in_last:
                        self.save(epoch + 1, False, banks=True)
                    status = "interrupted"
                    break
                if self._agree(self.callbacks.should_stop()):
                    if not self._banks_in_last:  # a stopped run resumes from here, not an older one
                        self.save(epoch + 1, False, banks=True)
                    status = "stopped"
                    break
        except NonFiniteLossError:
            status = "nonfinite"
            raise
        except KeyboardInterrupt:  # a second Ctrl-C (ickd.engine.interrupt): the last checkpoint stays
            status = "interrupted"
            raise
        except BaseException:
            status = "failed"
            raise
        finally:
            summary = {
                "status": status,
                "name": self.run_info.name,
                "stage": self.run_info.stage,
                "epochs_completed": len(self.history),
                "epochs": self.cfg.epochs,
                # best_top1/last_top1/last_top5: the selection split (holdout if any, else test).
                "best_top1": self.best_top1 if self.history else None,
                "last_top1": last.get("val/top1"),
                "last_top5": last.get("val/top5"),
                "selection_split": self.selection_split,
                "num_holdout": int(getattr(self.data, "num_holdout", 0) or 0),
                "best_holdout_top1": _best_of(self.history, "holdout/top1"),
                "last_holdout_top1": last.get("holdout/top1"),
                "last_test_top1": last.get("test/top1"),
                "best_test_top1": _best_of(self.history, "test/top1"),  # the literature's protocol
                "test_top1_at_best": _at_selected_epoch(self.history, "test/top1"),
                "wall_time_s": time.perf_counter() - start,
                "world_size": self.dist.world_size,
                "out_dir": str(self.out_dir),
                "best_checkpoint": str(self.run_dir.best_checkpoint),
            }
            if status != "completed" or resume_path is not None:
                summary["resumed_from_epoch"] = self.run_info.start_epoch
            if self.dist.is_main:
                try:
                    self.run_dir.write_result(summary)
                except DiskWriteError as exc:
                    if status == "completed":
                        raise
                    # Already failing (often for the same full disk): keep that error; the old
                    # result.json, if any, is intact (atomic write).
                    log.error("%s", exc)
            self.progress.finish(status)
            self.callbacks.on_run_end(summary)
        return summary

    @torch.no_grad()
    def fill_banks(self) -> None:
        if not self.distiller.banks or self.distiller.bank_fill_source() is None:
            return
        self.distiller.eval()
        # A FIFO bank (M < N) keeps the pass's last M samples: in dataset order that would be the last
        # classes of a class-sorted set (ImageFolder), so it fills in a seeded shuffled order. Slots of
        # M = N and random-subset banks do not depend on the order, which stays the dataset's (and a
        # sharded fixed-order pass keeps every sample, where a shuffled one drops < world_size).
        shuffle = any(bank.mode == "fifo" for bank in self.distiller.banks.values())
        fill_batch = self._fill_batch or self._eval_batch
        loader = self.data.train_loader(fill_batch, shuffle=shuffle, augment=False, seed=self.seed, **self._loader_kw)
        loader.set_epoch(0)
        batches = self._progress(loader, len(loader), "filling memory bank")
        self.progress.phase("filling")
        log.info("filling the memory bank(s): %d batches of %d images", len(loader), fill_batch)
        if self.dist.world_size > 1:  # each rank fills from its shard; GatheredBank.fill shares the rows
            batches = distributed.pad_steps(batches, distributed.fill_steps(self.data.num_train, fill_batch, self.dist.world_size))
        if self.channels_last:
            batches = ((x.contiguous(memory_format=torch.channels_last), y, idx) for x, y, idx in batches)
        # Deterministic kernels for the pass: a resume rebuilds a frozen bank by running it again.
        with self.step.autocast(), _deterministic_cudnn():
            self.distiller.fill_banks(batches)
