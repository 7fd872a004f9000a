"""Memory bank of teacher features/logits/labels and its retrieval backends (see docs/method.md)."""
from ickd.memory import faiss_backend as _faiss_backend  # noqa: F401  (registers faiss_flat / faiss_ivf)
from ickd.memory.bank import SPLITS, SUBSETS, UPDATES, MemoryBank, Neighbours
from ickd.memory.faiss_backend import MissingDependencyError, default_nlist
from ickd.memory.retrieval import RETRIEVERS, Retriever, SearchFilter, create_retriever

__all__ = [
    "MemoryBank",
    "Neighbours",
    "RETRIEVERS",
    "Retriever",
    "SearchFilter",
    "create_retriever",
    "MissingDependencyError",
    "default_nlist",
    "SPLITS",
    "SUBSETS",
    "UPDATES",
]
