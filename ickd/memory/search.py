"""The memory bank's search: k-NN through the :class:`~ickd.memory.retrieval.Retriever` backends, the
random-neighbour ablation, and the lean full-bank path (``ickd.fastpath`` switch ``lean_bank``).

:class:`BankSearch` owns what only the search needs (the random-retrieval generator, the reused
all-valid masks) and reads the bank's storage (``feats``, ``logits``, ``labels``, ``sample_idx``,
``retriever``, ``slots``) from the :class:`~ickd.memory.bank.MemoryBank` it is given; queries arrive
normalised and transformed, validated by the bank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ickd.memory.retrieval import SearchFilter, pad_topk

if TYPE_CHECKING:
    from ickd.memory.bank import MemoryBank

__all__ = ["BankSearch", "Neighbours"]

_NEG_INF = float("-inf")


@dataclass
class Neighbours:
    """Retrieved in-context samples for a batch of B queries, K neighbours each, sorted by similarity.

    For ``split="separate"`` the first k_pos columns are the same-class search and the last k_neg
    the other-class search. Invalid columns (fewer than K eligible entries) have ``valid`` False,
    ``sims`` 0, ``logits`` 0, ``labels`` and ``sample_indices`` -1, and are neither positive nor
    negative.
    """

    sims: torch.Tensor  # (B, K) float32 cosine similarity in the bank's (transformed) feature space
    logits: torch.Tensor  # (B, K, C) float32 teacher logits of the neighbours
    labels: torch.Tensor  # (B, K) int64
    sample_indices: torch.Tensor  # (B, K) int64
    positive: torch.Tensor  # (B, K) bool: valid and same label as the query
    valid: torch.Tensor  # (B, K) bool
    all_valid: bool = False  # known on the host: every column is valid (no need to count them)

    @property
    def negative(self) -> torch.Tensor:
        """(B, K) bool: valid and a different label from the query."""
        return self.valid & ~self.positive

    @property
    def not_negative(self) -> torch.Tensor:
        """(B, K) bool: ``~negative`` (same label, or not valid), in two ops instead of three."""
        return self.positive | ~self.valid


def generator_seed(seed: int) -> int:
    """The random-retrieval generator's seed: a stream of ``seed`` apart from the subset draw's."""
    state = np.random.SeedSequence([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, 0x2A4D]).generate_state(2, dtype=np.uint64)
    return int(state[0]) & 0x7FFF_FFFF_FFFF_FFFF


class BankSearch:
    """Neighbour search over a bank of ``size`` slots on ``device``."""

    def __init__(self, size: int, device: torch.device, seed: int) -> None:
        self.size, self.device = size, device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(generator_seed(seed))
        self._all_true: dict[tuple[int, int], torch.Tensor] = {}  # (B, k) -> all-valid mask, reused

    def full(
        self, bank: MemoryBank, q: torch.Tensor, k: int, ql: torch.Tensor, ex: torch.Tensor | None
    ) -> Neighbours:
        """k-NN in a full index-addressed bank (``MemoryBank._lean_full``): no slot is empty, each
        sample holds exactly slot ``i``, and k < M, so after excluding the query's own slot every
        top-k entry is valid and no result needs masking: the search, the self-exclusion as one
        scatter, top-k, and two gathers. Same neighbours, similarities and order as :meth:`search`."""
        feats = bank.feats
        with torch.autocast(q.device.type, enabled=False):
            if feats.dtype in (torch.float16, torch.bfloat16) and feats.device.type == "cuda":
                # Top-k straight on the half-precision similarities, no (B, M) fp32 copy: the values
                # are exactly those of the copy the general path sorts (fp16 -> fp32 is exact); ties
                # among equal values come out in torch.topk's order, the same in every run.
                sims = q.to(feats.dtype) @ feats.T
            else:
                sims = q @ feats.T.float()
            if ex is not None:
                sims.scatter_(1, ex.unsqueeze(1), float("-inf"))
            top, slots = sims.topk(k, dim=1, largest=True, sorted=True)
        labels = bank.labels[slots]
        key = tuple(slots.shape)
        valid = self._all_true.get(key)
        if valid is None or valid.device != slots.device:
            valid = self._all_true[key] = torch.ones(key, dtype=torch.bool, device=slots.device)
        return Neighbours(sims=top.float(), logits=bank.logits[slots], labels=labels, sample_indices=slots,
                          positive=labels == ql.unsqueeze(1), valid=valid, all_valid=True)

    def search(
        self,
        bank: MemoryBank,
        q: torch.Tensor,
        k: int,
        ql: torch.Tensor,
        ex: torch.Tensor | None,
        split: str,
        k_pos: int | None,
        k_neg: int | None,
        retrieval: str,
    ) -> Neighbours:
        """The general path: any layout, backend, split and retrieval (``MemoryBank.retrieve``)."""
        dev = self.device
        ex_slots = None if ex is None else bank.slots.exclude_slots(ex, bank.sample_idx)
        valid = bank._valid_mask()

        def make_filter(same: bool | None) -> SearchFilter:
            return SearchFilter(
                slot_samples=bank.sample_idx,
                slot_labels=bank.labels,
                exclude_samples=ex,
                exclude_slots=ex_slots,
                query_labels=ql,
                same_label=same,
            )

        def search(count: int, same: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
            # The bank's storage dtype decides the matmul precision, not the caller's autocast: a
            # bf16 autocast would round the similarities to 8 bits and reorder near neighbours.
            with torch.autocast(dev.type, enabled=False):
                return bank.retriever.search(q, bank.feats, valid, count, make_filter(same))

        if split == "topk":
            sims, slots = search(k, None)
            if retrieval == "random":
                ok = slots >= 0
                same = ok & (bank.labels[slots.clamp(min=0)] == ql.unsqueeze(1))
                n_pos, n_neg = same.sum(dim=1), (ok & ~same).sum(dim=1)
                sp, lp = self._random_pick(bank, q, k, n_pos, make_filter(True))
                sn, ln = self._random_pick(bank, q, k, n_neg, make_filter(False))
                sims, slots = self._sorted(torch.cat([sp, sn], dim=1), torch.cat([lp, ln], dim=1), k)
        else:
            assert k_pos is not None and k_neg is not None
            if retrieval == "random":
                sp, lp = self._random_pick(bank, q, k_pos, torch.full_like(ql, k_pos), make_filter(True))
                sn, ln = self._random_pick(bank, q, k_neg, torch.full_like(ql, k_neg), make_filter(False))
            else:
                sp, lp = search(k_pos, True)
                sn, ln = search(k_neg, False)
            sims, slots = torch.cat([sp, sn], dim=1), torch.cat([lp, ln], dim=1)

        ok = slots >= 0
        safe = slots.clamp(min=0)
        labels = torch.where(ok, bank.labels[safe], torch.full_like(safe, -1))
        return Neighbours(
            sims=torch.where(ok, sims, torch.zeros_like(sims)),
            logits=bank.logits[safe] * ok.unsqueeze(-1),
            labels=labels,
            sample_indices=torch.where(ok, bank.sample_idx[safe], torch.full_like(safe, -1)),
            positive=ok & (labels == ql.unsqueeze(1)),
            valid=ok,
        )

    def _random_pick(
        self, bank: MemoryBank, q: torch.Tensor, width: int, count: torch.Tensor, flt: SearchFilter
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``count[b]`` (<= width) distinct eligible slots per row drawn uniformly at random, sorted by
        their true similarity to the query: (sims (B, width) with -inf, slots (B, width) with -1).

        Random scores masked to the eligible slots, then top-k: uniform without replacement, on the
        device, no host sync."""
        scores = torch.rand(q.shape[0], self.size, generator=self.gen, device=self.device)
        scores.masked_fill_((bank.sample_idx < 0).unsqueeze(0), _NEG_INF)
        flt.mask_dense_(scores)
        top, slots = scores.topk(min(width, self.size), dim=1)
        take = torch.isfinite(top) & (torch.arange(top.shape[1], device=self.device).unsqueeze(0) < count.unsqueeze(1))
        safe = slots.clamp(min=0)
        with torch.autocast(self.device.type, enabled=False):
            sims = (bank.feats[safe].float() * q.unsqueeze(1)).sum(dim=-1)
        sims = torch.where(take, sims, torch.full_like(sims, _NEG_INF))
        sims, slots = pad_topk(sims, slots, width)
        return self._sorted(sims, slots, width)

    @staticmethod
    def _sorted(sims: torch.Tensor, slots: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``width`` best columns of each row by similarity, descending (missing: -inf / -1 last)."""
        sims, order = sims.sort(dim=1, descending=True, stable=True)
        slots = slots.gather(1, order)
        sims, slots = sims[:, :width], slots[:, :width]
        return sims, torch.where(torch.isfinite(sims), slots, torch.full_like(slots, -1))
