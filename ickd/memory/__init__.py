"""Memory bank of teacher features/logits/labels and its retrieval backends (see docs/method.md)."""
from ickd.memory.bank import SPLITS, SUBSETS, UPDATES, MemoryBank, Neighbours
# Importing faiss_backend registers faiss_flat / faiss_ivf (faiss itself is imported when one is built).
from ickd.memory.faiss_backend import MissingDependencyError, default_nlist
from ickd.memory.retrieval import (
    AUTO_BACKEND,
    RETRIEVERS,
    BackendChoice,
    Retriever,
    SearchFilter,
    choose_backend,
    create_retriever,
    resolve_backend,
)

__all__ = [
    "MemoryBank",
    "Neighbours",
    "RETRIEVERS",
    "Retriever",
    "SearchFilter",
    "create_retriever",
    "AUTO_BACKEND",
    "BackendChoice",
    "choose_backend",
    "resolve_backend",
    "MissingDependencyError",
    "default_nlist",
    "SPLITS",
    "SUBSETS",
    "UPDATES",
]
