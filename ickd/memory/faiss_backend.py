"""faiss retrieval backends: ``faiss_flat`` (exact inner product) and ``faiss_ivf`` (IndexIVFFlat).

faiss indexes cannot filter by sample index or label, so both backends over-fetch candidates and
post-filter them (:func:`ickd.memory.retrieval.filtered_search`), growing the candidate count (and,
for IVF, nprobe) for rows that come up short.

Brute-force searches (``faiss_flat``, IVF's coarse quantizer) run inside :func:`blas_search`, which
makes faiss use BLAS from 20 queries on: faiss 1.15's own switch keeps a much slower kernel for
every training-size batch (see ``_BLAS_MIN_QUERIES``).

Host copy: faiss-cpu reads float32 numpy arrays. A CPU float32 bank is read in place (zero copy);
any other bank (CUDA, float16) is mirrored in a float32 host array whose changed rows are copied
at the next search.

IVF staleness rule (OURS): the inverted lists always hold the *current* vectors: slots written since
the last search are removed (``remove_ids`` through a hashtable direct map) and re-added before
searching. The coarse centroids are re-trained from scratch (full rebuild) once ``retrain_every``
vectors have been written since the last training (default: M, about one epoch when M = N). Until
the bank holds ``min(39 * nlist, M)`` entries (faiss's minimum for a sound k-means) the backend
searches exactly instead.

GPU (``use_gpu=True`` and a faiss build with GPUs; else CPU with a warning): ``faiss_flat`` uses
``faiss.knn_gpu``; ``faiss_ivf`` keeps the CPU index as the master and re-clones it to the GPU when it
changed. Candidate counts above 2048 (faiss-GPU's k limit) run on the CPU. The GPU paths are not
exercised by the CPU test suite. On GPU the ``torch`` backend is usually the faster exact choice.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from ickd.errors import ConfigError
from ickd.memory.retrieval import RETRIEVERS, Retriever, SearchFilter, filtered_search

__all__ = [
    "FaissFlatRetriever",
    "FaissIVFRetriever",
    "MissingDependencyError",
    "default_nlist",
    "import_faiss",
]

_GPU_MAX_K = 2048  # faiss GPU k-selection supports k <= 2048
# Queries per call from which brute-force search (faiss.knn, IVF's coarse quantizer) goes through BLAS.
# faiss 1.15 keeps its non-BLAS kernel while queries * D < 128,000 (e.g. below 500 queries at
# D = 256): with it bench/retrieval.py measured faiss_flat 7.6-8.7x slower than with BLAS on a 2-core
# CPU (477 vs 55 ms at 50,000 x 256 and 256 queries); in a direct faiss.knn test BLAS was as fast or
# faster from 1 query on.
_BLAS_MIN_QUERIES = 20


@contextmanager
def blas_search(faiss: Any, dim: int) -> Iterator[None]:
    """Within the block, faiss brute-force search uses BLAS from ``_BLAS_MIN_QUERIES`` queries on.

    faiss's switch is a process-wide variable whose meaning changed between versions (queries, or
    queries * D); it is lowered only while our own search runs and restored after."""
    cvar = getattr(faiss, "cvar", None)
    if cvar is None or not hasattr(cvar, "distance_compute_blas_threshold"):
        yield
        return
    old = cvar.distance_compute_blas_threshold
    cvar.distance_compute_blas_threshold = min(old, _BLAS_MIN_QUERIES * dim)
    try:
        yield
    finally:
        cvar.distance_compute_blas_threshold = old


def default_nlist(size: int) -> int:
    """IVF list count when memory.nlist is null: about 4 sqrt(M), capped so each list trains on
    at least 39 points (faiss's k-means minimum), and at least 1."""
    return max(1, min(int(round(4 * math.sqrt(size))), size // 39))


class MissingDependencyError(ConfigError, ImportError):
    """An optional package a chosen setting needs is not installed."""


def import_faiss() -> Any:
    """Import faiss, or explain how to get it."""
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            "the faiss retrieval backends (memory.backend=faiss_flat / faiss_ivf) need the 'faiss' "
            "package, which is not installed (it is an extra): run `pip install 'ickd[faiss-cpu]'` "
            "(or 'ickd[faiss-gpu]' for GPU search; never both), or set memory.backend=auto or torch"
        ) from exc
    return faiss


class _FaissBase(Retriever):
    """Shared pieces: faiss import, GPU choice, float32 host view of the bank, exact search."""

    options: tuple[str, ...] = ("use_gpu", "gpu_device")

    def __init__(self, use_gpu: bool = False, gpu_device: int | None = None) -> None:
        super().__init__()
        self.faiss = import_faiss()
        self.use_gpu_requested = bool(use_gpu)
        self.gpu_device = gpu_device
        self.on_gpu = False
        self._gpu_res: Any = None
        self._mirror: np.ndarray | None = None
        self._mirror_dirty: np.ndarray | None = None

    def bind(self, size: int, dim: int, device: torch.device) -> None:
        super().bind(size, dim, device)
        self._mirror_dirty = np.zeros(size, dtype=bool)
        if self.use_gpu_requested:
            if self.faiss.get_num_gpus() > 0 and hasattr(self.faiss, "StandardGpuResources"):
                self.on_gpu = True
                if self.gpu_device is None:  # follow the bank's CUDA device when there is one
                    on_cuda = self.device.type == "cuda" and self.device.index is not None
                    self.gpu_device = self.device.index if on_cuda else 0
            else:
                warnings.warn(
                    f"memory backend {self.name!r}: use_gpu=True but this faiss build has no GPUs; "
                    "searching on the CPU (for GPU search replace faiss-cpu by `pip install 'ickd[faiss-gpu]'`)",
                    stacklevel=3,
                )

    def gpu_resources(self) -> Any:
        if self._gpu_res is None:
            self._gpu_res = self.faiss.StandardGpuResources()
        return self._gpu_res

    # ----- host view -------------------------------------------------------------------------
    def on_write(self, slots: torch.Tensor) -> None:
        if self._mirror is not None and self._mirror_dirty is not None:
            self._mirror_dirty[slots.detach().cpu().numpy()] = True

    def on_reset(self) -> None:
        self._mirror = None

    def host_feats(self, feats: torch.Tensor) -> np.ndarray:
        """A float32 numpy (M, D) view of the bank, current as of now."""
        if feats.device.type == "cpu" and feats.dtype == torch.float32 and feats.is_contiguous():
            return feats.numpy()
        if self._mirror is None:
            self._mirror = np.ascontiguousarray(feats.detach().float().cpu().numpy())
            self._mirror_dirty = np.zeros(feats.shape[0], dtype=bool)
        elif self._mirror_dirty is not None and self._mirror_dirty.any():
            rows = np.flatnonzero(self._mirror_dirty)
            picked = feats[torch.from_numpy(rows).to(feats.device)]
            self._mirror[rows] = picked.detach().float().cpu().numpy()
            self._mirror_dirty[:] = False
        return self._mirror

    @staticmethod
    def query_np(queries: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(queries.detach().float().cpu().numpy())

    # ----- exact search over the valid rows ----------------------------------------------------
    def exact_search(
        self,
        queries: torch.Tensor,
        feats: torch.Tensor,
        valid: torch.Tensor | None,
        k: int,
        flt: SearchFilter,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xb = self.host_feats(feats)
        if valid is None:
            base, id_map = xb, None
        else:
            id_map = np.flatnonzero(valid.detach().cpu().numpy())
            base = np.ascontiguousarray(xb[id_map])
        metric = self.faiss.METRIC_INNER_PRODUCT

        def raw(q: torch.Tensor, n: int, effort: int) -> tuple[torch.Tensor, torch.Tensor]:
            qn = self.query_np(q)
            if self.on_gpu and n <= _GPU_MAX_K:
                D, I = self.faiss.knn_gpu(self.gpu_resources(), qn, base, n, metric=metric, device=self.gpu_device)
            else:
                with blas_search(self.faiss, self.dim):
                    D, I = self.faiss.knn(qn, base, n, metric=metric)
            if id_map is not None:
                I = np.where(I >= 0, id_map[np.maximum(I, 0)], -1)
            return torch.from_numpy(np.asarray(D, dtype=np.float32)), torch.from_numpy(np.asarray(I, dtype=np.int64))

        return filtered_search(raw, queries, k, flt, ntotal=base.shape[0], max_effort=1, effort=1)

    @property
    def nbytes(self) -> int:
        return 0 if self._mirror is None else int(self._mirror.nbytes)


@RETRIEVERS.register("faiss_flat")
class FaissFlatRetriever(_FaissBase):
    """Exact inner-product search with ``faiss.knn`` (brute force, BLAS); no index to keep fresh."""

    name = "faiss_flat"
    exact = True

    def search(
        self,
        queries: torch.Tensor,
        feats: torch.Tensor,
        valid: torch.Tensor | None,
        k: int,
        flt: SearchFilter,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.exact_search(queries, feats, valid, k, flt)


@RETRIEVERS.register("faiss_ivf")
class FaissIVFRetriever(_FaissBase):
    """Approximate search with ``IndexIVFFlat`` (inner product); nprobe = nlist is exact.

    Options: ``nlist`` (default ``min(round(4 sqrt(M)), M // 39)``, at least 1), ``nprobe`` (default
    ``max(1, nlist // 8)``), ``retrain_every`` (vectors written between k-means re-trainings; default
    M; 0 = train once), ``use_gpu``, ``gpu_device``.
    """

    name = "faiss_ivf"
    exact = False
    options = ("nlist", "nprobe", "retrain_every", "use_gpu", "gpu_device")

    KMEANS_SEED = 1234  # fixed so that a rebuild from the same content gives the same index

    def __init__(
        self,
        nlist: int | None = None,
        nprobe: int | None = None,
        retrain_every: int | None = None,
        use_gpu: bool = False,
        gpu_device: int | None = None,
    ) -> None:
        super().__init__(use_gpu=use_gpu, gpu_device=gpu_device)
        self.nlist_requested, self.nprobe_requested, self.retrain_requested = nlist, nprobe, retrain_every
        self.nlist = self.nprobe = self.retrain_every = self.min_train = 0
        self._index: Any = None
        self._gpu_index: Any = None
        self._gpu_stale = True
        self._dirty = np.zeros(0, dtype=bool)
        self._writes_since_train = 0

    def bind(self, size: int, dim: int, device: torch.device) -> None:
        super().bind(size, dim, device)
        nlist = self.nlist_requested
        if nlist is None:
            nlist = default_nlist(size)
        if int(nlist) != nlist or nlist <= 0 or nlist > size:
            raise ConfigError(
                f"memory.nlist={nlist} is invalid for a bank of M={size} entries; "
                f"set memory.nlist to an integer in [1, {size}] (or null for the default)"
            )
        nprobe = self.nprobe_requested if self.nprobe_requested is not None else max(1, int(nlist) // 8)
        if int(nprobe) != nprobe or not 1 <= nprobe <= nlist:
            raise ConfigError(
                f"memory.nprobe={nprobe} is invalid with memory.nlist={nlist}; "
                f"set memory.nprobe to an integer in [1, {nlist}] (nprobe = nlist is exact search)"
            )
        retrain = self.retrain_requested if self.retrain_requested is not None else size
        if int(retrain) != retrain or retrain < 0:
            raise ConfigError(
                f"retrain_every={retrain} is invalid; use a non-negative integer (0 = train the IVF once)"
            )
        self.nlist, self.nprobe, self.retrain_every = int(nlist), int(nprobe), int(retrain)
        self.min_train = min(39 * self.nlist, size)
        self._dirty = np.zeros(size, dtype=bool)

    # ----- bookkeeping -------------------------------------------------------------------------
    def on_write(self, slots: torch.Tensor) -> None:
        super().on_write(slots)
        s = slots.detach().cpu().numpy()
        self._dirty[s] = True
        self._writes_since_train += int(s.size)

    def on_reset(self) -> None:
        super().on_reset()
        self._index = None
        self._gpu_index = None
        self._gpu_stale = True
        self._dirty[:] = False
        self._writes_since_train = 0

    def _build(self, xb: np.ndarray, valid_slots: np.ndarray) -> None:
        faiss = self.faiss
        x = np.ascontiguousarray(xb[valid_slots])
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.KMEANS_SEED
        index.train(x)
        # A hashtable direct map makes remove_ids of a few ids cheap (no scan of every list).
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.add_with_ids(x, valid_slots.astype(np.int64))
        self._quantizer = quantizer  # keep the Python object alive as long as the index
        self._index = index
        self._dirty[:] = False
        self._writes_since_train = 0
        self._gpu_stale = True

    def _sync(self, feats: torch.Tensor, valid: torch.Tensor | None) -> np.ndarray:
        """Bring the index up to date (see the module docstring); returns the host view."""
        xb = self.host_feats(feats)
        valid_np = None if valid is None else valid.detach().cpu().numpy()
        n_valid = self.size if valid_np is None else int(valid_np.sum())
        retrain = self.retrain_every > 0 and self._writes_since_train >= self.retrain_every
        if self._index is None or retrain:
            if n_valid >= self.min_train:
                slots = np.arange(self.size) if valid_np is None else np.flatnonzero(valid_np)
                self._build(xb, slots)
            else:
                self._index = None
            return xb
        if self._dirty.any():
            ids = np.flatnonzero(self._dirty).astype(np.int64)
            sel = self.faiss.IDSelectorArray(ids.size, self.faiss.swig_ptr(ids))
            self._index.remove_ids(sel)
            keep = ids if valid_np is None else ids[valid_np[ids]]
            if keep.size:
                self._index.add_with_ids(np.ascontiguousarray(xb[keep]), keep)
            self._dirty[:] = False
            self._gpu_stale = True
        return xb

    def search(
        self,
        queries: torch.Tensor,
        feats: torch.Tensor,
        valid: torch.Tensor | None,
        k: int,
        flt: SearchFilter,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._sync(feats, valid)
        if self._index is None:  # too few entries to train k-means: exact search meanwhile
            return self.exact_search(queries, feats, valid, k, flt)
        index = self._index
        if self.on_gpu and self._gpu_stale:
            self._gpu_index = self.faiss.index_cpu_to_gpu(self.gpu_resources(), self.gpu_device, index)
            self._gpu_stale = False

        def raw(q: torch.Tensor, n: int, effort: int) -> tuple[torch.Tensor, torch.Tensor]:
            qn = self.query_np(q)
            if self.on_gpu and n <= _GPU_MAX_K:
                self.faiss.GpuParameterSpace().set_index_parameter(self._gpu_index, "nprobe", effort)
                D, I = self._gpu_index.search(qn, n)
            else:
                with blas_search(self.faiss, self.dim):  # the coarse quantizer's search
                    D, I = index.search(qn, n, params=self.faiss.SearchParametersIVF(nprobe=effort))
            return torch.from_numpy(np.asarray(D, dtype=np.float32)), torch.from_numpy(np.asarray(I, dtype=np.int64))

        return filtered_search(
            raw, queries, k, flt, ntotal=int(index.ntotal), max_effort=self.nlist, effort=self.nprobe
        )

    # ----- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        blob = None
        if self._index is not None:
            blob = torch.from_numpy(np.array(self.faiss.serialize_index(self._index), dtype=np.uint8))
        return {
            "nlist": self.nlist,
            "index": blob,
            "dirty": torch.from_numpy(self._dirty.copy()),
            "writes_since_train": self._writes_since_train,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.on_reset()
        if sd.get("nlist") != self.nlist or sd.get("index") is None:
            return  # different geometry (or never trained): rebuilt from the bank at the next search
        self._index = self.faiss.deserialize_index(sd["index"].cpu().numpy().astype(np.uint8))
        self._dirty[:] = sd["dirty"].cpu().numpy().astype(bool)
        self._writes_since_train = int(sd["writes_since_train"])

    @property
    def nbytes(self) -> int:
        n = 0 if self._index is None else int(self._index.ntotal) * (4 * self.dim + 8) + self.nlist * 4 * self.dim
        return super().nbytes + n
