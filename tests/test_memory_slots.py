"""Each slot policy of the memory bank (ickd/memory/slots.py) on its own, against its contract."""
from __future__ import annotations

import torch

from ickd.memory.bank import MemoryBank
from ickd.memory.slots import DirectSlots, FifoSlots, RandomSubsetSlots, make_slots

CPU = torch.device("cpu")


def _storage(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((m,), -1, dtype=torch.long), torch.full((m,), -1, dtype=torch.long)


def _commit(placed, sample_idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What the bank does with a placement: store the samples (and their labels) in the slots."""
    slots, idx, (y,) = placed
    sample_idx.index_copy_(0, slots, idx)
    labels.index_copy_(0, slots, y)
    return slots


def test_make_slots_picks_the_layout() -> None:
    assert isinstance(make_slots(10, 10, "fifo", 0, CPU), DirectSlots)
    assert isinstance(make_slots(10, 4, "random", 0, CPU), RandomSubsetSlots)
    assert isinstance(make_slots(10, 4, "fifo", 0, CPU), FifoSlots)
    for size, subset, mode in ((10, "random", "direct"), (4, "random", "random"), (4, "fifo", "fifo")):
        assert MemoryBank(10, 4, 3, size=size, subset=subset).mode == mode


def test_direct_slot_is_the_sample_index() -> None:
    p = DirectSlots(10, 10, CPU)
    sample_idx, labels = _storage(10)
    idx = torch.tensor([7, 2, 5])
    slots = _commit(p.place(idx, (idx % 3,), sample_idx, labels), sample_idx, labels)
    assert torch.equal(slots, idx)
    assert torch.equal(p.exclude_slots(torch.tensor([2, 9]), sample_idx), torch.tensor([2, 9]))
    assert p.index_addressed and p.keeps_history and p.fills_for_good and not p.ring_full
    assert p.capture_blocker() is None and p.slot_of is None and p.subset_indices is None
    assert p.state_dict() == {"subset_indices": None, "slot_of": None, "fifo_ptr": 0, "fifo_count": 0}


def test_random_subset_owns_fixed_slots_and_ignores_other_samples() -> None:
    p = RandomSubsetSlots(20, 5, CPU, seed=3)
    chosen = p.subset_indices
    assert chosen is not None and chosen.numel() == 5 and torch.equal(chosen, chosen.sort().values)
    assert torch.equal(RandomSubsetSlots(20, 5, CPU, seed=3).subset_indices, chosen)
    outside = next(i for i in range(20) if i not in chosen.tolist())
    sample_idx, labels = _storage(5)
    assert p.place(torch.tensor([outside]), (torch.tensor([1]),), sample_idx, labels) is None
    idx = torch.tensor([int(chosen[3]), outside, int(chosen[0])])
    slots = _commit(p.place(idx, (torch.tensor([1, 2, 3]),), sample_idx, labels), sample_idx, labels)
    assert slots.tolist() == [3, 0] and sample_idx[[3, 0]].tolist() == [int(chosen[3]), int(chosen[0])]
    # The same sample always lands in the same slot.
    again = p.place(torch.tensor([int(chosen[3])]), (torch.tensor([1]),), sample_idx, labels)
    assert again is not None and again[0].tolist() == [3]
    ex = p.exclude_slots(torch.tensor([int(chosen[0]), outside, int(chosen[1])]), sample_idx)
    assert ex.tolist() == [0, -1, -1]  # chosen[1] owns slot 1 but has not written it yet
    assert p.keeps_history and p.fills_for_good and not p.index_addressed and not p.ring_full
    assert "random bank" in (p.capture_blocker() or "")
    sd = p.state_dict()
    assert sd["slot_of"] is None and torch.equal(sd["subset_indices"], chosen)
    other = RandomSubsetSlots(20, 5, CPU, seed=4)
    other.load_state_dict(sd, sample_idx, labels)  # the checkpoint's subset wins over the seed
    assert torch.equal(other.subset_indices, chosen) and torch.equal(other.slot_of, p.slot_of)


def test_fifo_ring_keeps_one_slot_per_sample() -> None:
    p = FifoSlots(10, 3, CPU)
    sample_idx, labels = _storage(3)
    slots = _commit(p.place(torch.tensor([4, 5]), (torch.tensor([0, 1]),), sample_idx, labels), sample_idx, labels)
    assert slots.tolist() == [0, 1] and (p.fifo_ptr, p.fifo_count) == (2, 2) and not p.ring_full
    # Re-writing sample 4 empties its old slot 0 and enqueues it at slot 2.
    slots = _commit(p.place(torch.tensor([4]), (torch.tensor([0]),), sample_idx, labels), sample_idx, labels)
    assert slots.tolist() == [2] and sample_idx.tolist() == [-1, 5, 4] and labels.tolist() == [-1, 1, 0]
    assert (p.fifo_ptr, p.fifo_count) == (0, 3) and p.ring_full
    assert p.exclude_slots(torch.tensor([4, 5, 6]), sample_idx).tolist() == [2, 1, -1]
    # The ring moves on: slot 1 (sample 5) is overwritten by sample 6; 5 then holds nothing.
    _commit(p.place(torch.tensor([7, 6]), (torch.tensor([1, 2]),), sample_idx, labels), sample_idx, labels)
    assert sample_idx.tolist() == [7, 6, 4]
    assert p.exclude_slots(torch.tensor([5, 6]), sample_idx).tolist() == [-1, 1]
    # An oversized batch keeps its last M rows.
    placed = p.place(torch.tensor([0, 1, 2, 3, 8]), (torch.arange(5),), sample_idx, labels)
    assert placed is not None and placed[1].tolist() == [2, 3, 8] and placed[2][0].tolist() == [2, 3, 4]
    assert not p.keeps_history and not p.fills_for_good and not p.index_addressed
    assert "fifo bank" in (p.capture_blocker() or "")
    sd = p.state_dict()
    assert sd["slot_of"] is p.slot_of and sd["fifo_ptr"] == p.fifo_ptr
    p.reset()
    assert (p.fifo_ptr, p.fifo_count) == (0, 0) and bool((p.slot_of == -1).all())


def test_fifo_rebuilds_its_slot_map_from_a_version1_state() -> None:
    p = FifoSlots(10, 4, CPU)
    sample_idx = torch.tensor([3, 4, 3, -1])  # slot 2 is the newer copy of sample 3 (ptr = 3)
    labels = torch.tensor([0, 1, 0, -1])
    p.load_state_dict({"fifo_ptr": 3, "fifo_count": 3, "slot_of": None}, sample_idx, labels)
    assert sample_idx.tolist() == [-1, 4, 3, -1] and labels.tolist() == [-1, 1, 0, -1]
    assert p.slot_of[3] == 2 and p.slot_of[4] == 1 and int((p.slot_of >= 0).sum()) == 2
