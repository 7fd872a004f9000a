"""Retrieval backends of the memory bank: a registry of nearest-neighbour searchers.

Interface (every backend implements it; the bank is the only caller):

* ``bind(size, dim, device)``: called once by the bank with its geometry; backends validate their
  options against it (e.g. ``nlist <= size``).
* ``on_write(slots)``: the bank wrote (or invalidated) these slots; stateful backends mark them stale.
* ``on_reset()``: the whole content changed (``load_state_dict``, ``begin_fill``, ``finish_fill``
  re-transforming every entry); drop every cache.
* ``search(queries, feats, valid, k, flt) -> (sims, slots)``:
  ``queries`` (B, D) float32, L2-normalised; ``feats`` (M, D) the bank's storage (its dtype and
  device); ``valid`` (M,) bool or ``None`` when every slot holds an entry; ``flt`` a
  :class:`SearchFilter` saying which slots each query may receive (self-exclusion, label side).
  Returns ``sims`` (B, k) float32 sorted descending with ``-inf`` where fewer than k eligible slots
  exist, and ``slots`` (B, k) int64 with ``-1`` there; both on the bank's device.
* ``state_dict()`` / ``load_state_dict(sd)`` and ``nbytes`` (extra memory the backend holds).

Exact backends (``torch``, ``faiss_flat``) return the true top-k by inner product of normalised
vectors (= cosine similarity) among eligible slots.
"""
from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ickd.errors import ConfigError, UnknownNameError
from ickd.registry import Registry

__all__ = [
    "AUTO_BACKEND",
    "BackendChoice",
    "RETRIEVERS",
    "Retriever",
    "SearchFilter",
    "TorchExactRetriever",
    "choose_backend",
    "create_retriever",
    "resolve_backend",
]

log = logging.getLogger("ickd.memory")

RETRIEVERS: Registry[type["Retriever"]] = Registry("retriever")

_NEG_INF = float("-inf")


@dataclass
class SearchFilter:
    """Which bank slots each query row may receive.

    A slot is eligible for row b when it holds an entry, its sample index differs from
    ``exclude_samples[b]`` (self-exclusion), and, when ``same_label`` is not None, its label equals
    (True) or differs from (False) ``query_labels[b]``.
    """

    slot_samples: torch.Tensor  # (M,) int64, -1 = empty slot
    slot_labels: torch.Tensor  # (M,) int64
    exclude_samples: torch.Tensor | None = None  # (B,) int64
    # (B,) int64 slot holding exclude_samples[b] (-1: not in the bank). Only set when each sample
    # has at most one slot (M = N or a random subset): a scatter is cheaper than a (B, M) compare.
    exclude_slots: torch.Tensor | None = None
    query_labels: torch.Tensor | None = None  # (B,) int64
    same_label: bool | None = None

    def rows(self, index: torch.Tensor) -> "SearchFilter":
        """The filter restricted to some query rows (used when re-searching deficient rows)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index.to(t.device)]

        return SearchFilter(
            slot_samples=self.slot_samples,
            slot_labels=self.slot_labels,
            exclude_samples=pick(self.exclude_samples),
            exclude_slots=pick(self.exclude_slots),
            query_labels=pick(self.query_labels),
            same_label=self.same_label,
        )

    def mask_dense_(self, sims: torch.Tensor) -> torch.Tensor:
        """Set ``sims[b, j] = -inf`` for every ineligible slot j of row b (validity excluded)."""
        if self.exclude_slots is not None:
            es = self.exclude_slots
            present = (es >= 0).unsqueeze(1)
            col = es.clamp(min=0).unsqueeze(1)
            current = sims.gather(1, col)
            # Rows whose own sample is not in the bank keep their value (no sync, no branching).
            sims.scatter_(1, col, torch.where(present, torch.full_like(current, _NEG_INF), current))
        elif self.exclude_samples is not None:
            sims.masked_fill_(self.slot_samples.unsqueeze(0) == self.exclude_samples.unsqueeze(1), _NEG_INF)
        if self.same_label is not None:
            assert self.query_labels is not None
            same = self.slot_labels.unsqueeze(0) == self.query_labels.unsqueeze(1)
            sims.masked_fill_(~same if self.same_label else same, _NEG_INF)
        return sims

    def allowed(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, F) bool: which candidate slots (``-1`` = none) are eligible, validity included."""
        safe = slots.clamp(min=0)
        samples = self.slot_samples[safe]
        ok = (slots >= 0) & (samples >= 0)
        if self.exclude_samples is not None:
            ok &= samples != self.exclude_samples.unsqueeze(1)
        if self.same_label is not None:
            assert self.query_labels is not None
            same = self.slot_labels[safe] == self.query_labels.unsqueeze(1)
            ok &= same if self.same_label else ~same
        return ok


