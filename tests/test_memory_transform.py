"""Memory bank, issue "Trustworthy IC-KD results": the feature transform (centring, whitening), one
entry per sample in FIFO banks, the random-neighbour ablation and the fill order of the trainer."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ickd.errors import CheckpointError, ConfigError
from ickd.memory import MemoryBank, Neighbours


def relu_data(n: int = 600, d: int = 32, c: int = 8, seed: int = 0, shared: float = 3.0):
    """Non-negative "post-ReLU" features: a large shared positive component, a class signal, noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, d, generator=g)
    base = torch.rand(d, generator=g) * shared
    feats = F.relu(base + 0.7 * centres[labels] + torch.randn(n, d, generator=g))
    logits = torch.randn(n, c, generator=g)
    return torch.arange(n), feats, logits, labels


def pass_filled(data, n=None, d=None, c=None, batch: int = 128, **kw) -> MemoryBank:
    """A bank filled the way Distiller.fill_banks does it: begin_fill, fill in batches, finish_fill."""
    idx, feats, logits, labels = data
    bank = MemoryBank(n or idx.shape[0], d or feats.shape[1], c or logits.shape[1], **kw)
    bank.begin_fill()
    for s in range(0, idx.shape[0], batch):
        sl = slice(s, s + batch)
        bank.fill(idx[sl], feats[sl], logits[sl], labels[sl])
    bank.finish_fill()
    return bank


def row_has_duplicates(nb: Neighbours) -> bool:
    for row in nb.sample_indices.tolist():
        valid = [s for s in row if s >= 0]
        if len(valid) != len(set(valid)):
            return True
    return False


def same_neighbours(a: Neighbours, b: Neighbours) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("sims", "logits", "labels", "sample_indices", "valid"))


# ------------------------------------------------------------------------------------ transform
def test_center_stores_and_retrieves_cosines_of_explicitly_centred_vectors():
    data = relu_data()
    idx, feats, logits, labels = data
    bank = pass_filled(data, feature_transform="center")
    unit = F.normalize(feats, dim=1)
    mu = unit.mean(dim=0)
    torch.testing.assert_close(bank.mu, mu, atol=1e-6, rtol=0)
    centred = F.normalize(unit - mu, dim=1)
    torch.testing.assert_close(bank.feats, centred, atol=1e-6, rtol=0)
    q, ql, ex = torch.rand(40, 32) * 3, labels[:40], idx[:40]
    nb = bank.retrieve(q, 12, ql, exclude_indices=ex)
    qc = F.normalize(F.normalize(q, dim=1) - mu, dim=1)
    ref = (qc.double() @ centred.double().T)
    ref[idx[:40], idx[:40]] = -np.inf  # self-exclusion (row b is sample b)
    ref_sims, ref_slots = ref.topk(12, dim=1)
    assert torch.equal(nb.sample_indices, ref_slots)
    torch.testing.assert_close(nb.sims.double(), ref_sims, atol=1e-5, rtol=0)


def test_center_spreads_the_top_k_similarities_of_relu_features():
    data = relu_data(n=1000, d=64, c=10, shared=5.0)
    idx, feats, logits, labels = data
    spread, mean_sim = {}, {}
    for transform in ("none", "center"):
        bank = pass_filled(data, feature_transform=transform)
        nb = bank.retrieve(feats[:200], 16, labels[:200], exclude_indices=idx[:200])
        spread[transform] = nb.sims.std(dim=1).mean().item()
        mean_sim[transform] = nb.sims.mean().item()
    assert mean_sim["none"] > 0.9, "post-ReLU features with a shared component: nearly flat cosines"
    assert spread["center"] > 4 * spread["none"], spread


