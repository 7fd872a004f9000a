"""The IC-KD memory bank: teacher features, logits and labels per training sample, plus retrieval.

Layout. The bank has M slots. Each slot holds an L2-normalised feature (``feature_dtype``), the
teacher's logits (float32, because losses soften them by a temperature), the label and the sample
index that wrote it (-1 = empty). How samples map to slots:

* M = N (``size`` None or N): slot = sample index.
* M < N, ``subset="random"``: a fixed random subset of M sample indices (drawn from ``seed``) owns
  the slots; writes of other samples are ignored.
* M < N, ``subset="fifo"``: a ring buffer of the M most recent writes. A sample holds at most one
  slot: writing it again invalidates its previous slot if that slot still holds it (the slot stays
  empty until the ring comes round), so no query ever gets the same sample twice.

Writes. ``fill`` always writes (initial teacher pass). ``update`` follows ``update``:
``frozen`` = no-op; ``overwrite`` = replace; ``momentum`` = ``m*old + (1-m)*new`` for the feature
(re-normalised) and the logits, only where the slot already holds that sample (a first write is
plain). For FIFO, ``overwrite`` and ``momentum`` both enqueue (a queue has no "old" entry of the
sample to mix with) and ``frozen`` keeps the fill.

Feature transform (``feature_transform``; docs/method.md "Revision 2"). Pooled features after a
ReLU are all non-negative, so their cosines are nearly flat (top-16 ~0.988 +- 0.006). The bank
stores u = normalize(T(normalize(f))) and transforms queries the same way inside ``retrieve``, so
similarities are cosines in the transformed space:

* ``none``: T(v) = v.
* ``center``: T(v) = v - mu, mu the mean of the bank's (normalised, untransformed) features.
* ``center_whiten``: T(v) = (v - mu) P, P the PCA whitening of the centred entries (eigenvalues
  + 1e-5 x their mean), computed once at the end of the fill pass and then frozen.

mu is set exactly from the bank's entries by :meth:`finish_fill` (which ends a fill pass begun with
:meth:`begin_fill`; entries are stored untransformed during the pass and transformed once at its
end). After that, and from the first written batch for banks filled online (no fill pass), every
write first moves mu as an EMA of the written rows' mean, ``mu <- c*mu + (1-c)*batch_mean`` with
``center_momentum`` c, and then stores its rows transformed with that mu; entries already stored
keep the mu of their own write. With ``update=momentum`` the mixing happens in the transformed space.

Retrieval (``retrieval``): ``knn`` = the nearest entries; ``random`` = the random-neighbour ablation,
which keeps each row's numbers of same-class and other-class neighbours (those the k-NN search
found for ``split="topk"``, k_pos and k_neg for ``split="separate"``) but draws them uniformly at
random among the eligible entries, from a bank-owned generator seeded from ``seed``.

Host synchronisation. Once every slot holds an entry (after the fill pass), ``retrieve`` with the
``torch`` backend and ``update`` in M = N or FIFO mode never wait for the device (the EMA of mu and
its "set" flag are device tensors); while the bank fills up, and for random subsets, a few small
syncs happen per write. ``begin_fill``/``finish_fill``, ``num_valid`` and checkpointing may sync.

Structure. :class:`MemoryBank` is the public facade (validation, timing, backend choice, storage
tensors, checkpoints) over three parts: the slot policy (:mod:`ickd.memory.slots`: ``DirectSlots``,
``RandomSubsetSlots``, ``FifoSlots``), the write rules (:mod:`ickd.memory.writes`: ``UpdateRule``,
``FeatureTransform``) and the search (:mod:`ickd.memory.search`: ``BankSearch`` over a
:class:`~ickd.memory.retrieval.Retriever` backend).
"""
from __future__ import annotations

import operator
import time
from typing import Any

import torch
import torch.nn.functional as F

from ickd import fastpath
from ickd.errors import CheckpointError, ConfigError
from ickd.memory.retrieval import Retriever, TorchExactRetriever, create_retriever, resolve_backend
from ickd.memory.search import BankSearch, Neighbours
from ickd.memory.slots import SlotPolicy, make_slots
from ickd.memory.writes import FeatureTransform, UpdateRule

__all__ = ["MemoryBank", "Neighbours", "SUBSETS", "UPDATES", "SPLITS", "TRANSFORMS", "RETRIEVALS"]

