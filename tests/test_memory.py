"""Memory bank: write rules, subsets, retrieval correctness against brute force, errors, resume."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ickd.errors import CheckpointError, ConfigError, UnknownNameError
from ickd.memory import RETRIEVERS, MemoryBank, MissingDependencyError, Neighbours, create_retriever

BACKENDS = [
    ("torch", {}),
    ("faiss_flat", {}),
    ("faiss_ivf", {"nlist": 4, "nprobe": 4}),  # nprobe = nlist: exhaustive, hence exact
]


def data(n: int, d: int, c: int, seed: int = 0, clustered: bool = False):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    feats = torch.randn(n, d, generator=g)
    if clustered:  # class-structured features: nearest neighbours are mostly same-class
        centres = torch.randn(c, d, generator=g) * 4
        feats = feats + centres[labels]
    logits = torch.randn(n, c, generator=g)
    return torch.arange(n), feats, logits, labels


def filled(n=200, d=16, c=5, data_seed=0, clustered=False, **kw) -> tuple[MemoryBank, tuple]:
    bank = MemoryBank(n, d, c, **kw)
    batch = data(n, d, c, data_seed, clustered)
    bank.fill(*batch)
    return bank, batch


def brute_force(bank: MemoryBank, q, ql, k, exclude=None, same=None):
    """numpy float64 reference: (sims, slots) of the k best eligible slots per row."""
    feats = bank.feats.float().numpy().astype(np.float64)
    samples, labels = bank.sample_idx.numpy(), bank.labels.numpy()
    qn = F.normalize(q.float(), dim=1).numpy().astype(np.float64)
    s = qn @ feats.T
    s[:, samples < 0] = -np.inf
    if exclude is not None:
        s[samples[None, :] == exclude.numpy()[:, None]] = -np.inf
    if same is not None:
        eq = labels[None, :] == ql.numpy()[:, None]
        s[~eq if same else eq] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def assert_matches(nb: Neighbours, bank: MemoryBank, ref_sims, ref_slots, cols=slice(None)):
    got_samples = nb.sample_indices[:, cols].numpy()
    ref_samples = np.where(np.isfinite(ref_sims), bank.sample_idx.numpy()[ref_slots], -1)
    for row in range(got_samples.shape[0]):
        assert set(got_samples[row]) == set(ref_samples[row]), f"row {row}"
    expected = np.where(np.isfinite(ref_sims), ref_sims, 0.0)
    np.testing.assert_allclose(nb.sims[:, cols].numpy(), expected, atol=2e-5)


# ------------------------------------------------------------------------------------ writes
def test_fill_writes_even_when_frozen_and_update_keeps_it():
    bank, (idx, feats, logits, labels) = filled(update="frozen")
    before = bank.feats.clone()
    np.testing.assert_allclose(bank.feats.norm(dim=1).numpy(), 1.0, atol=1e-6)
    torch.testing.assert_close(bank.feats, F.normalize(feats, dim=1))
    bank.update(idx[:10], torch.randn(10, 16), torch.randn(10, 5), labels[:10])
    assert torch.equal(bank.feats, before)


def test_overwrite_replaces_entries():
    bank, (idx, feats, logits, labels) = filled(update="overwrite")
    new_f, new_z = torch.randn(10, 16), torch.randn(10, 5)
    bank.update(idx[:10], new_f, new_z, labels[:10])
    torch.testing.assert_close(bank.feats[:10], F.normalize(new_f, dim=1))
    torch.testing.assert_close(bank.logits[:10], new_z)
    torch.testing.assert_close(bank.feats[10:], F.normalize(feats[10:], dim=1))


def test_momentum_mixes_renormalises_and_first_write_is_plain():
    m = 0.7
    bank, (idx, feats, logits, labels) = filled(update="momentum", momentum=m)
    new_f, new_z = torch.randn(10, 16), torch.randn(10, 5)
    bank.update(idx[:10], new_f, new_z, labels[:10])
    expected = F.normalize(m * F.normalize(feats[:10], dim=1) + (1 - m) * F.normalize(new_f, dim=1), dim=1)
    torch.testing.assert_close(bank.feats[:10], expected)
    torch.testing.assert_close(bank.logits[:10], m * logits[:10] + (1 - m) * new_z)
    np.testing.assert_allclose(bank.feats.norm(dim=1).numpy(), 1.0, atol=1e-6)
    # An empty slot has no old entry: the first update writes the value as is (no mixing with 0).
    empty = MemoryBank(20, 4, 3, update="momentum", momentum=m)
    f = torch.randn(2, 4)
    empty.update(torch.tensor([3, 4]), f, torch.ones(2, 3), torch.tensor([0, 1]))
    torch.testing.assert_close(empty.feats[3:5], F.normalize(f, dim=1))
    torch.testing.assert_close(empty.logits[3:5], torch.ones(2, 3))


def test_fifo_keeps_the_most_recent_m():
    bank = MemoryBank(100, 8, 3, size=5, subset="fifo")
    idx, feats, logits, labels = data(100, 8, 3)
    for start in range(0, 12, 4):
        sl = slice(start, start + 4)
        bank.update(idx[sl], feats[sl], logits[sl], labels[sl])
    assert bank.num_valid == 5
    assert sorted(bank.sample_idx.tolist()) == [7, 8, 9, 10, 11]
    slot = bank.sample_idx.tolist().index(10)
    torch.testing.assert_close(bank.feats[slot], F.normalize(feats[10], dim=0))
    # An oversized batch keeps its last M rows.
    bank.fill(idx[20:40], feats[20:40], logits[20:40], labels[20:40])
    assert sorted(bank.sample_idx.tolist()) == [35, 36, 37, 38, 39]


def test_fifo_frozen_keeps_fill_and_momentum_enqueues():
    idx, feats, logits, labels = data(100, 8, 3)
    frozen = MemoryBank(100, 8, 3, size=5, subset="fifo", update="frozen")
    frozen.fill(idx[:5], feats[:5], logits[:5], labels[:5])
    frozen.update(idx[5:10], feats[5:10], logits[5:10], labels[5:10])
    assert sorted(frozen.sample_idx.tolist()) == [0, 1, 2, 3, 4]
    mom = MemoryBank(100, 8, 3, size=5, subset="fifo", update="momentum")
    mom.fill(idx[:5], feats[:5], logits[:5], labels[:5])
    mom.update(idx[5:8], feats[5:8], logits[5:8], labels[5:8])
    assert sorted(mom.sample_idx.tolist()) == [3, 4, 5, 6, 7]


def test_random_subset_ignores_outsiders_and_follows_seed():
    n, m = 100, 10
    bank = MemoryBank(n, 8, 3, size=m, subset="random", seed=3)
    subset = set(bank.subset_indices.tolist())
    assert len(subset) == m
    assert subset == set(MemoryBank(n, 8, 3, size=m, subset="random", seed=3).subset_indices.tolist())
    assert subset != set(MemoryBank(n, 8, 3, size=m, subset="random", seed=4).subset_indices.tolist())
    outsiders = torch.tensor([i for i in range(n) if i not in subset][:20])
    bank.fill(outsiders, torch.randn(20, 8), torch.randn(20, 3), torch.zeros(20, dtype=torch.long))
    assert bank.num_valid == 0
    idx, feats, logits, labels = data(n, 8, 3)
    bank.fill(idx, feats, logits, labels)
    assert bank.num_valid == m and set(bank.sample_idx.tolist()) == subset
    for slot, sample in enumerate(bank.sample_idx.tolist()):
        torch.testing.assert_close(bank.feats[slot], F.normalize(feats[sample], dim=0))


# ------------------------------------------------------------------------------------ retrieval
@pytest.mark.parametrize("backend,kw", BACKENDS)
def test_self_exclusion(backend, kw):
    bank, (idx, feats, logits, labels) = filled(retriever=backend, retriever_kwargs=kw)
    q = feats[:32] * 3.0  # identical direction to its own entry: similarity 1
    own = bank.retrieve(q, 5, labels[:32])
    assert torch.equal(own.sample_indices[:, 0], idx[:32])
    assert torch.allclose(own.sims[:, 0], torch.ones(32), atol=1e-5)
    nb = bank.retrieve(q, 5, labels[:32], exclude_indices=idx[:32])
    assert not (nb.sample_indices == idx[:32, None]).any()
    assert nb.valid.all()


@pytest.mark.parametrize("backend,kw", BACKENDS)
def test_fifo_self_exclusion_after_a_rewrite(backend, kw):
    bank = MemoryBank(50, 8, 3, size=20, subset="fifo", retriever=backend,
                      retriever_kwargs={"nlist": 2, "nprobe": 2} if kw else {})
    idx, feats, logits, labels = data(50, 8, 3)
    bank.fill(idx[:15], feats[:15], logits[:15], labels[:15])
    bank.update(idx[:3], feats[:3], logits[:3], labels[:3])  # samples 0..2 move to new slots (old ones emptied)
    nb = bank.retrieve(feats[:3], 10, labels[:3], exclude_indices=idx[:3])
    assert not (nb.sample_indices == idx[:3, None]).any()
    assert bank.num_valid == 15 and nb.valid.all()


@pytest.mark.parametrize("backend,kw", BACKENDS)
@pytest.mark.parametrize("mode", [{}, {"size": 150, "subset": "random"}, {"size": 150, "subset": "fifo"}])
def test_topk_matches_brute_force(backend, kw, mode):
    bank, (idx, feats, logits, labels) = filled(retriever=backend, retriever_kwargs=kw, **mode)
    q, ql, ex = torch.randn(40, 16), labels[:40], idx[:40]
    nb = bank.retrieve(q, 12, ql, exclude_indices=ex)
    ref_s, ref_i = brute_force(bank, q, ql, 12, exclude=ex)
    assert_matches(nb, bank, ref_s, ref_i)
    assert torch.equal(nb.labels, bank.labels[torch.from_numpy(ref_i)])
    torch.testing.assert_close(nb.logits, bank.logits[torch.from_numpy(ref_i)])
    assert torch.equal(nb.positive, nb.labels == ql[:, None])
    assert torch.equal(nb.negative, nb.labels != ql[:, None])
    assert (nb.sims[:, :-1] >= nb.sims[:, 1:]).all(), "neighbours are sorted by similarity"


@pytest.mark.parametrize("backend,kw", BACKENDS)
def test_separate_split_matches_brute_force_and_fills_both_sides(backend, kw):
    # 40 classes x ~10 samples with clustered features: a plain top-k is almost all positives, so
    # the negatives must be searched for; positives are rare, so faiss must over-fetch deeply.
    bank, (idx, feats, logits, labels) = filled(n=400, c=40, clustered=True, retriever=backend, retriever_kwargs=kw)
    q, ql, ex = feats[:30], labels[:30], idx[:30]
    topk = bank.retrieve(q, 8, ql, exclude_indices=ex)
    assert topk.positive.float().mean() > 0.8
    k_pos, k_neg = 4, 5
    nb = bank.retrieve(q, 8, ql, exclude_indices=ex, split="separate", k_pos=k_pos, k_neg=k_neg)
    assert nb.sims.shape == (30, k_pos + k_neg)
    counts = torch.bincount(labels, minlength=40)[ql] - 1  # same-class entries other than itself
    assert (counts >= k_pos).all(), "test data should have enough positives per class"
    assert nb.positive[:, :k_pos].all() and nb.negative[:, k_pos:].all()
    ref_s, ref_i = brute_force(bank, q, ql, k_pos, exclude=ex, same=True)
    assert_matches(nb, bank, ref_s, ref_i, cols=slice(0, k_pos))
    ref_s, ref_i = brute_force(bank, q, ql, k_neg, exclude=ex, same=False)
    assert_matches(nb, bank, ref_s, ref_i, cols=slice(k_pos, None))


@pytest.mark.parametrize("backend,kw", BACKENDS)
def test_valid_mask_when_bank_nearly_empty(backend, kw):
    bank = MemoryBank(60, 8, 4, retriever=backend, retriever_kwargs=kw)
    idx, feats, logits, labels = data(60, 8, 4)
    bank.fill(idx[:3], feats[:3], logits[:3], labels[:3])
    nb = bank.retrieve(feats[:5], 6, labels[:5], exclude_indices=idx[:5])
    # rows 0-2 see the two other entries, rows 3-4 see all three
    assert nb.valid.sum(dim=1).tolist() == [2, 2, 2, 3, 3]
    assert (~nb.valid[:, 3:]).all()
    invalid = ~nb.valid
    assert not nb.positive[invalid].any() and not nb.negative[invalid].any()
    assert (nb.labels[invalid] == -1).all() and (nb.sample_indices[invalid] == -1).all()
    assert (nb.sims[invalid] == 0).all() and (nb.logits[invalid] == 0).all()
    sep = bank.retrieve(feats[:5], 6, labels[:5], exclude_indices=idx[:5], split="separate", k_pos=2, k_neg=2)
    assert not (sep.positive & ~sep.valid).any()


def test_ivf_follows_updates_and_retrains():
    kw = {"nlist": 4, "nprobe": 4, "retrain_every": 150}
    bank, (idx, feats, logits, labels) = filled(update="overwrite", retriever="faiss_ivf", retriever_kwargs=kw)
    exact, _ = filled(update="overwrite")
    q = torch.randn(20, 16)
    bank.retrieve(q, 5, labels[:20])  # builds the index
    g = torch.Generator().manual_seed(9)
    for step in range(4):  # 4 x 50 writes: incremental re-adds, then a retrain at 150
        sl = slice(step * 50, step * 50 + 50)
        new = torch.randn(50, 16, generator=g)
        for b in (bank, exact):
            b.update(idx[sl], new, logits[sl], labels[sl])
        got = bank.retrieve(q, 7, labels[:20], exclude_indices=idx[:20])
        want = exact.retrieve(q, 7, labels[:20], exclude_indices=idx[:20])
        assert torch.equal(got.sample_indices, want.sample_indices), f"step {step}"
        torch.testing.assert_close(got.sims, want.sims, atol=1e-5, rtol=0)
    assert bank.retriever._writes_since_train < 150, "a retrain should have happened"


def test_ivf_with_few_probes_is_approximate_but_valid():
    bank, (idx, feats, logits, labels) = filled(
        n=800, c=8, clustered=True, retriever="faiss_ivf", retriever_kwargs={"nlist": 16, "nprobe": 1}
    )
    nb = bank.retrieve(feats[:50], 10, labels[:50], exclude_indices=idx[:50], split="separate", k_pos=5, k_neg=5)
    # Negatives live in other lists: nprobe has to grow for them, and every slot gets filled.
    assert nb.valid.all() and nb.positive[:, :5].all() and nb.negative[:, 5:].all()


def test_float16_features_agree_with_float32():
    b32, (idx, feats, logits, labels) = filled(feature_dtype=torch.float32)
    b16, _ = filled(feature_dtype="float16")
    assert b16.feats.dtype == torch.float16 and b16.nbytes < b32.nbytes
    q = torch.randn(10, 16)
    n32, n16 = b32.retrieve(q, 5, labels[:10]), b16.retrieve(q, 5, labels[:10])
    torch.testing.assert_close(n16.sims, n32.sims, atol=2e-3, rtol=0)
    f16 = MemoryBank(200, 16, 5, feature_dtype="float16", retriever="faiss_flat")
    f16.fill(idx, feats, logits, labels)
    torch.testing.assert_close(f16.retrieve(q, 5, labels[:10]).sims, n16.sims, atol=1e-5, rtol=0)


def test_retrieval_ignores_the_callers_autocast():
    """The trainer retrieves inside its bf16 autocast; the search must still run in the bank's dtype."""
    bank, (_, _, _, labels) = filled(n=2000, d=64, c=5, clustered=True)
    q = torch.randn(64, 64)
    plain = bank.retrieve(q, 16, labels[:64])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = bank.retrieve(q, 16, labels[:64])
    assert torch.equal(inside.sims, plain.sims) and torch.equal(inside.sample_indices, plain.sample_indices)