def test_center_whiten_whitens_the_filled_bank():
    data = relu_data(n=2000, d=16)
    idx, feats, logits, labels = data
    # A tiny eps: then the whitened bank has (nearly) unit covariance. The default eps (1e-2 of the
    # mean eigenvalue) regularises near-null directions, checked below.
    bank = pass_filled(data, feature_transform="center_whiten", whiten_eps=1e-6)
    unit = F.normalize(feats, dim=1).double()
    mu = unit.mean(dim=0)
    white = (unit - mu) @ bank.whiten.double()
    cov = white.T @ white / white.shape[0]
    torch.testing.assert_close(cov, torch.eye(16, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(bank.feats.double(), F.normalize(white, dim=1), atol=1e-5, rtol=0)
    q = torch.rand(10, 16)
    nb = bank.retrieve(q, 5, labels[:10])
    qw = F.normalize((F.normalize(q, dim=1).double() - mu) @ bank.whiten.double(), dim=1)
    expect = (qw.unsqueeze(1) * F.normalize(white, dim=1)[nb.sample_indices]).sum(-1)
    torch.testing.assert_close(nb.sims.double(), expect, atol=1e-5, rtol=0)
    # The whitening stays frozen through updates; mu keeps following them.
    before = bank.whiten.clone()
    bank.update(idx[:50], feats[:50] + 1.0, logits[:50], labels[:50])
    assert torch.equal(bank.whiten, before)
    # With the default eps every eigenvalue l is scaled by l / (l + eps * mean(l)) < 1, most for the smallest.
    regular = pass_filled(data, feature_transform="center_whiten")
    assert regular.whiten_eps == 1e-2
    centred = unit - mu
    lam = torch.linalg.eigvalsh(centred.T @ centred / unit.shape[0])
    white_reg = centred @ regular.whiten.double()
    evals = torch.linalg.eigvalsh(white_reg.T @ white_reg / unit.shape[0])
    torch.testing.assert_close(evals, (lam / (lam + 1e-2 * lam.mean())).sort().values, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="memory.whiten_eps"):
        pass_filled(data, feature_transform="center_whiten", whiten_eps=0.0)


def test_mu_follows_writes_as_an_ema_after_the_fill_pass():
    data = relu_data(n=300)
    idx, feats, logits, labels = data
    c = 0.9
    bank = pass_filled(data, feature_transform="center", center_momentum=c)
    mu0 = bank.mu.clone()
    new = torch.rand(20, 32) * 2
    bank.update(idx[:20], new, logits[:20], labels[:20])
    unit = F.normalize(new, dim=1)
    mu1 = c * mu0 + (1 - c) * unit.mean(dim=0)
    torch.testing.assert_close(bank.mu, mu1, atol=1e-6, rtol=0)
    # The batch is stored with the updated mu; untouched entries keep the mu of their own write.
    torch.testing.assert_close(bank.feats[:20], F.normalize(unit - mu1, dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(bank.feats[20:], F.normalize(F.normalize(feats[20:], dim=1) - mu0, dim=1), atol=1e-6, rtol=0)
    # A frozen bank never moves mu.
    frozen = pass_filled(data, feature_transform="center", update="frozen")
    mu_f = frozen.mu.clone()
    frozen.update(idx[:20], new, logits[:20], labels[:20])
    assert torch.equal(frozen.mu, mu_f)


def test_online_bank_starts_mu_from_its_first_batch():
    idx, feats, logits, labels = relu_data(n=300)
    c = 0.5
    bank = MemoryBank(300, 32, 8, feature_transform="center", center_momentum=c)
    assert not bool(bank.mu_set)
    empty = bank.retrieve(feats[:4], 3, labels[:4])  # an online bank is queried before its first write
    assert not empty.valid.any()
    bank.fill(idx[:100], feats[:100], logits[:100], labels[:100])
    first = F.normalize(feats[:100], dim=1).mean(dim=0)
    torch.testing.assert_close(bank.mu, first, atol=1e-6, rtol=0)
    bank.fill(idx[100:200], feats[100:200], logits[100:200], labels[100:200])
    torch.testing.assert_close(bank.mu, c * first + (1 - c) * F.normalize(feats[100:200], dim=1).mean(dim=0), atol=1e-6, rtol=0)
    assert bool(bank.mu_set)


def test_update_and_retrieve_never_read_device_values(monkeypatch):
    """The hot loop of an M = N bank (write + retrieve) must not wait for the device: no Python
    branch on a tensor's value. On CPU, forbid every tensor -> Python conversion instead."""
    data = relu_data(n=300)
    idx, feats, logits, labels = data
    banks = [pass_filled(data, feature_transform=t, update=u) for t in ("center", "center_whiten") for u in ("overwrite", "momentum")]
    online = MemoryBank(300, 32, 8, feature_transform="center")
    online.fill(idx, feats, logits, labels)  # full: past the filling-up syncs
    banks.append(online)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync: a tensor value was read on the host")

    for name in ("__bool__", "item", "__int__", "__float__", "tolist", "numpy", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for bank in banks:
        for step in range(3):
            sl = slice(step * 32, step * 32 + 32)
            # check_range=False is what update() does for device (CUDA) indices.
            bank._write(idx[sl], feats[sl], logits[sl], labels[sl], mix=bank.update_rule == "momentum", check_range=False)
            bank.retrieve(feats[sl], 8, labels[sl], exclude_indices=idx[sl])
            bank.retrieve(feats[sl], 8, labels[sl], exclude_indices=idx[sl], split="separate", k_pos=4, k_neg=4)
            bank.retrieve(feats[sl], 8, labels[sl], exclude_indices=idx[sl], retrieval="random")


@pytest.mark.parametrize("mode", [{}, {"size": 200, "subset": "fifo"}])
@pytest.mark.parametrize("backend,kw", [("faiss_flat", {}), ("faiss_ivf", {"nlist": 4, "nprobe": 4})])
def test_faiss_agrees_with_torch_under_center(backend, kw, mode):
    data = relu_data(n=400)
    idx, feats, logits, labels = data
    torch_bank = pass_filled(data, feature_transform="center", **mode)
    faiss_bank = pass_filled(data, feature_transform="center", retriever=backend, retriever_kwargs=kw, **mode)
    g = torch.Generator().manual_seed(1)
    for step in range(3):  # after updates too (stale index rows, EMA of mu)
        q, ql, ex = feats[step * 30:step * 30 + 30], labels[step * 30:step * 30 + 30], idx[step * 30:step * 30 + 30]
        for split in ({"split": "topk"}, {"split": "separate", "k_pos": 3, "k_neg": 3}):
            a = torch_bank.retrieve(q, 6, ql, exclude_indices=ex, **split)
            b = faiss_bank.retrieve(q, 6, ql, exclude_indices=ex, **split)
            assert torch.equal(a.sample_indices, b.sample_indices), (step, split)
            torch.testing.assert_close(a.sims, b.sims, atol=1e-5, rtol=0)
        perm = torch.randperm(400, generator=g)[:64]
        new = torch.rand(64, 32, generator=g) * 3
        for bank in (torch_bank, faiss_bank):
            bank.update(idx[perm], new, logits[perm], labels[perm])


# ------------------------------------------------------------------------------------ errors
def test_transform_errors_name_the_fix():
    idx, feats, logits, labels = relu_data(n=100)
    online = MemoryBank(100, 32, 8, feature_transform="center_whiten")
    with pytest.raises(ConfigError, match="use memory.feature_transform=center, or memory.fill=pass in the offline paradigm"):
        online.fill(idx, feats, logits, labels)
    with pytest.raises(ConfigError, match="memory.fill=pass in the offline paradigm"):
        online.retrieve(feats[:2], 3, labels[:2])
    bank = MemoryBank(100, 32, 8, feature_transform="center")
    with pytest.raises(ConfigError, match="call begin_fill"):
        bank.finish_fill()
    bank.begin_fill()
    bank.fill(idx, feats, logits, labels)
    with pytest.raises(ConfigError, match="call finish_fill"):
        bank.retrieve(feats[:2], 3, labels[:2])
    with pytest.raises(ConfigError, match="call finish_fill"):
        bank.update(idx[:2], feats[:2], logits[:2], labels[:2])
    bank.finish_fill()
    bank.retrieve(feats[:2], 3, labels[:2])
    with pytest.raises(ConfigError, match="choose one of: none, center, center_whiten"):
        MemoryBank(100, 32, 8, feature_transform="whiten")
    with pytest.raises(ConfigError, match=r"memory.center_momentum=1.0 must be in \[0, 1\)"):
        MemoryBank(100, 32, 8, center_momentum=1.0)
    with pytest.raises(ConfigError, match="choose one of: knn, random"):
        MemoryBank(100, 32, 8, retrieval="shuffled")
    with pytest.raises(ConfigError, match="choose one of: knn, random"):
        bank.retrieve(feats[:2], 3, labels[:2], retrieval="nearest")


def test_build_bank_refuses_whitening_without_a_fill_pass():
    from ickd.distill.build import build_bank
    from tests.helpers import compose_config

    for args in (["memory.fill=online"], ["paradigm=teacher_free"], ["paradigm=online"]):
        cfg = compose_config("distill=ickd", "memory.feature_transform=center_whiten", *args)
        with pytest.raises(ConfigError, match="use memory.feature_transform=center, or memory.fill=pass"):
            build_bank(cfg, num_samples=512, feature_dim=16, num_classes=10, device=torch.device("cpu"), seed=0)
    cfg = compose_config("distill=ickd", "memory.feature_transform=center_whiten", "memory.retrieval=random")
    bank = build_bank(cfg, num_samples=512, feature_dim=16, num_classes=10, device=torch.device("cpu"), seed=0)
    assert bank.feature_transform == "center_whiten" and bank.retrieval == "random"
    # feature_transform=auto (the default): whitened with a fill pass (offline), centred when filled online.
    default = build_bank(compose_config("distill=ickd"), 512, 16, 10, torch.device("cpu"), 0)
    assert default.feature_transform == "center_whiten" and default.center_momentum == 0.99 and default.retrieval == "knn"
    assert default.whiten_eps == 0.01
    for args in (["memory.fill=online"], ["paradigm=online"], ["paradigm=teacher_free"]):
        online = build_bank(compose_config("distill=ickd", *args), 512, 16, 10, torch.device("cpu"), 0)
        assert online.feature_transform == "center", args


# ------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize(
    "kw",
    [
        {"feature_transform": "center"},
        {"feature_transform": "center_whiten", "update": "momentum"},
        {"feature_transform": "center", "size": 150, "subset": "fifo", "retrieval": "random"},
        {"feature_transform": "center", "size": 150, "subset": "random", "retriever": "faiss_flat"},
        {"feature_transform": "none", "retrieval": "random"},
    ],
)
def test_state_round_trip_continues_identically(kw):
    data = relu_data(n=300)
    idx, feats, logits, labels = data
    bank = pass_filled(data, **kw)
    bank.update(idx[:40], feats[40:80], logits[:40], labels[:40])
    q = feats[:25] * 0.5
    bank.retrieve(q, 6, labels[:25], exclude_indices=idx[:25])  # advances the random generator
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    restored = MemoryBank(300, 32, 8, **{**kw, "seed": 77})  # the generator state comes from the checkpoint
    restored.load_state_dict(torch.load(buf, weights_only=False))
    for step in range(2):
        sl = slice(100 + 30 * step, 130 + 30 * step)
        for b in (bank, restored):
            b.update(idx[sl], feats[sl] * 1.5, logits[sl], labels[sl])
        a = bank.retrieve(q, 6, labels[:25], exclude_indices=idx[:25])
        r = restored.retrieve(q, 6, labels[:25], exclude_indices=idx[:25])
        assert same_neighbours(a, r), step
    assert torch.equal(bank.mu, restored.mu)


def test_old_or_mismatched_checkpoints_are_refused_with_the_fix():
    data = relu_data(n=200)
    idx, feats, logits, labels = data
    plain = pass_filled(data, feature_transform="none")
    old = {k: v for k, v in plain.state_dict().items() if k not in ("mu", "mu_set", "whiten", "in_fill_pass", "generator", "slot_of", "feature_transform")}
    old["version"] = 1
    MemoryBank(200, 32, 8, feature_transform="none").load_state_dict(old)  # untransformed: fine
    with pytest.raises(CheckpointError, match="predates memory.feature_transform.*resume with memory.feature_transform=none"):
        MemoryBank(200, 32, 8, feature_transform="center").load_state_dict(old)
    centred = pass_filled(data, feature_transform="center")
    with pytest.raises(CheckpointError, match="resume with memory.feature_transform=center"):
        MemoryBank(200, 32, 8, feature_transform="center_whiten").load_state_dict(centred.state_dict())


def test_version_1_fifo_checkpoint_keeps_each_samples_newest_copy():
    idx, feats, logits, labels = relu_data(n=100)
    bank = MemoryBank(100, 32, 8, size=10, subset="fifo")
    bank.fill(idx[:10], feats[:10], logits[:10], labels[:10])
    sd = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in bank.state_dict().items()}
    # What a version-1 bank held after re-writing samples 3 and 4: the ring's next two slots (0, 1)
    # got copies, so 3 and 4 sat in two slots each.
    sd["sample_idx"][:2] = torch.tensor([3, 4])
    sd["labels"][:2] = labels[3:5]
    sd["fifo_ptr"] = 2
    for key in ("mu", "mu_set", "whiten", "in_fill_pass", "generator", "slot_of", "feature_transform"):
        sd.pop(key)
    sd["version"] = 1
    restored = MemoryBank(100, 32, 8, size=10, subset="fifo")
    restored.load_state_dict(sd)
    held = restored.sample_idx.tolist()
    assert held[:2] == [3, 4] and held[3] == held[4] == -1  # the older copies are emptied
    assert sorted(s for s in held if s >= 0) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert restored.slot_of[3] == 0 and restored.slot_of[4] == 1 and restored.slot_of[9] == 9


# ------------------------------------------------------------------------------------ duplicates
MODES = [{}, {"size": 120, "subset": "fifo"}, {"size": 120, "subset": "random"}, {"size": 40, "subset": "fifo"}]


@pytest.mark.parametrize("backend", ["torch", "faiss_flat"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m.get('subset', 'direct')}{m.get('size', '')}")
def test_no_sample_is_held_or_retrieved_twice(mode, backend):
    n = 300
    data = relu_data(n=n, c=4)
    idx, feats, logits, labels = data
    bank = pass_filled(data, feature_transform="center", retriever=backend, **mode)
    g = torch.Generator().manual_seed(3)
    for epoch in range(4):  # shuffled epochs, batches of 32: samples come back while still in a FIFO
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, 32):
            b = perm[s:s + 32]
            bank.update(idx[b], feats[b] + 0.1 * epoch, logits[b], labels[b])
            if s % 96 == 0 and len(b) >= 24:
                q = torch.rand(24, 32, generator=g) * 3
                ql = torch.randint(0, 4, (24,), generator=g)
                ex = idx[b[:24]]
                for split in ({"split": "topk"}, {"split": "separate", "k_pos": 8, "k_neg": 8}):
                    for retrieval in ("knn", "random"):
                        nb = bank.retrieve(q, 16, ql, exclude_indices=ex, retrieval=retrieval, **split)
                        assert not row_has_duplicates(nb), (epoch, s, split, retrieval)
                        assert not (nb.sample_indices == ex[:, None]).any()
        held = bank.sample_idx[bank.sample_idx >= 0].tolist()
        assert len(held) == len(set(held)), f"epoch {epoch}: a sample sits in two slots"
        assert bank.num_valid == len(held)
        if mode.get("subset") == "fifo":
            # slot_of points at each held sample's slot
            slots = torch.nonzero(bank.sample_idx >= 0).squeeze(1)
            assert torch.equal(bank.slot_of[bank.sample_idx[slots]], slots)
            assert len(held) > 0.8 * mode["size"]  # holes only where a sample came back within M writes


def test_fifo_rewrite_empties_the_previous_slot():
    idx, feats, logits, labels = relu_data(n=50)
    bank = MemoryBank(50, 32, 8, size=10, subset="fifo")
    bank.fill(idx[:6], feats[:6], logits[:6], labels[:6])
    bank.update(idx[[2, 7]], feats[[2, 7]], logits[[2, 7]], labels[[2, 7]])
    assert bank.sample_idx.tolist() == [0, 1, -1, 3, 4, 5, 2, 7, -1, -1]
    assert bank.labels[2] == -1 and bank.num_valid == 7
    nb = bank.retrieve(feats[2:3], 6, labels[2:3])
    assert nb.sample_indices[0].tolist().count(2) == 1


# ------------------------------------------------------------------------------------ random ablation
def clustered(n=400, d=16, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % c
    feats = F.relu(torch.randn(c, d, generator=g)[labels] * 2 + torch.randn(n, d, generator=g) + 2)
    return torch.arange(n), feats, torch.randn(n, c, generator=g), labels


@pytest.mark.parametrize("transform", ["none", "center"])
def test_random_neighbours_keep_the_knn_label_counts(transform):
    data = clustered()
    idx, feats, logits, labels = data
    bank = pass_filled(data, feature_transform=transform)
    q, ql, ex = feats[:64], labels[:64], idx[:64]
    knn = bank.retrieve(q, 12, ql, exclude_indices=ex)
    rnd = bank.retrieve(q, 12, ql, exclude_indices=ex, retrieval="random")
    assert torch.equal(rnd.positive.sum(1), knn.positive.sum(1))
    assert torch.equal(rnd.negative.sum(1), knn.negative.sum(1))
    assert rnd.valid.all() and not (rnd.sample_indices == ex[:, None]).any() and not row_has_duplicates(rnd)
    assert torch.equal(rnd.labels, bank.labels[rnd.sample_indices])
    torch.testing.assert_close(rnd.logits, bank.logits[rnd.sample_indices])
    # sims are the true cosines in the bank's space, and rows stay sorted by them
    qt = bank._transform(F.normalize(q, dim=1))
    torch.testing.assert_close(rnd.sims, (bank.feats[rnd.sample_indices] * qt[:, None]).sum(-1), atol=1e-6, rtol=0)
    assert (rnd.sims[:, :-1] >= rnd.sims[:, 1:]).all()
    # Different neighbours from k-NN (drawn among ~40 same-class and ~360 other-class entries) and
    # less similar on average; a second draw differs from the first.
    overlap = (rnd.sample_indices.unsqueeze(2) == knn.sample_indices.unsqueeze(1)).any(2).float().mean()
    assert overlap < 0.5, overlap
    assert rnd.sims.mean() < knn.sims.mean()
    again = bank.retrieve(q, 12, ql, exclude_indices=ex, retrieval="random")
    assert not torch.equal(again.sample_indices, rnd.sample_indices)
    # Uniform: over many draws every eligible same-class entry of a query comes up.
    seen = set()
    for _ in range(60):
        nb = bank.retrieve(q[:1], 12, ql[:1], exclude_indices=ex[:1], retrieval="random", split="separate", k_pos=4, k_neg=4)
        seen.update(nb.sample_indices[0, :4].tolist())
    assert seen == set(torch.nonzero(labels == ql[0]).squeeze(1).tolist()) - {0}


def test_random_separate_draws_k_pos_same_and_k_neg_other_class():
    data = clustered(n=120, c=10)  # 12 per class: 11 same-class candidates besides the query
    idx, feats, logits, labels = data
    bank = pass_filled(data, feature_transform="center", size=100, subset="fifo")
    held = bank.sample_idx >= 0
    q, ql, ex = feats[:50], labels[:50], idx[:50]
    nb = bank.retrieve(q, 0, ql, exclude_indices=ex, split="separate", k_pos=6, k_neg=9, retrieval="random")
    same_avail = torch.tensor([int(((bank.labels == y) & held & (bank.sample_idx != i)).sum()) for y, i in zip(ql, ex)])
    assert torch.equal(nb.positive[:, :6].sum(1), same_avail.clamp(max=6))
    assert not nb.negative[:, :6].any() and nb.negative[:, 6:].all()
    assert not (nb.sample_indices == ex[:, None]).any() and not row_has_duplicates(nb)
    assert (nb.sample_indices[nb.valid] >= 0).all()
    # Only entries the bank holds are drawn.
    assert set(nb.sample_indices[nb.valid].tolist()) <= set(bank.sample_idx[held].tolist())


def test_random_retrieval_follows_the_bank_seed():
    data = clustered()
    idx, feats, logits, labels = data
    draws = []
    for seed in (0, 0, 1):
        bank = pass_filled(data, seed=seed, retrieval="random")
        draws.append(bank.retrieve(feats[:20], 8, labels[:20], exclude_indices=idx[:20]).sample_indices)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert pass_filled(data, retrieval="random").capture_blocker() is not None


# ------------------------------------------------------------------------------------ fill order
def _sorted_bundle(n: int = 1000, c: int = 10):
    from ickd.data.base import TensorBundle
    from ickd.data.synthetic import make_synthetic

    x, y = make_synthetic(c, n, 16, 3, 0.25, 0, split=0)
    order = torch.argsort(y, stable=True)  # class-sorted, like an ImageFolder
    xv, yv = make_synthetic(c, 50, 16, 3, 0.25, 0, split=1)
    return TensorBundle(
        name="sorted", train_images=x[order], train_labels=y[order], val_images=xv, val_labels=yv,
        num_classes=c, class_names=[str(i) for i in range(c)], mean=[0.5] * 3, std=[0.25] * 3,
        source="class-sorted synthetic", augment=None, seed=0,
    )


@pytest.mark.parametrize("size", [100, None])
def test_trainer_fills_a_fifo_bank_in_shuffled_order(tmp_path, size):
    from ickd.methods import create_method
    from ickd.distill.paradigms import OfflineDistiller, RetrievalSpec
    from ickd.engine.run import to_container
    from ickd.engine.trainer import Trainer, TrainerConfig
    from ickd.models import create_model
    from tests.helpers import compose_config

    torch.manual_seed(0)
    data = _sorted_bundle()
    teacher = create_model("resnet8", 10)
    bank = MemoryBank(1000, teacher.feature_dim, 10, size=size, subset="fifo", feature_transform="center")
    cfg = to_container(compose_config("distill=ickd"))
    distiller = OfflineDistiller(create_model("resnet8", 10), create_method(cfg["distill"]), RetrievalSpec(k=4), teacher=teacher, bank=bank)
    tc = TrainerConfig.from_mapping({**cfg["trainer"], "epochs": 1, "batch_size": 50, "eval_batch_size": 50, "device": "cpu", "progress": "off", "num_workers": 0})
    trainer = Trainer(distiller, data, tc, cfg["optim"], tmp_path, seed=0)
    calls = []
    make_loader = data.train_loader
    data.train_loader = lambda *a, **kw: calls.append(kw) or make_loader(*a, **kw)
    trainer.fill_banks()
    held = bank.sample_idx[bank.sample_idx >= 0]
    if size is None:  # M = N: every sample, dataset order
        assert calls[-1]["shuffle"] is False and held.numel() == 1000
    else:
        # In dataset order the FIFO would keep the last 100 samples: class 9 only.
        assert calls[-1]["shuffle"] is True
        assert held.numel() == 100 and set(bank.labels[bank.sample_idx >= 0].tolist()) == set(range(10))
    # Distiller.fill_banks ended the pass: mu is the exact mean of the held entries' normalised features.
    assert not bank.in_fill_pass and bool(bank.mu_set)
    teacher.eval()
    with torch.no_grad():
        x, _, _ = next(iter(data.train_loader(1000, shuffle=False, augment=False)))
        _, f = teacher(x)
    torch.testing.assert_close(bank.mu, F.normalize(f[held], dim=1).mean(0), atol=1e-5, rtol=0)