SUBSETS = ("fifo", "random")
UPDATES = ("frozen", "overwrite", "momentum")
SPLITS = ("topk", "separate")
TRANSFORMS = ("none", "center", "center_whiten")
RETRIEVALS = ("knn", "random")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# 2: feature transform (mu, whitening, fill-pass flag), FIFO slot map, random-retrieval generator.
_STATE_VERSION = 2
# Whitening adds this times the mean eigenvalue to every eigenvalue (memory.whiten_eps). 1e-2 keeps the
# near-null directions of post-ReLU features from dominating (docs/method.md, "Feature transform").
_WHITEN_EPS = 1e-2

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

    See the module docstring for slot layout, write rules and the feature transform,
    ``docs/method.md`` for the method. The bank is a facade over its slot policy (``slots``,
    :mod:`ickd.memory.slots`), its write rules (:mod:`ickd.memory.writes`) and its search
    (:mod:`ickd.memory.search`, over a :class:`~ickd.memory.retrieval.Retriever` backend).
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
        feature_transform: str = "none",
        center_momentum: float = 0.99,
        retrieval: str = "knn",
        whiten_eps: float = _WHITEN_EPS,
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
        if feature_transform not in TRANSFORMS:
            raise ConfigError(
                f"memory.feature_transform={feature_transform!r} is not valid; choose one of: {', '.join(TRANSFORMS)}"
            )
        cm = center_momentum
        if not isinstance(cm, (int, float)) or isinstance(cm, bool) or not 0.0 <= cm < 1.0:
            raise ConfigError(
                f"memory.center_momentum={cm!r} must be in [0, 1); the bank's mean feature follows "
                "mu = c*mu + (1-c)*batch_mean, so c=0 uses the last batch and c close to 1 changes slowly"
            )
        self._check_retrieval(retrieval)
        if not isinstance(whiten_eps, (int, float)) or isinstance(whiten_eps, bool) or not whiten_eps > 0:
            raise ConfigError(
                f"memory.whiten_eps={whiten_eps!r} must be a positive number (default {_WHITEN_EPS}); it is added, "
                "times the mean eigenvalue, to every eigenvalue before whitening"
            )

        self.num_samples, self.feature_dim, self.num_logits, self.size = n, d, c, m
        self.subset, self.retrieval = subset, retrieval
        self.feature_dtype = _resolve_dtype(feature_dtype)
        self.device = torch.device(device)
        self.seed = int(seed)

        self.feats = torch.zeros(m, d, dtype=self.feature_dtype, device=self.device)
        self.logits = torch.zeros(m, c, dtype=torch.float32, device=self.device)
        self.labels = torch.full((m,), -1, dtype=torch.long, device=self.device)
        self.sample_idx = torch.full((m,), -1, dtype=torch.long, device=self.device)
        # Which samples own which slots: "direct" (M = N), else the subset rule decides.
        self.slots: SlotPolicy = make_slots(n, m, subset, self.seed, self.device)
        # True once every slot holds an entry, for good (slots.fills_for_good: M = N and random
        # subsets). FIFO banks never set it: re-writing a sample leaves a hole where its previous slot was.
        self._all_valid = False

        self._rule = UpdateRule(update, momentum)
        self._xf = FeatureTransform(feature_transform, d, cm, whiten_eps, self.device)
        # (query tensor, its version, its L2-normalised rows) of the last retrieval: the step then
        # writes the same tensor, whose normalisation is not computed twice (``lean_bank``).
        self._unit_memo: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._in_fill_pass = False

        self._search = BankSearch(m, self.device, self.seed)

        # memory.backend=auto becomes a concrete backend here (it depends on M, D and the device);
        # backend_requested keeps what was asked for, backend_reason why this one runs.
        self.backend_requested = retriever
        self.retriever_name, self.retriever_kwargs, self.backend_reason = resolve_backend(
            retriever, m, d, self.device, retriever_kwargs, frozen=update == "frozen"
        )
        self.retriever: Retriever = create_retriever(self.retriever_name, **self.retriever_kwargs)
        self.retriever.bind(m, d, self.device)
        self._timer = _Timer()

    @staticmethod
    def _check_retrieval(retrieval: str) -> None:
        if retrieval not in RETRIEVALS:
            raise ConfigError(
                f"memory.retrieval={retrieval!r} is not valid; choose one of: {', '.join(RETRIEVALS)} "
                "(random = the random-neighbour ablation)"
            )

    # ------------------------------------------------------------------ properties
    @property
    def mode(self) -> str:
        """The slot layout: ``direct`` (M = N), ``random`` or ``fifo`` (read-only)."""
        return self.slots.name

    @property
    def update_rule(self) -> str:
        return self._rule.name

    @property
    def momentum(self) -> float:
        return self._rule.momentum

    @property
    def feature_transform(self) -> str:
        return self._xf.kind

    @property
    def center_momentum(self) -> float:
        return self._xf.center_momentum

    @property
    def whiten_eps(self) -> float:
        return self._xf.whiten_eps

    @property
    def mu(self) -> torch.Tensor:
        """(D,) float32 mean of the bank's normalised, untransformed features (feature transform)."""
        return self._xf.mu

    @property
    def mu_set(self) -> torch.Tensor:
        """() bool device flag: ``mu`` holds a mean."""
        return self._xf.mu_set

    @property
    def whiten(self) -> torch.Tensor | None:
        """(D, D) float32 whitening of ``center_whiten`` (None before a fill pass ends)."""
        return self._xf.whiten

    @property
    def subset_indices(self) -> torch.Tensor | None:
        """The samples owning the slots of a random-subset bank (None otherwise)."""
        return self.slots.subset_indices

    @property
    def slot_of(self) -> torch.Tensor | None:
        """(N,) sample -> slot (random subsets: fixed; FIFO: the slot of the sample's latest write,
        which still holds it only while ``sample_idx[slot]`` equals it); None for M = N."""
        return self.slots.slot_of

    @property
    def fifo_ptr(self) -> int:
        return self.slots.fifo_ptr

    @property
    def fifo_count(self) -> int:
        return self.slots.fifo_count

    @property
    def num_valid(self) -> int:
        """Number of slots holding an entry."""
        if self._all_valid:
            return self.size
        return int((self.sample_idx >= 0).sum())

    @property
    def in_fill_pass(self) -> bool:
        """True between :meth:`begin_fill` and :meth:`finish_fill`."""
        return self._in_fill_pass

    @property
    def nbytes(self) -> int:
        """Bytes held by the bank's tensors and its retrieval backend."""
        tensors = [self.feats, self.logits, self.labels, self.sample_idx, *self.slots.tensors, self.mu, self.whiten]
        own = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return own + self.retriever.nbytes

    def capture_blocker(self) -> str | None:
        """Why a CUDA graph cannot hold this bank's retrieval and writes yet (None: it can).

        A graph replays fixed kernels on fixed addresses, so the step must not branch on device
        values or keep Python-side positions: only an exact torch search over a full bank whose slot
        is the sample index (M = N) qualifies."""
        if self.retriever.name != "torch":
            return f"backend {self.retriever.name!r} searches through the host; use memory.backend=torch"
        blocker = self.slots.capture_blocker()
        if blocker is not None:
            return blocker
        if self._in_fill_pass:
            return "the bank's fill pass has not finished (finish_fill)"
        if not self._all_valid:
            return "the bank is not full yet"
        if self.retrieval == "random":
            # A graph replays the generator offsets it captured unless the generator is registered
            # with it; eager steps keep the ablation's draws exact and resumable.
            return "memory.retrieval=random draws from the bank's own random generator"
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
            f"mode={self.mode}, update={self.update_rule}, transform={self.feature_transform}, "
            f"retrieval={self.retrieval}, backend={self.retriever_name}, "
            f"dtype={self.feature_dtype}, device={self.device})"
        )

    # ------------------------------------------------------------------ feature transform
    def _transform(self, v: torch.Tensor) -> torch.Tensor:
        """u = normalize(T(v)) for normalised float32 rows ``v`` (module docstring)."""
        return self._xf.apply(v)

    def _no_whitening_error(self) -> ConfigError:
        return ConfigError(
            "memory.feature_transform=center_whiten computes its whitening once, from the bank filled by a fill "
            "pass (begin_fill ... finish_fill), but this bank is written without one; use "
            "memory.feature_transform=center, or memory.fill=pass in the offline paradigm"
        )

    def _check_ready(self, what: str) -> None:
        if self._in_fill_pass:
            raise ConfigError(
                f"memory bank {what} during a fill pass: call finish_fill() after the pass's fill() calls "
                "(Distiller.fill_banks does) before retrieving or updating"
            )
        if self._xf.needs_whitening:
            raise self._no_whitening_error()

    def begin_fill(self) -> None:
        """Start a fill pass: empty the bank; until :meth:`finish_fill`, ``fill`` stores the
        untransformed normalised features and ``retrieve``/``update`` refuse to run."""
        with torch.no_grad():
            self.feats.zero_()
            self.logits.zero_()
            self.labels.fill_(-1)
            self.sample_idx.fill_(-1)
            self.slots.reset()
        self._xf.reset()
        self._all_valid = False
        self._in_fill_pass = True
        self.retriever.on_reset()

    @torch.no_grad()
    def finish_fill(self) -> None:
        """End the fill pass: set mu (and the whitening for ``center_whiten``) exactly from the
        bank's entries, transform every stored entry once, and let the backend rebuild its index."""
        if not self._in_fill_pass:
            raise ConfigError(
                "finish_fill() ends a fill pass, but none is running: call begin_fill() before the pass's "
                "fill() calls (Distiller.fill_banks does both)"
            )
        self._in_fill_pass = False
        if self._xf.fit(self.feats, self.sample_idx, self.feature_dtype):
            self.retriever.on_reset()

    # ------------------------------------------------------------------ writes
    def fill(self, indices: torch.Tensor, feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Initial fill (e.g. one no-grad teacher pass); writes whatever the update rule."""
        self._write(indices, feats, logits, labels, mix=False, check_range=True)

    def update(self, indices: torch.Tensor, feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Per-step update following the update rule (no-op when frozen)."""
        if self._rule.frozen:
            return
        self._check_ready("update")
        # Range checks need the indices on the host; skip them for device tensors in the hot loop.
        self._write(
            indices, feats, logits, labels,
            mix=self._rule.mixes(self.slots.keeps_history),
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
        if not self._in_fill_pass and self._xf.needs_whitening:
            raise self._no_whitening_error()
        if indices.shape[0] == 0:
            return
        dev = self.device
        idx = indices.detach().to(dev, torch.long)
        if check_range and not fastpath.capturing(dev):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_samples:
                raise ConfigError(
                    f"sample indices must lie in [0, {self.num_samples}) but got [{lo}, {hi}]; the dataset "
                    "must return each sample's index in the training set (and num_samples must be N)"
                )
        memo, self._unit_memo = self._unit_memo, None
        if memo is not None and memo[0] is feats and memo[1] == feats._version:
            f = memo[2]  # the rows the step's retrieval normalised: same values
        else:
            f = F.normalize(feats.detach().to(dev, torch.float32), dim=1)
        z = logits.detach().to(dev, torch.float32)
        y = labels.detach().to(dev, torch.long)

        placed = self.slots.place(idx, (f, z, y), self.sample_idx, self.labels)
        if placed is None:
            return
        slots, idx, (f, z, y) = placed

        if not self._in_fill_pass:  # during a fill pass entries stay untransformed until finish_fill
            self._xf.track_mean(f)
            f = self._xf.apply(f)
        if mix:
            f, z = self._rule.mix(slots, idx, f, z, self.feats, self.logits, self.sample_idx)

        self.feats.index_copy_(0, slots, f.to(self.feature_dtype))
        self.logits.index_copy_(0, slots, z)
        if not (self._lean_full() and not self._in_fill_pass):
            # A full index-addressed bank (M = N) holds sample i's label and index at slot i for
            # good: re-writing them changes nothing.
            self.labels.index_copy_(0, slots, y)
            self.sample_idx.index_copy_(0, slots, idx)
        if not self._all_valid and self.slots.fills_for_good:
            # Validity never goes back to False here, so this sync stops once the bank is full.
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

    def _lean_full(self) -> bool:
        """``ickd.fastpath`` switch ``lean_bank`` applies: M = N, every slot filled, exact torch search."""
        return (self._all_valid and self.slots.index_addressed and fastpath.enabled("lean_bank")
                and isinstance(self.retriever, TorchExactRetriever))

    def _valid_mask(self) -> torch.Tensor | None:
        if self._all_valid:
            return None
        if self.slots.ring_full and not isinstance(self.retriever, TorchExactRetriever):
            # Every slot of the FIFO ring has been written; the holes left by re-written samples have
            # sample -1, which the host-side backends' post-filter (SearchFilter.allowed) drops.
            # Passing None spares them a copy of the valid rows per search.
            return None
        return self.sample_idx >= 0

    def retrieve(
        self,
        query_feats: torch.Tensor,
        k: int,
        query_labels: torch.Tensor,
        exclude_indices: torch.Tensor | None = None,
        split: str = "topk",
        k_pos: int | None = None,
        k_neg: int | None = None,
        retrieval: str | None = None,
    ) -> Neighbours:
        """The in-context neighbours of each query (see :class:`Neighbours`).

        ``split="topk"``: the k nearest by cosine, split by label into positives/negatives.
        ``split="separate"``: the k_pos nearest same-class and the k_neg nearest other-class entries.
        ``exclude_indices`` (B,): entries written by that sample are never returned.
        ``retrieval`` (default: the bank's): ``knn``, or ``random`` for the random-neighbour
        ablation (module docstring). Queries are transformed like the bank's entries.
        """
        retrieval = self.retrieval if retrieval is None else retrieval
        self._check_retrieval(retrieval)
        self.check_k(k, k_pos, k_neg, split)
        self._check_ready("retrieval")
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
        dev = self.device
        token = self._timer.start(dev)
        unit = F.normalize(query_feats.detach().to(dev, torch.float32), dim=1)
        self._unit_memo = (query_feats, query_feats._version, unit) if fastpath.enabled("lean_bank") else None
        q = self._xf.apply(unit)
        ql = query_labels.detach().to(dev, torch.long)
        ex = None if exclude_indices is None else exclude_indices.detach().to(dev, torch.long)
        if split == "topk" and retrieval == "knn" and self._lean_full():
            nb = self._search.full(self, q, k, ql, ex)
        else:
            nb = self._search.search(self, q, k, ql, ex, split, k_pos, k_neg, retrieval)
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
            **self.slots.state_dict(),  # subset_indices, slot_of, fifo_ptr, fifo_count
            "feature_transform": self.feature_transform,
            "mu": self.mu,
            "mu_set": self.mu_set,
            "whiten": self.whiten,
            "in_fill_pass": self._in_fill_pass,
            "generator": self._search.gen.get_state(),
            "retrieval_ms_total": self._timer.resolved_total_ms(),
            "retrievals": self._timer.count,
            "retriever_name": self.retriever_name,
            "retriever": self.retriever.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a bank saved by :meth:`state_dict`; the bank must have the same geometry.

        Version-1 states (before the feature transform) load into a ``feature_transform="none"``
        bank only: their entries are untransformed."""
        version = sd.get("version")
        if version not in (1, _STATE_VERSION) or "geometry" not in sd:
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
        saved_transform = sd.get("feature_transform", "none")
        if version == 1 and self.feature_transform != "none":
            raise CheckpointError(
                "the memory-bank checkpoint predates memory.feature_transform: its entries are untransformed, "
                f"but this run uses memory.feature_transform={self.feature_transform}; resume with "
                "memory.feature_transform=none, or start the run afresh"
            )
        if saved_transform != self.feature_transform:
            raise CheckpointError(
                f"the memory-bank checkpoint stores features under memory.feature_transform={saved_transform} "
                f"but this run uses memory.feature_transform={self.feature_transform}; resume with "
                f"memory.feature_transform={saved_transform}, or start the run afresh"
            )
        with torch.no_grad():
            self.feats.copy_(sd["feats"].to(self.device, self.feature_dtype))
            self.logits.copy_(sd["logits"].to(self.device))
            self.labels.copy_(sd["labels"].to(self.device))
            self.sample_idx.copy_(sd["sample_idx"].to(self.device))
        if version == 1:
            self._xf.load(None, None, None)
        else:
            self._xf.load(sd["mu"], sd["mu_set"], sd.get("whiten"))
        self._in_fill_pass = bool(sd.get("in_fill_pass", False))
        if "generator" in sd:
            self._search.gen.set_state(sd["generator"].cpu())
        self.slots.load_state_dict(sd, self.sample_idx, self.labels)
        self._all_valid = self.slots.fills_for_good and bool((self.sample_idx >= 0).all())
        self._timer = _Timer()
        self._timer.total_ms = float(sd.get("retrieval_ms_total", 0.0))
        self._timer.count = int(sd.get("retrievals", 0))
        if sd.get("retriever_name") == self.retriever_name:
            self.retriever.load_state_dict(sd.get("retriever", {}))
        else:  # backend changed on resume (allowed): rebuild its state from the restored content
            self.retriever.on_reset()
