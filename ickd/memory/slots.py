"""Slot policies of the memory bank: how training samples map to the bank's M slots.

One object per layout (``MemoryBank.mode`` is its :attr:`SlotPolicy.name`):

* :class:`DirectSlots` (``"direct"``, M = N): slot = sample index.
* :class:`RandomSubsetSlots` (``"random"``, M < N): a fixed random subset of M sample indices
  (drawn from ``seed``) owns the slots; writes of other samples are ignored.
* :class:`FifoSlots` (``"fifo"``, M < N): a ring buffer of the M most recent writes. A sample holds
  at most one slot: writing it again empties its previous slot if that slot still holds it.

The interface: :meth:`~SlotPolicy.place` (which slots a batch of sample indices writes),
:meth:`~SlotPolicy.exclude_slots` (which slot each sample holds, for self-exclusion), the validity
facts the bank and its search rely on (:attr:`~SlotPolicy.fills_for_good`,
:attr:`~SlotPolicy.ring_full`, :attr:`~SlotPolicy.index_addressed`,
:attr:`~SlotPolicy.keeps_history`), :meth:`~SlotPolicy.reset` (a fill pass begins), the policy's part
of the bank's state_dict and :meth:`~SlotPolicy.capture_blocker`.

Policies hold only their own bookkeeping (``subset_indices``, ``slot_of``, the ring position); the
bank's ``sample_idx`` and ``labels`` are passed in where a policy reads or empties slots.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["SlotPolicy", "DirectSlots", "RandomSubsetSlots", "FifoSlots", "make_slots"]

Rows = tuple[torch.Tensor, ...]


class SlotPolicy:
    """Base: the interface, and the defaults of a layout whose slots never move (direct, random)."""

    name = ""
    # Each sample lands in the same slot on every write, so momentum can mix with the old entry.
    keeps_history = True
    # Once every slot holds an entry it stays so (FIFO: re-writing a sample leaves a hole).
    fills_for_good = True
    # slot = sample index (what a CUDA graph and the lean full-bank search need).
    index_addressed = False

    def __init__(self, num_samples: int, size: int, device: torch.device) -> None:
        self.num_samples, self.size, self.device = num_samples, size, device
        self.subset_indices: torch.Tensor | None = None
        # (N,) sample -> slot, or None where slot = sample index.
        self.slot_of: torch.Tensor | None = None
        self.fifo_ptr = 0
        self.fifo_count = 0

    # ---------------------------------------------------------------- writes
    def place(
        self, idx: torch.Tensor, rows: Rows, sample_idx: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Rows] | None:
        """The slots that samples ``idx`` (B,) write, with ``idx`` and the per-sample ``rows`` kept
        (a policy may drop samples); None when nothing is written. May empty slots of ``sample_idx``
        and ``labels`` that a write supersedes."""
        raise NotImplementedError

    def reset(self) -> None:
        """A fill pass begins: the bank is emptied."""
        self.fifo_ptr = 0
        self.fifo_count = 0

    # ---------------------------------------------------------------- retrieval
    def exclude_slots(self, ex: torch.Tensor, sample_idx: torch.Tensor) -> torch.Tensor:
        """(B,) the slot holding each sample of ``ex`` (B,), -1 where it holds none."""
        # Each sample holds at most one slot: a scatter is cheaper than a (B, M) compare.
        assert self.slot_of is not None
        s = self.slot_of[ex.clamp(0, self.num_samples - 1)]
        holds = (s >= 0) & (sample_idx[s.clamp(min=0)] == ex)
        return torch.where(holds, s, torch.full_like(s, -1))

    @property
    def ring_full(self) -> bool:
        """Every slot has been written at least once since the last reset (FIFO only; else False)."""
        return False

    def capture_blocker(self) -> str | None:
        """Why a CUDA graph cannot hold this layout's writes (None: it can)."""
        return f"a {self.name} bank (memory.size < N) tracks its slots on the host"

    # ---------------------------------------------------------------- persistence
    @property
    def tensors(self) -> list[torch.Tensor | None]:
        return [self.subset_indices, self.slot_of]

    def state_dict(self) -> dict[str, Any]:
        """The policy's keys of the bank's state_dict, in their order there."""
        return {
            "subset_indices": self.subset_indices,
            "slot_of": None,
            "fifo_ptr": self.fifo_ptr,
            "fifo_count": self.fifo_count,
        }

    def load_state_dict(self, sd: dict[str, Any], sample_idx: torch.Tensor, labels: torch.Tensor) -> None:
        """Restore from the bank's state_dict ``sd`` (its slots already restored into ``sample_idx``)."""
        self.fifo_ptr = int(sd["fifo_ptr"])
        self.fifo_count = int(sd["fifo_count"])


class DirectSlots(SlotPolicy):
    """M = N: slot = sample index."""

    name = "direct"
    index_addressed = True

    def place(
        self, idx: torch.Tensor, rows: Rows, sample_idx: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Rows] | None:
        return idx, idx, rows

    def exclude_slots(self, ex: torch.Tensor, sample_idx: torch.Tensor) -> torch.Tensor:
        return ex

    def capture_blocker(self) -> str | None:
        return None