class Retriever(ABC):
    """Base class of retrieval backends (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    #: Options ``create_retriever`` accepts for this backend (others are a ConfigError).
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.size = 0
        self.dim = 0
        self.device = torch.device("cpu")

    def bind(self, size: int, dim: int, device: torch.device) -> None:
        self.size, self.dim, self.device = size, dim, torch.device(device)

    def on_write(self, slots: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """The bank changed these slots. Stateless backends ignore it."""

    def on_reset(self) -> None:  # noqa: B027 - optional hook
        """Every slot may have changed."""

    @abstractmethod
    def search(
        self,
        queries: torch.Tensor,
        feats: torch.Tensor,
        valid: torch.Tensor | None,
        k: int,
        flt: SearchFilter,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.on_reset()

    @property
    def nbytes(self) -> int:
        return 0


def pad_topk(sims: torch.Tensor, slots: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark ``-inf`` results as missing (slot -1) and pad to k columns when the bank is tiny."""
    slots = torch.where(torch.isfinite(sims), slots, torch.full_like(slots, -1))
    if sims.shape[1] < k:
        pad = k - sims.shape[1]
        sims = torch.cat([sims, sims.new_full((sims.shape[0], pad), _NEG_INF)], dim=1)
        slots = torch.cat([slots, slots.new_full((slots.shape[0], pad), -1)], dim=1)
    return sims, slots