# ------------------------------------------------------------------------------------ errors
def test_config_errors_name_problem_and_fix():
    bank = MemoryBank(100, 8, 3, size=20)
    cases = [
        (lambda: bank.check_k(0), "memory.k=0 must be positive"),
        (lambda: bank.check_k(20), "memory.k=20 must be smaller than the memory size M=20; lower memory.k or raise memory.size"),
        (lambda: bank.check_k(8, split="nearest"), "choose one of: topk, separate"),
        (lambda: bank.check_k(8, split="separate"), "needs memory.k_pos"),
        (lambda: bank.check_k(8, k_pos=0, k_neg=4, split="separate"), "memory.k_pos=0 must be positive"),
        (lambda: bank.check_k(8, k_pos=10, k_neg=10, split="separate"), "must be smaller than the memory size M=20"),
        (lambda: bank.retrieve(torch.randn(2, 8), 25, torch.zeros(2, dtype=torch.long)), "lower memory.k or raise memory.size"),
        (lambda: MemoryBank(100, 8, 3, size=101), "memory.size=101 is larger than the training set (N=100)"),
        (lambda: MemoryBank(100, 8, 3, size=0), "memory.size=0 must be positive"),
        (lambda: MemoryBank(100, 8, 3, subset="lru"), "choose one of: fifo, random"),
        (lambda: MemoryBank(100, 8, 3, update="ema"), "choose one of: frozen, overwrite, momentum"),
        (lambda: MemoryBank(100, 8, 3, momentum=1.0), "memory.momentum=1.0 must be in [0, 1)"),
        (lambda: MemoryBank(100, 8, 3, momentum=-0.1), "must be in [0, 1)"),
        (lambda: MemoryBank(100, 8, 3, feature_dtype="int8"), "choose one of: float32, float16"),
        (lambda: MemoryBank(100, 8, 3, retriever="annoy"), "set memory.backend to one of: faiss_flat, faiss_ivf, torch"),
        (lambda: MemoryBank(100, 8, 3, retriever="torch", retriever_kwargs={"nlist": 4}), "only applies to faiss_ivf"),
        (lambda: MemoryBank(100, 8, 3, retriever="faiss_ivf", retriever_kwargs={"nlist": 4, "nprobe": 5}), "memory.nprobe=5"),
        (lambda: MemoryBank(100, 8, 3, size=10, retriever="faiss_ivf", retriever_kwargs={"nlist": 11}), "memory.nlist=11"),
        (lambda: bank.fill(torch.arange(2), torch.randn(2, 9), torch.randn(2, 3), torch.zeros(2, dtype=torch.long)), "feature dimension"),
        (lambda: bank.fill(torch.tensor([0, 100]), torch.randn(2, 8), torch.randn(2, 3), torch.zeros(2, dtype=torch.long)), "must lie in [0, 100)"),
        (lambda: bank.retrieve(torch.randn(2, 7), 4, torch.zeros(2, dtype=torch.long)), "feature_dim=8"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as info:
            call()
        assert message in str(info.value), str(info.value)
    with pytest.raises(UnknownNameError):
        create_retriever("annoy")
    # null options (Hydra's memory.nlist: null with the torch backend) are accepted
    assert create_retriever("torch", nlist=None, nprobe=None).name == "torch"
    assert RETRIEVERS.names() == ["faiss_flat", "faiss_ivf", "torch"]


def test_missing_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'ickd\[faiss-cpu\]'"):
        MemoryBank(100, 8, 3, retriever="faiss_flat")


def test_use_gpu_without_gpu_faiss_falls_back_to_cpu():
    with pytest.warns(UserWarning, match="no GPUs"):
        bank, (idx, feats, logits, labels) = filled(retriever="faiss_flat", retriever_kwargs={"use_gpu": True})
    nb = bank.retrieve(feats[:4], 3, labels[:4], exclude_indices=idx[:4])
    assert nb.valid.all()


# ------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize(
    "kw",
    [
        {"update": "momentum"},
        {"size": 60, "subset": "fifo"},
        {"size": 60, "subset": "random", "seed": 5},
        {"retriever": "faiss_ivf", "retriever_kwargs": {"nlist": 4, "nprobe": 1}},
    ],
)
def test_state_dict_round_trip_reproduces_retrieval(kw):
    bank, (idx, feats, logits, labels) = filled(**kw)
    q = torch.randn(25, 16)
    bank.retrieve(q, 6, labels[:25])  # (IVF: train the index)
    bank.update(idx[:30], torch.randn(30, 16), torch.randn(30, 5), labels[:30])  # pending dirty slots
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    # A different seed must not matter: the random subset comes from the checkpoint.
    restored = MemoryBank(200, 16, 5, **{**kw, "seed": 99})
    restored.load_state_dict(torch.load(buf, weights_only=False))
    for b in (bank, restored):  # both continue identically
        b.update(idx[40:50], feats[:10], logits[:10], labels[40:50])
    a = bank.retrieve(q, 6, labels[:25], exclude_indices=idx[:25])
    r = restored.retrieve(q, 6, labels[:25], exclude_indices=idx[:25])
    for field in ("sims", "logits", "labels", "sample_indices", "positive", "valid"):
        assert torch.equal(getattr(a, field), getattr(r, field)), field
    assert restored.stats()["retrievals"] == bank.stats()["retrievals"]


def test_load_state_dict_rejects_other_geometry():
    bank, _ = filled()
    other = MemoryBank(200, 16, 5, size=100, subset="random")
    with pytest.raises(CheckpointError, match="same dataset, teacher, memory.size"):
        other.load_state_dict(bank.state_dict())


def test_stats_report_entries_bytes_and_time():
    bank = MemoryBank(200, 16, 5)
    s = bank.stats()
    assert s["entries"] == 0 and s["retrievals"] == 0 and s["retrieval_ms_mean"] == 0.0
    idx, feats, logits, labels = data(200, 16, 5)
    bank.fill(idx[:50], feats[:50], logits[:50], labels[:50])
    for _ in range(3):
        bank.retrieve(feats[:8], 4, labels[:8])
    s = bank.stats()
    assert s["entries"] == 50 == bank.num_valid
    assert s["bytes"] == bank.nbytes >= 200 * 16 * 4 + 200 * 5 * 4
    assert s["retrievals"] == 3 and s["retrieval_ms_mean"] > 0
    assert bank.size == 200