class RandomSubsetSlots(SlotPolicy):
    """M < N: a fixed random subset of M samples (drawn from ``seed``) owns the slots."""

    name = "random"

    def __init__(self, num_samples: int, size: int, device: torch.device, seed: int) -> None:
        super().__init__(num_samples, size, device)
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(num_samples, generator=gen)[:size].sort().values
        self.subset_indices = chosen.to(device)
        slot_of = torch.full((num_samples,), -1, dtype=torch.long)
        slot_of[chosen] = torch.arange(size)
        self.slot_of = slot_of.to(device)

    def place(
        self, idx: torch.Tensor, rows: Rows, sample_idx: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Rows] | None:
        assert self.slot_of is not None
        slots = self.slot_of[idx]
        inside = slots >= 0  # samples outside the fixed subset are ignored
        slots, idx = slots[inside], idx[inside]
        rows = tuple(r[inside] for r in rows)
        if slots.numel() == 0:
            return None
        return slots, idx, rows

    def load_state_dict(self, sd: dict[str, Any], sample_idx: torch.Tensor, labels: torch.Tensor) -> None:
        # The checkpoint's subset wins over this bank's seed: resume must address the same slots.
        chosen = sd["subset_indices"].to(self.device, torch.long)
        self.subset_indices = chosen
        slot_of = torch.full((self.num_samples,), -1, dtype=torch.long, device=self.device)
        slot_of[chosen] = torch.arange(self.size, device=self.device)
        self.slot_of = slot_of
        super().load_state_dict(sd, sample_idx, labels)


class FifoSlots(SlotPolicy):
    """M < N: a ring of the M most recent writes, one slot per sample at most.

    ``slot_of[i]`` is the slot of sample i's latest write, which still holds it only while
    ``sample_idx[slot]`` equals i (the ring may have moved on)."""

    name = "fifo"
    keeps_history = False  # a queue has no "old" entry of the sample to mix with
    fills_for_good = False

    def __init__(self, num_samples: int, size: int, device: torch.device) -> None:
        super().__init__(num_samples, size, device)
        self.slot_of = torch.full((num_samples,), -1, dtype=torch.long, device=device)

    def place(
        self, idx: torch.Tensor, rows: Rows, sample_idx: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Rows] | None:
        m = self.size
        if idx.shape[0] > m:  # only the most recent M of an oversized batch survive anyway
            idx = idx[-m:]
            rows = tuple(r[-m:] for r in rows)
        b = idx.shape[0]
        slots = (self.fifo_ptr + torch.arange(b, device=idx.device)) % m
        self.fifo_ptr = (self.fifo_ptr + b) % m
        self.fifo_count = min(m, self.fifo_count + b)
        # One slot per sample: empty the previous slot of each written sample if it still holds
        # that sample. min(current, -1) empties; min(current, LONG_MAX) keeps (no sync, and
        # duplicate targets of clamped -1 lookups cannot race).
        assert self.slot_of is not None
        prev = self.slot_of[idx]
        safe = prev.clamp(min=0)
        stale = (prev >= 0) & (sample_idx[safe] == idx)
        drop = torch.where(stale, torch.full_like(idx, -1), torch.full_like(idx, torch.iinfo(torch.long).max))
        sample_idx.scatter_reduce_(0, safe, drop, reduce="amin")
        labels.scatter_reduce_(0, safe, drop, reduce="amin")
        self.slot_of.index_copy_(0, idx, slots)
        return slots, idx, rows

    def reset(self) -> None:
        assert self.slot_of is not None
        self.slot_of.fill_(-1)
        super().reset()

    @property
    def ring_full(self) -> bool:
        return self.fifo_count == self.size

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "slot_of": self.slot_of}

    def load_state_dict(self, sd: dict[str, Any], sample_idx: torch.Tensor, labels: torch.Tensor) -> None:
        super().load_state_dict(sd, sample_idx, labels)
        assert self.slot_of is not None
        if sd.get("slot_of") is not None:
            self.slot_of.copy_(sd["slot_of"].to(self.device, torch.long))
        else:
            self._dedupe(sample_idx, labels)

    def _dedupe(self, sample_idx: torch.Tensor, labels: torch.Tensor) -> None:
        """Rebuild ``slot_of`` of a FIFO bank saved without one (version 1), keeping only each
        sample's most recent slot (older copies are emptied, as a write would have done)."""
        assert self.slot_of is not None
        m = self.size
        samples = sample_idx.cpu().numpy()
        newest_first = (self.fifo_ptr - 1 - np.arange(m)) % m
        order_samples = samples[newest_first]
        present = order_samples >= 0
        keep_slots = np.zeros(m, dtype=bool)
        _, first = np.unique(order_samples[present], return_index=True)
        keep_slots[newest_first[np.flatnonzero(present)[first]]] = True
        drop = torch.from_numpy(np.flatnonzero((samples >= 0) & ~keep_slots)).to(self.device)
        with torch.no_grad():
            sample_idx[drop] = -1
            labels[drop] = -1
            self.slot_of.fill_(-1)
            kept = torch.from_numpy(np.flatnonzero(keep_slots)).to(self.device)
            self.slot_of[sample_idx[kept]] = kept


def make_slots(num_samples: int, size: int, subset: str, seed: int, device: torch.device) -> SlotPolicy:
    """The policy of a bank of ``size`` slots over ``num_samples`` samples (``subset`` when M < N)."""
    if size == num_samples:
        return DirectSlots(num_samples, size, device)
    if subset == "random":
        return RandomSubsetSlots(num_samples, size, device, seed)
    return FifoSlots(num_samples, size, device)