@RETRIEVERS.register("torch")
class TorchExactRetriever(Retriever):
    """Exact search: one matmul over the whole bank, mask ineligible slots with -inf, then top-k.

    Runs wherever the bank lives (CPU or CUDA), never synchronises with the host, and is the
    fastest option on GPU at CIFAR/ImageNet bank sizes (performance-anchors.md).
    """

    name = "torch"
    exact = True
    options = ()

    def search(
        self,
        queries: torch.Tensor,
        feats: torch.Tensor,
        valid: torch.Tensor | None,
        k: int,
        flt: SearchFilter,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if feats.dtype in (torch.float16, torch.bfloat16) and feats.device.type == "cuda":
            # Half-precision matmul on the GPU is the fast path; accumulate is fp32 inside cuBLAS.
            sims = (queries.to(feats.dtype) @ feats.T).float()
        else:
            # CPU half matmul is slower than casting; fp32 banks take this path with no copy.
            sims = queries @ feats.T.float()
        if valid is not None:
            sims.masked_fill_(~valid.unsqueeze(0), _NEG_INF)
        flt.mask_dense_(sims)
        top, idx = sims.topk(min(k, sims.shape[1]), dim=1, largest=True, sorted=True)
        return pad_topk(top, idx, k)


def filtered_search(
    raw_search: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]],
    queries: torch.Tensor,
    k: int,
    flt: SearchFilter,
    ntotal: int,
    max_effort: int,
    effort: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eligible slots from a backend that cannot filter: over-fetch, post-filter, grow.

    ``raw_search(rows_queries, n, effort)`` returns (sims, slots) of the n best candidates (any slot,
    sorted descending, slot -1 when the index ran out). Rows with fewer than k eligible candidates are
    searched again with 4x as many candidates; when the index already returned everything it could at
    this ``effort`` (an IVF probing too few lists), the effort (nprobe) grows 4x instead. The loop ends
    when every row has k eligible candidates or the search was exhaustive (n = ntotal at max effort).
    """
    B = queries.shape[0]
    device = flt.slot_samples.device
    out_sims = torch.full((B, k), _NEG_INF, dtype=torch.float32, device=device)
    out_slots = torch.full((B, k), -1, dtype=torch.long, device=device)
    if ntotal == 0 or B == 0:
        return out_sims, out_slots
    # Margin: one self entry per row plus slack for label filtering; most rows finish in one round.
    n = min(ntotal, 2 * k + 8)
    rows = torch.arange(B, device=device)
    sub = flt
    q = queries
    while True:
        sims, slots = raw_search(q, n, effort)
        sims, slots = sims.to(device), slots.to(device)
        ok = sub.allowed(slots)
        # Stable "first k allowed columns": sort column positions with ineligible ones pushed back.
        ncol = slots.shape[1]
        pos = torch.arange(ncol, device=device).expand_as(slots)
        key = torch.where(ok, pos, pos + ncol)
        order = key.argsort(dim=1)[:, :k]
        picked_ok = ok.gather(1, order)
        picked = sims.gather(1, order).float()
        picked_sims = torch.where(picked_ok, picked, torch.full_like(picked, _NEG_INF))
        picked_slots = torch.where(picked_ok, slots.gather(1, order), torch.full_like(order, -1))
        width = picked_sims.shape[1]
        out_sims[rows, :width] = picked_sims
        out_slots[rows, :width] = picked_slots
        exhausted_here = (slots < 0).any(dim=1)  # the index returned fewer than n candidates
        if n >= ntotal and effort >= max_effort:
            break
        short = ok.sum(dim=1) < k
        if not bool(short.any()):
            break
        rows = rows[short]
        sub = flt.rows(rows)
        q = queries[rows.to(queries.device)]
        if bool(exhausted_here[short].any()) and effort < max_effort:
            effort = min(max_effort, effort * 4)
        else:
            n = min(ntotal, n * 4)
    return out_sims, out_slots


def create_retriever(name: str, **kwargs: Any) -> Retriever:
    """Build a backend by registry name; ``None`` option values mean "use the default".

    Unknown names and options raise ConfigError naming ``memory.backend`` and the valid choices.
    """
    if name == AUTO_BACKEND:
        raise ConfigError(
            "memory.backend=auto is resolved from the bank's size and device, which create_retriever "
            "does not know; build a MemoryBank (it resolves auto), or call resolve_backend(...) first"
        )
    try:
        cls = RETRIEVERS.get(name)
    except UnknownNameError:
        raise UnknownNameError(
            f"memory.backend={name!r} is not a retrieval backend; "
            f"set memory.backend to one of: {', '.join(RETRIEVERS.names())}, {AUTO_BACKEND}"
        ) from None
    # None means "default" (Hydra configs carry e.g. memory.nlist: null for every backend).
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    unknown = sorted(set(kwargs) - set(cls.options))
    if unknown:
        accepted = ", ".join(cls.options) or "none"
        raise ConfigError(
            f"retrieval backend {name!r} does not accept option(s) {', '.join(unknown)}; "
            f"accepted options: {accepted} (drop the others, e.g. memory.nlist only applies to faiss_ivf)"
        )
    return cls(**kwargs)


# ------------------------------------------------------------------------------- memory.backend=auto
AUTO_BACKEND = "auto"

#: CPU banks with M * D at or above this search with faiss_flat, smaller ones with torch (both
#: exact). Measured with bench/retrieval.py; see :func:`choose_backend`.
CPU_FLAT_MIN_WORK = 2**20

#: CUDA banks of at least this many entries search with GPU faiss_ivf when the bank is frozen
#: (memory.update=frozen) and faiss has GPUs; see :func:`choose_backend`. A stand-in threshold
#: (performance-anchors.md: "faiss earns its place with IVF indexes on large banks"), not measured
#: on a GPU here: ``bench/retrieval.py --devices cuda`` with faiss-gpu measures it.
CUDA_IVF_MIN_SIZE = 1_000_000


@dataclass(frozen=True)
class BackendChoice:
    """What ``memory.backend=auto`` picked for a bank, and why (shown in the log and on the bank)."""

    name: str
    exact: bool
    reason: str


def _faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _faiss_gpu_available() -> bool:
    """faiss is installed, built with GPUs (faiss-gpu, not faiss-cpu), and sees at least one."""
    if not _faiss_installed():
        return False
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_backend(
    size: int,
    dim: int,
    device: torch.device | str,
    faiss_available: bool | None = None,
    *,
    frozen: bool = False,
    faiss_gpu: bool | None = None,
) -> BackendChoice:
    """The backend ``memory.backend=auto`` uses for a bank of ``size`` (M) x ``dim`` (D) on ``device``.

    A pure function of (M, D, device type, whether the bank is ``frozen`` after its fill) and of
    what faiss offers (``faiss_available``: installed; ``faiss_gpu``: built with GPUs and seeing
    one; both detected when None); nothing is allocated.

    Rule:

    * CUDA, a frozen bank (memory.update=frozen) of M >= ``CUDA_IVF_MIN_SIZE`` (1,000,000)
      entries, and faiss with GPUs (``pip install 'ickd[faiss-gpu]'``): ``faiss_ivf`` on the GPU
      (approximate; nprobe = nlist / 8 had recall@16 0.97 at 1,281,167 x 512 on the CPU, table
      below). IVF scans about 1/8 of the bank per query where exact search reads all of it
      (performance-anchors.md: "faiss earns its place with IVF indexes on large banks"; exact
      torch takes 5.8 ms at 1,281,167 x 512 and 16.0 ms at 1,281,167 x 2048 per 256 queries).
      Only frozen banks: ``faiss_ivf`` keeps its master index on the CPU and re-clones it to the
      GPU after every write, which a bank updated at every step (overwrite, momentum) would pay
      at every step. Its k-means training runs once, on the CPU master (452 s at 1,281,167 x 512
      on 2 cores, table below), and is paid back over a run's epochs of queries. The 1,000,000
      threshold is a stand-in, not measured on a GPU here.
    * CUDA otherwise: ``torch``. One fp16 matmul + top-k over the bank is the fastest exact search
      at 50,000 to 1,281,167 entries (performance-anchors.md: 0.14 ms for 50,000 x 256 and 64
      queries, 5.8 ms for 1,281,167 x 512 and 256 queries, on an H200; published issue threads
      report faiss's GPU brute force slower at these sizes) and it never waits for the host, so it can run inside a CUDA graph.
    * Other non-CPU devices: ``torch``, the only backend that searches there.
    * CPU, M * D < ``CPU_FLAT_MIN_WORK`` (2**20 = 1,048,576): ``torch``.
    * CPU, M * D >= 2**20: ``faiss_flat`` (exact; BLAS brute force), or ``torch`` without faiss.
    * ``faiss_ivf`` is never chosen: at its defaults it was at most 12% faster than ``faiss_flat``
      (20,000 x 256; slower once its k-means re-training is counted) and slower at every larger
      size measured, while approximate. Choose it explicitly, with a small ``memory.nprobe``, to
      trade recall for speed (numbers below).

    Measurements (bench/retrieval.py through ``MemoryBank.retrieve``, top-16, self-exclusion, one
    batch written back before each retrieval; AMD EPYC, 2 cores, torch 2.14.1 and faiss 1.15.1 with
    2 threads each, load average 0.9-2.0 with the benchmark's own threads; ms per query batch,
    median):

    ====================  =======  =====  ==========  ==========================================
    bank M x D            queries  torch  faiss_flat  faiss_ivf (nlist ~ 4 sqrt(M), nprobe = /8)
    ====================  =======  =====  ==========  ==========================================
    1,000 x 64            64       0.75   0.98
    2,000 x 64            64       0.78   1.15
    5,000 x 128           64       1.89   2.04
    10,000 x 128          64       4.03   3.25
    20,000 x 256          64       14.3   9.1         8.1, recall@16 0.831; 1st call 0.5 s
    50,000 x 256          64       30.9   19.5        21.0, recall@16 0.875; 1st call 2.2 s
    50,000 x 256          512      181.7  103.2       153.1, recall@16 0.878
    100,000 x 128         256      125.9  65.2        83.4, recall@16 0.901; 1st call 3.6 s
    200,000 x 128         256      248.2  125.3       164.0, recall@16 0.919; 1st call 10.4 s
    200,000 x 512         256      668.9  343.1       569.2, recall@16 0.927; 1st call 29.6 s
    1,281,167 x 512       256      4255   2255        3629, recall@16 0.970; 1st call 452 s
    ====================  =======  =====  ==========  ==========================================

    ("1st call": the first retrieval of a fresh bank, which trains the IVF k-means.)
    The torch/faiss_flat crossover lies between 5,000 x 128 (torch 8% faster) and 10,000 x 128
    (faiss_flat 24% faster); above it faiss_flat is 1.5-2x faster than torch. faiss_flat owes this
    to :func:`ickd.memory.faiss_backend.blas_search`: with faiss 1.15's own switch it used a
    non-BLAS kernel below 500 queries at D = 256 and was 3.8-4.8x *slower* than torch at 64-256
    queries from 20,000 x 256 to 200,000 x 512.

    IVF scans nprobe / nlist = 1/8 of the bank without BLAS, which cost about as much as the exact
    BLAS search over all of it, mostly more (table), plus a k-means re-training every M writes
    (``retrain_every``, about once an epoch). Its speed comes only from a smaller nprobe, paid in
    recall: with 256 queries, nprobe = 8 took 12.9 ms at 50,000 x 256 (recall@16 0.679) and 15.4 ms
    at 200,000 x 128 (0.554); nprobe = 28 took 24.9 ms (0.763) and 28.4 ms (0.746), against
    54.9 and 119.0 ms for faiss_flat in a run minutes earlier. Recall depends on the data: these
    features are synthetic class clusters where about 70% of the exact top-16 share the query's
    label at 50,000 x 256 (more at larger M).
    """
    dev = torch.device(device)
    if faiss_available is None:
        faiss_available = _faiss_installed()
    work = size * dim
    if dev.type == "cuda":
        if frozen and size >= CUDA_IVF_MIN_SIZE:
            if faiss_gpu is None:
                faiss_gpu = _faiss_gpu_available()
            if faiss_gpu:
                return BackendChoice(
                    "faiss_ivf", False,
                    f"a frozen bank of M = {size:,} >= {CUDA_IVF_MIN_SIZE:,} entries on CUDA: GPU faiss's IVF "
                    "index scans about 1/8 of it per query where exact search reads all of it "
                    "(performance-anchors.md: faiss earns its place with IVF on large banks)",
                )
            return BackendChoice(
                "torch", True,
                f"a frozen bank of M = {size:,} >= {CUDA_IVF_MIN_SIZE:,} entries on CUDA would use GPU faiss_ivf, "
                "but faiss with GPU support is not installed (pip install 'ickd[faiss-gpu]'); exact torch "
                "matmul + top-k instead",
            )
        return BackendChoice(
            "torch", True,
            "on CUDA one matmul + top-k over the bank is the fastest exact search from 50,000 to "
            "1,281,167 entries (performance-anchors.md) and never waits for the host"
            + ("" if frozen else "; faiss_ivf on the GPU is chosen only for frozen banks (memory.update=frozen)")
            + (f" of >= {CUDA_IVF_MIN_SIZE:,} entries" if size < CUDA_IVF_MIN_SIZE else ""),
        )
    if dev.type != "cpu":
        return BackendChoice("torch", True, f"torch is the only backend that searches on a {dev.type} device")
    if work < CPU_FLAT_MIN_WORK:
        return BackendChoice(
            "torch", True,
            f"M*D = {work:,} < {CPU_FLAT_MIN_WORK:,}: on the CPU torch's matmul + top-k is the faster "
            "exact search for small banks (bench/retrieval.py)",
        )
    if not faiss_available:
        return BackendChoice(
            "torch", True,
            f"M*D = {work:,} >= {CPU_FLAT_MIN_WORK:,} would use faiss_flat, but faiss is not installed "
            "(pip install 'ickd[faiss-cpu]' for 1.5-2x faster exact search on the CPU)",
        )
    return BackendChoice(
        "faiss_flat", True,
        f"M*D = {work:,} >= {CPU_FLAT_MIN_WORK:,}: on the CPU faiss's BLAS brute force is 1.5-2x faster "
        "than torch and exact (bench/retrieval.py); faiss_ivf is never chosen automatically",
    )


def resolve_backend(
    name: str,
    size: int,
    dim: int,
    device: torch.device | str,
    options: dict[str, Any] | None = None,
    frozen: bool = False,
) -> tuple[str, dict[str, Any], str]:
    """(backend name, its options, reason) for ``memory.backend=name`` on a bank of ``size`` x ``dim``.

    Explicit names pass through unchanged (``create_retriever`` validates them and their options).
    ``auto`` runs :func:`choose_backend`, logs the choice once on the ``ickd.memory`` logger, and
    drops options the chosen backend does not take (e.g. ``memory.nlist`` when torch is chosen);
    the log line names them.
    """
    options = dict(options or {})
    if name != AUTO_BACKEND:
        return name, options, f"memory.backend={name} was set explicitly"
    # memory.use_gpu=false rules GPU faiss out; the GPU IVF choice then falls back to torch.
    faiss_gpu = False if options.get("use_gpu") is False else None
    choice = choose_backend(size, dim, device, frozen=frozen, faiss_gpu=faiss_gpu)
    accepted = set(RETRIEVERS.get(choice.name).options)
    dropped = sorted(key for key, value in options.items() if key not in accepted and value is not None)
    kept = {key: value for key, value in options.items() if key in accepted}
    if choice.name == "faiss_ivf" and torch.device(device).type == "cuda":
        kept["use_gpu"] = True
    reason = choice.reason
    if dropped:
        reason += f" (ignoring option(s) {', '.join(dropped)}, which {choice.name} does not take)"
    log.info(
        "memory.backend=auto chose %s (%s) for a %d x %d bank on %s: %s",
        choice.name, "exact" if choice.exact else "approximate", size, dim, torch.device(device).type, reason,
    )
    return choice.name, kept, reason
