"""Multi-process data-parallel training (torch.distributed, DDP).

Distributed mode is on when the environment says ``WORLD_SIZE > 1`` (torchrun, submitit's
``TorchDistributedEnvironment().export()``, or :func:`from_slurm_env` for plain ``srun``); there is
no config key. ``trainer.batch_size`` and ``trainer.eval_batch_size`` stay the *global* batches:
each rank uses ``batch_size // world_size``.

What the trainer does with ``world_size > 1`` (docs/design.md, "Multi-GPU (DDP)"):

* the trainable networks run under ``DistributedDataParallel`` (its constructor broadcasts rank 0's
  weights and buffers), so gradients are averaged and every rank keeps identical weights;
* each rank trains a disjoint, equal-sized shard of the epoch's (seed, epoch) order;
* every memory-bank write is all-gathered (:class:`GatheredBank`), so all ranks apply the same rows
  in the same order and their banks stay identical;
* evaluation shards the val split and all-reduces the counts;
* only rank 0 writes files and calls callbacks; its stop/interrupt decisions are broadcast.

This module imports nothing of SLURM/submitit: :func:`from_slurm_env` only reads SLURM's variables.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ickd.errors import ConfigError
from ickd.runs import slurm

log = logging.getLogger(__name__)

__all__ = [
    "DistEnv",
    "GatheredBank",
    "agree",
    "all_ranks_agree",
    "all_reduce_sum",
    "any_rank",
    "broadcast_buffers",
    "cleanup",
    "env_world_size",
    "from_slurm_env",
    "gather_rows",
    "init_distributed",
    "per_rank_batch",
    "slurm_first_host",
    "slurm_port",
    "wrap_ddp",
]

# A gloo group for small host-side decisions (stop/interrupt/NaN flags): on NCCL a flag on the GPU
# would cost a device sync per poll; on gloo it keeps control traffic apart from DDP's buckets.
_CONTROL: Any = None


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls) -> "DistEnv":
        """The initialised process group's view, else a single process."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            backend=str(dist.get_backend()),
        )


def _env_int(environ: Mapping[str, str], key: str, default: int | None = None) -> int | None:
    return _as_int(environ.get(key), key, default)


def _as_int(raw: str | None, key: str, default: int | None = None) -> int | None:
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {key}={raw!r} must be an integer") from None


def env_world_size(environ: Mapping[str, str] | None = None) -> int:
    """WORLD_SIZE from the environment (1 when absent)."""
    ws = _env_int(os.environ if environ is None else environ, "WORLD_SIZE", 1)
    assert ws is not None
    if ws < 1:
        raise ConfigError(f"WORLD_SIZE={ws} must be >= 1")
    return ws


def per_rank_batch(batch_size: int, world_size: int, key: str) -> int:
    """The per-rank share of a global batch; the global batch must split evenly."""
    if world_size <= 1:
        return batch_size
    if batch_size % world_size:
        lo = batch_size - batch_size % world_size
        raise ConfigError(
            f"{key}={batch_size} is the global batch and must be divisible by the number of processes "
            f"(WORLD_SIZE={world_size}): each rank takes {key} // WORLD_SIZE samples. "
            f"Use {key}={lo or world_size} or {lo + world_size}."
        )
    return batch_size // world_size


def init_distributed(device_kind: str = "cpu") -> DistEnv:
    """Join the process group described by torch's env variables; single process if WORLD_SIZE <= 1.

    Backend nccl for ``device_kind="cuda"`` (the device is set from LOCAL_RANK), gloo otherwise.
    Idempotent: a second call returns the existing group's view.
    """
    global _CONTROL
    world = env_world_size()
    if world <= 1:
        return DistEnv()
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise ConfigError(
                f"a process group of {dist.get_world_size()} processes is already initialised but WORLD_SIZE={world}"
            )
        return DistEnv.current()
    env = os.environ
    rank = _env_int(env, "RANK")
    if rank is None or not 0 <= rank < world:
        raise ConfigError(
            f"WORLD_SIZE={world} but RANK={env.get('RANK')!r}: set RANK in [0, {world}) for every process "
            "(torchrun and submitit's TorchDistributedEnvironment().export() do; under plain srun call "
            "ickd.engine.distributed.from_slurm_env() or run `python -m ickd.engine.distributed CMD ...`)"
        )
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: every process needs the address and port of "
            "rank 0 (torchrun sets them; under SLURM use from_slurm_env())"
        )
    local_rank = _env_int(env, "LOCAL_RANK")
    kwargs: dict[str, Any] = {}
    if device_kind == "cuda":
        if local_rank is None:
            raise ConfigError("WORLD_SIZE > 1 on CUDA needs LOCAL_RANK (the GPU of this process on its node)")
        if not 0 <= local_rank < torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node shows {torch.cuda.device_count()} GPU(s); "
                "start one process per visible GPU"
            )
        torch.cuda.set_device(local_rank)
        backend = "nccl"
        kwargs["device_id"] = torch.device("cuda", local_rank)
    else:
        backend = "gloo"
    timeout_s = _env_int(env, "ICKD_DIST_TIMEOUT_S")
    if timeout_s:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    _CONTROL = dist.new_group(backend="gloo")
    atexit.register(cleanup)
    out = DistEnv.current()
    log.info("process group: rank %d of %d (local rank %d, %s)", out.rank, out.world_size, out.local_rank, backend)
    return out


