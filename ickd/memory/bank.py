"""The IC-KD memory bank: teacher features, logits and labels per training sample, plus retrieval.

Layout. The bank has M slots. Each slot holds an L2-normalised feature (``feature_dtype``), the
teacher's logits (float32, because losses soften them by a temperature), the label and the sample
index that wrote it (-1 = empty). How samples map to slots:

* M = N (``size`` None or N): slot = sample index.
* M < N, ``subset="random"``: a fixed random subset of M sample indices (drawn from ``seed``) owns
  the slots; writes of other samples are ignored.
* M < N, ``subset="fifo"``: a ring buffer of the M most recent writes. A sample may then appear in
  several slots (written in two epochs); self-exclusion removes every copy.

Writes. ``fill`` always writes (initial teacher pass). ``update`` follows ``update``:
``frozen`` = no-op; ``overwrite`` = replace; ``momentum`` = ``m*old + (1-m)*new`` for the feature
(re-normalised) and the logits, only where the slot already holds that sample (a first write is
plain). For FIFO, ``overwrite`` and ``momentum`` both enqueue (a queue has no "old" entry of the
sample to mix with) and ``frozen`` keeps the fill.

Host synchronisation. Once every slot holds an entry (after the fill pass), ``retrieve`` with the
``torch`` backend and ``update`` in M = N or FIFO mode never wait for the device; while the bank
fills up, and for random subsets, a few small syncs happen per write.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ickd.errors import CheckpointError, ConfigError
from ickd.memory.retrieval import Retriever, SearchFilter, create_retriever, resolve_backend

__all__ = ["MemoryBank", "Neighbours", "SUBSETS", "UPDATES", "SPLITS"]

SUBSETS = ("fifo", "random")
UPDATES = ("frozen", "overwrite", "momentum")
SPLITS = ("topk", "separate")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STATE_VERSION = 1


@dataclass
class Neighbours:
    """Retrieved in-context samples for a batch of B queries, K neighbours each, sorted by similarity.

    For ``split="separate"`` the first k_pos columns are the same-class search and the last k_neg
    the other-class search. Invalid columns (fewer than K eligible entries) have ``valid`` False,
    ``sims`` 0, ``logits`` 0, ``labels`` and ``sample_indices`` -1, and are neither positive nor
    negative.
    """

    sims: torch.Tensor  # (B, K) float32 cosine similarity
    logits: torch.Tensor  # (B, K, C) float32 teacher logits of the neighbours
    labels: torch.Tensor  # (B, K) int64
    sample_indices: torch.Tensor  # (B, K) int64
    positive: torch.Tensor  # (B, K) bool: valid and same label as the query
    valid: torch.Tensor  # (B, K) bool

    @property
    def negative(self) -> torch.Tensor:
        """(B, K) bool: valid and a different label from the query."""
        return self.valid & ~self.positive


def _as_int(value: Any, key: str, fix: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be an integer; {fix}")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{key}={value!r} must be an integer; {fix}") from None


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(
                f"memory.feature_dtype={dtype!r} is not supported; choose one of: {', '.join(_DTYPES)}"
            )
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ConfigError(
            f"memory.feature_dtype={dtype} is not supported; choose one of: {', '.join(_DTYPES)}"
        )
    return dtype


class _Timer:
    """Retrieval wall time. On CUDA, events are recorded and read later so no step has to sync."""

    def __init__(self) -> None:
        self.total_ms = 0.0
        self.count = 0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self, device: torch.device) -> Any:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # timing events cannot be recorded into a CUDA graph; replays go untimed
        if device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            return begin
        return time.perf_counter()

    def stop(self, device: torch.device, token: Any) -> None:
        if token is None:
            return
        if device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((token, end))
            if len(self._pending) > 512:  # bound memory: fold in whatever already finished
                self.resolve(block=False)
        else:
            self.total_ms += (time.perf_counter() - token) * 1e3
            self.count += 1

    def resolve(self, block: bool = True) -> None:
        keep = []
        for begin, end in self._pending:
            if block or end.query():
                end.synchronize()
                self.total_ms += begin.elapsed_time(end)
                self.count += 1
            else:
                keep.append((begin, end))
        self._pending = keep

    def resolved_total_ms(self) -> float:
        self.resolve()
        return self.total_ms

    @property
    def mean_ms(self) -> float:
        self.resolve()
        return self.total_ms / self.count if self.count else 0.0


class MemoryBank:
    """Features, logits and labels of (a subset of) the training set, with k-NN retrieval.

    See the module docstring for slot layout and write rules, ``docs/method.md`` for the method.
    """

    def __init__(
        self,
        num_samples: int,
        feature_dim: int,
        num_logits: int,
        size: int | None = None,
        subset: str = "fifo",
        update: str = "overwrite",
        momentum: float = 0.9,
        retriever: str = "torch",
        retriever_kwargs: dict[str, Any] | None = None,
        feature_dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        n = _as_int(num_samples, "num_samples", "pass the training-set size")
        if n <= 0:
            raise ConfigError(f"num_samples={n} must be positive; the bank needs a non-empty training set")
        d = _as_int(feature_dim, "feature_dim", "pass the teacher's pooled feature dimension")
        c = _as_int(num_logits, "num_logits", "pass the number of classes")
        if d <= 0 or c <= 0:
            raise ConfigError(
                f"feature_dim={d} and num_logits={c} must be positive; pass the teacher's feature "
                "dimension and the number of classes"
            )
        if size is None:
            m = n
        else:
            m = _as_int(size, "memory.size", "set memory.size to a positive integer or null (= N)")
            if m <= 0:
                raise ConfigError(
                    f"memory.size={m} must be positive; set memory.size to a positive integer or null (= N)"
                )
            if m > n:
                raise ConfigError(
                    f"memory.size={m} is larger than the training set (N={n}); "
                    f"set memory.size to at most {n}, or null to keep every sample"
                )
        if subset not in SUBSETS:
            raise ConfigError(f"memory.subset={subset!r} is not valid; choose one of: {', '.join(SUBSETS)}")
        if update not in UPDATES:
            raise ConfigError(f"memory.update={update!r} is not valid; choose one of: {', '.join(UPDATES)}")
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0.0 <= momentum < 1.0:
            raise ConfigError(
                f"memory.momentum={momentum!r} must be in [0, 1); new = m*old + (1-m)*new, "
                "so m=0 is overwrite and m close to 1 changes slowly"
            )

        self.num_samples, self.feature_dim, self.num_logits, self.size = n, d, c, m
        self.subset, self.update_rule, self.momentum = subset, update, float(momentum)
        self.feature_dtype = _resolve_dtype(feature_dtype)
        self.device = torch.device(device)
        self.seed = int(seed)
        # "direct": slot = sample index. Otherwise the subset rule decides.
        self.mode = "direct" if m == n else subset

        self.feats = torch.zeros(m, d, dtype=self.feature_dtype, device=self.device)
        self.logits = torch.zeros(m, c, dtype=torch.float32, device=self.device)
        self.labels = torch.full((m,), -1, dtype=torch.long, device=self.device)
        self.sample_idx = torch.full((m,), -1, dtype=torch.long, device=self.device)
        self.subset_indices: torch.Tensor | None = None
        self.slot_of: torch.Tensor | None = None
        if self.mode == "random":
            gen = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(n, generator=gen)[:m].sort().values
            self.subset_indices = chosen.to(self.device)
            slot_of = torch.full((n,), -1, dtype=torch.long)
            slot_of[chosen] = torch.arange(m)
            self.slot_of = slot_of.to(self.device)
        self.fifo_ptr = 0
        self.fifo_count = 0
        self._all_valid = False

        # memory.backend=auto becomes a concrete backend here (it depends on M, D and the device);
        # backend_requested keeps what was asked for, backend_reason why this one runs.
        self.backend_requested = retriever
        self.retriever_name, self.retriever_kwargs, self.backend_reason = resolve_backend(
            retriever, m, d, self.device, retriever_kwargs
        )
        self.retriever: Retriever = create_retriever(self.retriever_name, **self.retriever_kwargs)
        self.retriever.bind(m, d, self.device)
        self._timer = _Timer()

    # ------------------------------------------------------------------ properties
    @property
    def num_valid(self) -> int:
        """Number of slots holding an entry."""
        if self._all_valid:
            return self.size
        if self.mode == "fifo":
            return self.fifo_count
        return int((self.sample_idx >= 0).sum())

    @property
    def nbytes(self) -> int:
        """Bytes held by the bank's tensors and its retrieval backend."""
        tensors = [self.feats, self.logits, self.labels, self.sample_idx, self.subset_indices, self.slot_of]
        own = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return own + self.retriever.nbytes

    def capture_blocker(self) -> str | None:
        """Why a CUDA graph cannot hold this bank's retrieval and writes yet (None: it can).

        A graph replays fixed kernels on fixed addresses, so the step must not branch on device
        values or keep Python-side positions: only an exact torch search over a full bank whose slot
        is the sample index (M = N) qualifies."""
        if self.retriever.name != "torch":
            return f"backend {self.retriever.name!r} searches through the host; use memory.backend=torch"
        if self.mode != "direct":
            return f"a {self.mode} bank (memory.size < N) tracks its slots on the host"
        if not self._all_valid:
            return "the bank is not full yet"
        return None

    def stats(self) -> dict[str, float | int]:
        """entries, bytes, mean retrieval wall time in ms (0.0 before any retrieval), retrievals."""
        return {
            "entries": self.num_valid,
            "bytes": self.nbytes,
            "retrieval_ms_mean": self._timer.mean_ms,
            "retrievals": self._timer.count,
        }

    def __repr__(self) -> str:
        return (
            f"MemoryBank(M={self.size}, N={self.num_samples}, D={self.feature_dim}, C={self.num_logits}, "
            f"mode={self.mode}, update={self.update_rule}, backend={self.retriever_name}, "
            f"dtype={self.feature_dtype}, device={self.device})"
        )

    # ------------------------------------------------------------------ writes
    def fill(self, indices: torch.Tensor, feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Initial fill (e.g. one no-grad teacher pass); writes whatever the update rule."""
        self._write(indices, feats, logits, labels, mix=False, check_range=True)

    def update(self, indices: torch.Tensor, feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Per-step update following the update rule (no-op when frozen)."""
        if self.update_rule == "frozen":
            return
        # Range checks need the indices on the host; skip them for device tensors in the hot loop.
        self._write(
            indices, feats, logits, labels,
            mix=self.update_rule == "momentum" and self.mode != "fifo",
            check_range=indices.device.type == "cpu",
        )

    def _check_batch(
        self, indices: torch.Tensor, feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
    ) -> None:
        b = indices.shape[0] if indices.dim() == 1 else -1
        shapes_ok = (
            feats.shape == (b, self.feature_dim) and logits.shape == (b, self.num_logits) and labels.shape == (b,)
        )
        if b < 0 or not shapes_ok:
            raise ConfigError(
                f"memory bank write got indices {tuple(indices.shape)}, feats {tuple(feats.shape)}, "
                f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)}; expected (B,), "
                f"(B, {self.feature_dim}), (B, {self.num_logits}), (B,): build the bank with the "
                "teacher's feature dimension and the number of classes"
            )

    def _write(
        self,
        indices: torch.Tensor,
        feats: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        mix: bool,
        check_range: bool,
    ) -> None:
        self._check_batch(indices, feats, logits, labels)
        if indices.shape[0] == 0:
            return
        dev = self.device
        idx = indices.detach().to(dev, torch.long)
        if check_range:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_samples:
                raise ConfigError(
                    f"sample indices must lie in [0, {self.num_samples}) but got [{lo}, {hi}]; the dataset "
                    "must return each sample's index in the training set (and num_samples must be N)"
                )
        f = F.normalize(feats.detach().to(dev, torch.float32), dim=1)
        z = logits.detach().to(dev, torch.float32)
        y = labels.detach().to(dev, torch.long)

        if self.mode == "fifo":
            m = self.size
            if idx.shape[0] > m:  # only the most recent M of an oversized batch survive anyway
                idx, f, z, y = idx[-m:], f[-m:], z[-m:], y[-m:]
            b = idx.shape[0]
            slots = (self.fifo_ptr + torch.arange(b, device=dev)) % m
            self.fifo_ptr = (self.fifo_ptr + b) % m
            self.fifo_count = min(m, self.fifo_count + b)
        else:
            if self.mode == "direct":
                slots = idx
            else:
                assert self.slot_of is not None
                slots = self.slot_of[idx]
                inside = slots >= 0  # samples outside the fixed subset are ignored
                slots, idx, f, z, y = slots[inside], idx[inside], f[inside], z[inside], y[inside]
                if slots.numel() == 0:
                    return
            if mix:
                m_ = self.momentum
                had = (self.sample_idx[slots] == idx).unsqueeze(1)
                mixed_f = F.normalize(m_ * self.feats[slots].float() + (1.0 - m_) * f, dim=1)
                mixed_z = m_ * self.logits[slots] + (1.0 - m_) * z
                f = torch.where(had, mixed_f, f)
                z = torch.where(had, mixed_z, z)

        self.feats.index_copy_(0, slots, f.to(self.feature_dtype))
        self.logits.index_copy_(0, slots, z)
        self.labels.index_copy_(0, slots, y)
        self.sample_idx.index_copy_(0, slots, idx)
        if not self._all_valid:
            # Validity never goes back to False, so this sync stops once the bank is full.
            if self.mode == "fifo":
                self._all_valid = self.fifo_count == self.size
            else:
                self._all_valid = bool((self.sample_idx >= 0).all())
        self.retriever.on_write(slots)

    # ------------------------------------------------------------------ retrieval
    def check_k(self, k: int | None, k_pos: int | None = None, k_neg: int | None = None, split: str = "topk") -> None:
        """Validate neighbour counts against M (call at set-up; ``retrieve`` calls it too).

        ``split="topk"`` uses k; ``split="separate"`` uses k_pos and k_neg (k is ignored).
        """
        if split not in SPLITS:
            raise ConfigError(f"memory.split={split!r} is not valid; choose one of: {', '.join(SPLITS)}")
        m = self.size
        if split == "topk":
            k = _as_int(k, "memory.k", "set memory.k to a positive integer")
            if k <= 0:
                raise ConfigError(f"memory.k={k} must be positive; set memory.k to at least 1 (default 16)")
            if k >= m:
                raise ConfigError(
                    f"memory.k={k} must be smaller than the memory size M={m}; lower memory.k or raise memory.size"
                )
            return
        for key, value in (("memory.k_pos", k_pos), ("memory.k_neg", k_neg)):
            if value is None:
                raise ConfigError(
                    f"memory.split=separate needs {key}, which is unset; set memory.k_pos and memory.k_neg "
                    "to positive integers (defaults 8 and 8)"
                )
            v = _as_int(value, key, f"set {key} to a positive integer")
            if v <= 0:
                raise ConfigError(f"{key}={v} must be positive for memory.split=separate; set it to at least 1")
        assert k_pos is not None and k_neg is not None
        if k_pos + k_neg >= m:
            raise ConfigError(
                f"memory.k_pos + memory.k_neg = {k_pos + k_neg} must be smaller than the memory size M={m}; "
                "lower memory.k_pos/memory.k_neg or raise memory.size"
            )

    def _valid_mask(self) -> torch.Tensor | None:
        return None if self._all_valid else self.sample_idx >= 0

    def retrieve(
        self,
        query_feats: torch.Tensor,
        k: int,
        query_labels: torch.Tensor,
        exclude_indices: torch.Tensor | None = None,
        split: str = "topk",
        k_pos: int | None = None,
        k_neg: int | None = None,
    ) -> Neighbours:
        """The in-context neighbours of each query (see :class:`Neighbours`).

        ``split="topk"``: the k nearest by cosine, split by label into positives/negatives.
        ``split="separate"``: the k_pos nearest same-class and the k_neg nearest other-class entries.
        ``exclude_indices`` (B,): entries written by that sample are never returned.
        """
        self.check_k(k, k_pos, k_neg, split)
        if query_feats.dim() != 2 or query_feats.shape[1] != self.feature_dim:
            raise ConfigError(
                f"query features have shape {tuple(query_feats.shape)} but the bank stores "
                f"feature_dim={self.feature_dim}; query with the same (teacher) features the bank holds"
            )
        b = query_feats.shape[0]
        if query_labels.shape != (b,) or (exclude_indices is not None and exclude_indices.shape != (b,)):
            raise ConfigError(
                f"query_labels {tuple(query_labels.shape)} and exclude_indices "
                f"{None if exclude_indices is None else tuple(exclude_indices.shape)} must both be ({b},)"
            )
        dev = self.device
        token = self._timer.start(dev)
        q = F.normalize(query_feats.detach().to(dev, torch.float32), dim=1)
        ql = query_labels.detach().to(dev, torch.long)
        ex = None if exclude_indices is None else exclude_indices.detach().to(dev, torch.long)
        ex_slots = None
        if ex is not None and self.mode == "direct":
            ex_slots = ex
        elif ex is not None and self.mode == "random":
            assert self.slot_of is not None
            ex_slots = self.slot_of[ex.clamp(0, self.num_samples - 1)]
        valid = self._valid_mask()

        def search(count: int, same: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
            flt = SearchFilter(
                slot_samples=self.sample_idx,
                slot_labels=self.labels,
                exclude_samples=ex,
                exclude_slots=ex_slots,
                query_labels=ql,
                same_label=same,
            )
            # The bank's storage dtype decides the matmul precision, not the caller's autocast: a
            # bf16 autocast would round the similarities to 8 bits and reorder near neighbours.
            with torch.autocast(dev.type, enabled=False):
                return self.retriever.search(q, self.feats, valid, count, flt)

        if split == "topk":
            sims, slots = search(k, None)
        else:
            assert k_pos is not None and k_neg is not None
            sp, lp = search(k_pos, True)
            sn, ln = search(k_neg, False)
            sims, slots = torch.cat([sp, sn], dim=1), torch.cat([lp, ln], dim=1)

        ok = slots >= 0
        safe = slots.clamp(min=0)
        labels = torch.where(ok, self.labels[safe], torch.full_like(safe, -1))
        nb = Neighbours(
            sims=torch.where(ok, sims, torch.zeros_like(sims)),
            logits=self.logits[safe] * ok.unsqueeze(-1),
            labels=labels,
            sample_indices=torch.where(ok, self.sample_idx[safe], torch.full_like(safe, -1)),
            positive=ok & (labels == ql.unsqueeze(1)),
            valid=ok,
        )
        self._timer.stop(dev, token)
        return nb

    # ------------------------------------------------------------------ persistence
    def _geometry(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "feature_dim": self.feature_dim,
            "num_logits": self.num_logits,
            "size": self.size,
            "mode": self.mode,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume (tensors are references, as in nn.Module)."""
        return {
            "version": _STATE_VERSION,
            "geometry": self._geometry(),
            "feature_dtype": str(self.feature_dtype).removeprefix("torch."),
            "feats": self.feats,
            "logits": self.logits,
            "labels": self.labels,
            "sample_idx": self.sample_idx,
            "subset_indices": self.subset_indices,
            "fifo_ptr": self.fifo_ptr,
            "fifo_count": self.fifo_count,
            "retrieval_ms_total": self._timer.resolved_total_ms(),
            "retrievals": self._timer.count,
            "retriever_name": self.retriever_name,
            "retriever": self.retriever.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a bank saved by :meth:`state_dict`; the bank must have the same geometry."""
        if sd.get("version") != _STATE_VERSION or "geometry" not in sd:
            raise CheckpointError(
                "the memory-bank state is missing or from an unknown version; resume from a checkpoint "
                "written by this ickd version, or start the run afresh"
            )
        if sd["geometry"] != self._geometry():
            raise CheckpointError(
                f"the memory-bank checkpoint has geometry {sd['geometry']} but this bank has "
                f"{self._geometry()}; resume with the same dataset, teacher, memory.size and "
                "memory.subset as the checkpointed run"
            )
        with torch.no_grad():
            self.feats.copy_(sd["feats"].to(self.device, self.feature_dtype))
            self.logits.copy_(sd["logits"].to(self.device))
            self.labels.copy_(sd["labels"].to(self.device))
            self.sample_idx.copy_(sd["sample_idx"].to(self.device))
        if self.mode == "random":
            # The checkpoint's subset wins over this bank's seed: resume must address the same slots.
            chosen = sd["subset_indices"].to(self.device, torch.long)
            self.subset_indices = chosen
            slot_of = torch.full((self.num_samples,), -1, dtype=torch.long, device=self.device)
            slot_of[chosen] = torch.arange(self.size, device=self.device)
            self.slot_of = slot_of
        self.fifo_ptr = int(sd["fifo_ptr"])
        self.fifo_count = int(sd["fifo_count"])
        if self.mode == "fifo":
            self._all_valid = self.fifo_count == self.size
        else:
            self._all_valid = bool((self.sample_idx >= 0).all())
        self._timer = _Timer()
        self._timer.total_ms = float(sd.get("retrieval_ms_total", 0.0))
        self._timer.count = int(sd.get("retrievals", 0))
        if sd.get("retriever_name") == self.retriever_name:
            self.retriever.load_state_dict(sd.get("retriever", {}))
        else:  # backend changed on resume (allowed): rebuild its state from the restored content
            self.retriever.on_reset()