def cleanup() -> None:
    """Destroy the process group (safe to call twice, or without one)."""
    global _CONTROL
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None


# --- SLURM (plain srun) ----------------------------------------------------------------------
_BRACKET = re.compile(r"^([^\[,]*)\[([^\]]+)\](.*)$")


def _first_host_fallback(nodelist: str) -> str:
    """First host of a SLURM hostlist without scontrol: ``n1``, ``n1,n2``, ``gpu[03-05,7]`` -> ``gpu03``."""
    nodelist = nodelist.strip()
    depth, cut = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first item
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            cut = i
            break
    item = nodelist[:cut]
    m = _BRACKET.match(item)
    if not m:
        return item
    prefix, ranges, suffix = m.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def slurm_first_host(nodelist: str, scontrol: str | None = "scontrol") -> str:
    """The first host of a SLURM nodelist, by ``scontrol show hostnames`` when it is available."""
    exe = shutil.which(scontrol) if scontrol else None
    if exe:
        try:
            out = subprocess.run([exe, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True)
            hosts = out.stdout.split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("scontrol show hostnames %s failed (%s); parsing the nodelist instead", nodelist, exc)
    return _first_host_fallback(nodelist)


def slurm_port(job_id: int) -> int:
    """A rendezvous port derived from the job id: in [15000, 30000), below Linux's ephemeral ports, and
    different for concurrent jobs (array tasks have their own job ids) unless ids collide mod 15000."""
    return 15000 + int(job_id) % 15000


def from_slurm_env(environ: MutableMapping[str, str] | None = None, scontrol: str | None = "scontrol") -> dict[str, str]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from a SLURM task's variables.

    For processes started by plain ``srun`` (one task per GPU). Variables already set (by torchrun or
    submitit) are kept. Updates ``environ`` (default ``os.environ``) and returns the five variables
    as they now stand; returns ``{}`` (and changes nothing) outside a SLURM task.
    """
    env = os.environ if environ is None else environ
    task = slurm.task(env)  # the SLURM variables are read in ickd.runs.slurm only
    if task is None:
        return {}
    names = task.VARIABLES
    derived: dict[str, str] = {
        "RANK": str(_as_int(task.procid, names["procid"])),
        "WORLD_SIZE": str(_as_int(task.ntasks, names["ntasks"], 1)),
        "LOCAL_RANK": str(_as_int(task.localid, names["localid"], 0)),
    }
    nodelist = task.nodelist
    if nodelist and not env.get("MASTER_ADDR"):
        derived["MASTER_ADDR"] = slurm_first_host(nodelist, scontrol)
    elif not nodelist and not env.get("MASTER_ADDR"):
        raise ConfigError(f"{names['nodelist']} is not set: cannot tell which host runs rank 0; set MASTER_ADDR")
    job_id = _as_int(task.job_id, names["job_id"])
    if job_id is not None and not env.get("MASTER_PORT"):
        derived["MASTER_PORT"] = str(slurm_port(job_id))
    elif job_id is None and not env.get("MASTER_PORT"):
        raise ConfigError(f"{names['job_id']} is not set: cannot derive a rendezvous port; set MASTER_PORT")
    for key, value in derived.items():
        env.setdefault(key, value)
    return {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


# --- collectives the trainer uses -------------------------------------------------------------
def agree(flag: bool) -> bool:
    """Rank 0's decision, on every rank (a host-side broadcast; no device sync)."""
    t = torch.tensor([int(bool(flag))], dtype=torch.int32)
    dist.broadcast(t, src=0, group=_CONTROL)
    return bool(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    t = torch.tensor([int(bool(flag))], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return bool(t.item())


def all_ranks_agree(flag: bool) -> bool:
    """True when ``flag`` has the same value on every rank."""
    t = torch.tensor([int(bool(flag)), -int(bool(flag))], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return int(t[0]) == -int(t[1])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place (on the data backend: device tensors stay on the device)."""
    dist.all_reduce(t)
    return t


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BN statistics, EMA copies) to every rank.

    DDP broadcasts buffers at the start of each forward, so after an epoch's last step every rank
    still holds its own last BN update; syncing makes the evaluated and checkpointed model the same
    on all ranks.
    """
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def gather_rows(tensors: list[torch.Tensor], uniform: bool) -> list[torch.Tensor]:
    """All-gather the rows of each tensor (same first dimension within a rank), concatenated in
    rank order. ``uniform``: every rank has the same row count (no size exchange, no host sync);
    otherwise counts are exchanged first and may differ, zero included."""
    rows = tensors[0].shape[0]
    dev = tensors[0].device
    if uniform:
        sizes = [rows] * dist.get_world_size()
    else:
        sizes = [int(s) for s in torch.cat(_all_gather(torch.tensor([rows], device=dev, dtype=torch.long))).tolist()]
    top = max(sizes)
    # One collective per dtype: flatten each tensor to (rows, -1) and concatenate the same-dtype ones.
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    result: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype, members in groups.items():
        flat = [tensors[i].reshape(rows, math.prod(tensors[i].shape[1:])) for i in members]
        widths = [f.shape[1] for f in flat]
        packed = torch.cat(flat, dim=1) if len(flat) > 1 else flat[0]
        if rows < top:
            packed = torch.cat([packed, packed.new_zeros(top - rows, packed.shape[1])])
        parts = _all_gather(packed)
        joined = torch.cat([p[:n] for p, n in zip(parts, sizes)]) if not uniform else torch.cat(parts)
        for i, piece in zip(members, joined.split(widths, dim=1)):
            result[i] = piece.reshape(piece.shape[0], *tensors[i].shape[1:])
    return result  # type: ignore[return-value]


class GatheredBank:
    """A memory bank whose writes are all-gathered: every rank applies the whole global batch's rows,
    rank 0's first, so all ranks' banks hold identical entries. Reads (``retrieve``) and everything
    else go to the wrapped bank unchanged.

    ``update`` runs inside each training step, where shards are equal-sized (no size exchange, no
    host sync); ``fill`` may see unequal batches (the fill pass's last steps) and exchanges counts.
    """

    def __init__(self, bank: Any) -> None:
        self.bank = bank

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bank, name)

    def fill(self, indices, feats, logits, labels) -> None:
        self.bank.fill(*gather_rows([indices, feats, logits, labels], uniform=False))

    def update(self, indices, feats, logits, labels) -> None:
        if self.bank.update_rule == "frozen":  # the same on every rank: skip the collective too
            return
        self.bank.update(*gather_rows([indices, feats, logits, labels], uniform=True))

    def __repr__(self) -> str:
        return f"GatheredBank({self.bank!r})"


class _TrainStep(nn.Module):
    """Routes DDP's forward to ``distiller.forward_train`` (DDP hooks the backward of its forward)."""

    def __init__(self, distiller: nn.Module) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, x, y, idx, epoch):
        return self.distiller.forward_train(x, y, idx, epoch)


def wrap_ddp(distiller: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the distiller's training forward; frozen parts (teacher, EMA) take no gradients.
    Construction broadcasts rank 0's parameters and buffers, so every rank starts identical."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(_TrainStep(distiller), device_ids=ids)


def fill_steps(num_samples: int, local_batch: int, world_size: int) -> int:
    """Steps of a sharded fixed-order pass: ranks take positions ``rank::world`` in batches of
    ``local_batch``, so step k covers global positions [k*B, (k+1)*B) with B = local_batch*world."""
    return -(-num_samples // (local_batch * world_size))


def pad_steps(batches: Iterable[tuple[torch.Tensor, ...]], steps: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield ``batches`` then empty batches up to ``steps``: a rank whose shard ran out one step
    early still takes part in that step's collectives."""
    last = None
    count = 0
    for batch in batches:
        last = batch
        count += 1
        yield batch
    if last is None and count < steps:
        raise ConfigError("this rank's shard of the training set is empty: use fewer processes than samples")
    for _ in range(count, steps):
        assert last is not None
        yield tuple(t[:0] for t in last)


def main(argv: list[str] | None = None) -> int:
    """``python -m ickd.engine.distributed CMD ARGS...``: run CMD with torch's distributed variables
    derived from the SLURM task (for ``srun`` without torchrun/submitit)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: srun python -m ickd.engine.distributed CMD [ARGS...]   e.g. ... ickd train ...", file=sys.stderr)
        return 2
    env = dict(os.environ)
    derived = from_slurm_env(env)
    if not derived:
        print(f"not inside a SLURM task ({slurm.PROCID} unset); running CMD unchanged", file=sys.stderr)
    os.execvpe(args[0], args, env)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
