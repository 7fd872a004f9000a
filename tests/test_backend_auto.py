"""memory.backend=auto: the size/device rule, its log line, and that an auto bank retrieves like torch."""
from __future__ import annotations

import logging

import pytest
import torch

from ickd.distill.build import build_bank
from ickd.errors import ConfigError
from ickd.memory import AUTO_BACKEND, MemoryBank, choose_backend, resolve_backend
from ickd.memory import retrieval
from tests.helpers import compose_config

FLAT_MIN = retrieval.CPU_FLAT_MIN_WORK


IVF_MIN = retrieval.CUDA_IVF_MIN_SIZE


# ----------------------------------------------------------------------------- the rule (pure)
# No GPU here: torch.device("cuda") needs none to exist (the rule is a pure function of the device
# type), and whether faiss has GPUs is passed in (faiss_gpu=True/False) as the stand-in for a
# faiss-gpu / faiss-cpu install seeing a GPU.
@pytest.mark.parametrize("size,dim", [(100, 8), (50_000, 256), (1_281_167, 512), (1_281_167, 2048), (10**8, 4096)])
@pytest.mark.parametrize("faiss_gpu", [True, False])
def test_cuda_banks_updated_every_step_use_torch(size, dim, faiss_gpu):
    # overwrite/momentum banks (the default) write at every step: faiss_ivf would re-clone its
    # index to the GPU each time, so even a million-entry bank with GPU faiss stays on torch.
    choice = choose_backend(size, dim, "cuda", faiss_available=True, frozen=False, faiss_gpu=faiss_gpu)
    assert (choice.name, choice.exact) == ("torch", True)
    assert "performance-anchors" in choice.reason and "frozen" in choice.reason


@pytest.mark.parametrize("dim", [128, 512, 2048])
def test_cuda_frozen_million_entry_bank_uses_gpu_ivf_from_the_threshold(dim):
    assert IVF_MIN == 1_000_000
    below = choose_backend(IVF_MIN - 1, dim, "cuda", frozen=True, faiss_gpu=True)
    at = choose_backend(IVF_MIN, dim, "cuda", frozen=True, faiss_gpu=True)
    imagenet = choose_backend(1_281_167, dim, "cuda", frozen=True, faiss_gpu=True)
    assert (below.name, below.exact) == ("torch", True)
    assert (at.name, at.exact) == ("faiss_ivf", False)
    assert (imagenet.name, imagenet.exact) == ("faiss_ivf", False)
    assert "1,281,167" in imagenet.reason and "frozen" in imagenet.reason


def test_cuda_frozen_million_entry_bank_without_gpu_faiss_uses_torch_and_says_how_to_get_it():
    choice = choose_backend(1_281_167, 512, "cuda", frozen=True, faiss_gpu=False)
    assert (choice.name, choice.exact) == ("torch", True)
    assert "pip install 'ickd[faiss-gpu]'" in choice.reason


@pytest.mark.parametrize("size", [1_000, 1_281_167, 10**8])
def test_frozen_changes_nothing_on_the_cpu(size):
    for frozen in (False, True):
        choice = choose_backend(size, 512, "cpu", faiss_available=True, frozen=frozen, faiss_gpu=True)
        assert choice.name == ("torch" if size * 512 < FLAT_MIN else "faiss_flat") and choice.exact


def test_resolve_on_cuda_detects_faiss_here_has_no_gpus(caplog):
    # Real detection with this machine's faiss-cpu (no StandardGpuResources): torch, logged once.
    with caplog.at_level(logging.INFO, logger="ickd.memory"):
        name, kw, reason = resolve_backend("auto", 1_281_167, 512, "cuda", {"nlist": None}, frozen=True)
    assert (name, kw) == ("torch", {})
    assert "ickd[faiss-gpu]" in reason
    assert len([r for r in caplog.records if "memory.backend=auto chose torch" in r.getMessage()]) == 1


def test_resolve_on_cuda_with_gpu_faiss_picks_ivf_on_the_gpu(monkeypatch, caplog):
    # Stand-in for a faiss-gpu build that sees a GPU (nothing is allocated by resolve_backend).
    monkeypatch.setattr(retrieval, "_faiss_gpu_available", lambda: True)
    opts = {"nlist": None, "nprobe": 64, "use_gpu": None}
    with caplog.at_level(logging.INFO, logger="ickd.memory"):
        name, kw, reason = resolve_backend("auto", 1_281_167, 2048, "cuda", opts, frozen=True)
    assert name == "faiss_ivf" and kw["use_gpu"] is True and kw["nprobe"] == 64
    lines = [r.getMessage() for r in caplog.records if "memory.backend=auto" in r.getMessage()]
    assert len(lines) == 1 and "chose faiss_ivf (approximate) for a 1281167 x 2048 bank on cuda" in lines[0]
    # memory.use_gpu=false rules GPU faiss out: exact torch instead.
    assert resolve_backend("auto", 1_281_167, 2048, "cuda", {"use_gpu": False}, frozen=True)[0] == "torch"
    # Not frozen: torch, whatever faiss offers.
    assert resolve_backend("auto", 1_281_167, 2048, "cuda", opts, frozen=False)[0] == "torch"


def test_bank_passes_its_update_rule_as_frozen(monkeypatch):
    seen = []
    real = retrieval.choose_backend

    def spy(*args, **kwargs):
        seen.append(kwargs.get("frozen"))
        return real(*args, **kwargs)

    monkeypatch.setattr(retrieval, "choose_backend", spy)
    MemoryBank(64, 8, 3, retriever="auto", update="frozen")
    MemoryBank(64, 8, 3, retriever="auto", update="overwrite")
    assert seen == [True, False]


@pytest.mark.parametrize("dim", [64, 256, 1024])
def test_cpu_flat_threshold_both_sides(dim):
    below = (-(-FLAT_MIN // dim) - 1, dim)  # the largest M with M * D < threshold
    at = (-(-FLAT_MIN // dim), dim)  # the smallest M with M * D >= threshold
    assert below[0] * dim < FLAT_MIN <= at[0] * dim
    low = choose_backend(*below, "cpu", faiss_available=True)
    high = choose_backend(*at, "cpu", faiss_available=True)
    assert (low.name, low.exact) == ("torch", True)
    assert (high.name, high.exact) == ("faiss_flat", True)


@pytest.mark.parametrize(
    "size,dim,expected",
    [(1_000, 64, "torch"), (5_000, 128, "torch"), (10_000, 128, "faiss_flat"), (50_000, 256, "faiss_flat"),
     (1_281_167, 512, "faiss_flat"), (1_281_167, 2048, "faiss_flat"), (10**8, 4096, "faiss_flat")],
)
def test_cpu_measured_sizes_and_never_ivf(size, dim, expected):
    # The measured sizes of the docstring land where the measurements put them; no size, however
    # large, gets the approximate IVF index automatically.
    choice = choose_backend(size, dim, "cpu", faiss_available=True)
    assert choice.name == expected and choice.exact
    assert f"{size * dim:,}" in choice.reason


def test_cpu_without_faiss_stays_on_torch():
    choice = choose_backend(1_281_167, 512, "cpu", faiss_available=False)
    assert choice.name == "torch" and "not installed" in choice.reason


def test_other_device_types_get_torch():
    assert choose_backend(10**9, 512, "meta").name == "torch"


# ----------------------------------------------------------------------------- the bank
def test_auto_bank_logs_choice_once_and_exposes_it(caplog):
    with caplog.at_level(logging.INFO, logger="ickd.memory"):
        bank = MemoryBank(300, 16, 5, retriever=AUTO_BACKEND)
    lines = [r for r in caplog.records if r.name == "ickd.memory" and "memory.backend=auto" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO
    assert "chose torch (exact) for a 300 x 16 bank on cpu" in lines[0].getMessage()
    assert bank.backend_requested == "auto"
    assert bank.retriever.name == bank.retriever_name == "torch"
    assert bank.backend_reason in lines[0].getMessage()
    assert bank.state_dict()["retriever_name"] == "torch"  # the concrete backend is checkpointed


def test_auto_bank_retrieves_the_same_neighbours_as_torch():
    g = torch.Generator().manual_seed(3)
    n, d, c = 400, 32, 7
    feats, logits = torch.randn(n, d, generator=g), torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    banks = [MemoryBank(n, d, c, retriever=name) for name in ("auto", "torch")]
    for bank in banks:
        bank.fill(torch.arange(n), feats, logits, labels)
    q_idx = torch.randperm(n, generator=g)[:24]
    q = feats[q_idx] + 0.05 * torch.randn(24, d, generator=g)
    auto, exact = (bank.retrieve(q, 8, labels[q_idx], exclude_indices=q_idx) for bank in banks)
    assert torch.equal(auto.sample_indices, exact.sample_indices)
    assert torch.equal(auto.sims, exact.sims)
    assert not (auto.sample_indices == q_idx.unsqueeze(1)).any()  # self-exclusion holds


def test_auto_drops_options_the_chosen_backend_does_not_take(caplog):
    # memory.nlist is a faiss_ivf option: with auto choosing torch it is ignored, and the log says so.
    with caplog.at_level(logging.INFO, logger="ickd.memory"):
        bank = MemoryBank(300, 16, 5, retriever="auto", retriever_kwargs={"nlist": 4, "nprobe": None})
    assert bank.retriever.name == "torch" and bank.retriever_kwargs == {}
    assert "ignoring option(s) nlist" in caplog.text
    # An explicit torch backend still rejects it, as before.
    with pytest.raises(ConfigError, match="only applies to faiss_ivf"):
        MemoryBank(300, 16, 5, retriever="torch", retriever_kwargs={"nlist": 4})


def test_auto_bank_switches_to_faiss_flat_at_the_threshold_with_the_same_neighbours(caplog):
    # 1024 x 1024 = 2**20 = the threshold: a 4 MiB bank, so both sides are real banks.
    assert FLAT_MIN == 1024 * 1024
    n, c = 1024, 6
    g = torch.Generator().manual_seed(5)
    feats, logits = torch.randn(n, 1024, generator=g), torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    with caplog.at_level(logging.INFO, logger="ickd.memory"):
        small = MemoryBank(n, 1023, c, retriever="auto")
        flat = MemoryBank(n, 1024, c, retriever="auto", retriever_kwargs={"nlist": 8, "use_gpu": False})
    assert small.retriever.name == "torch"
    assert flat.retriever.name == "faiss_flat" and flat.retriever.exact
    assert flat.retriever_kwargs == {"use_gpu": False}  # nlist dropped: faiss_flat does not take it
    assert "chose faiss_flat (exact) for a 1024 x 1024 bank on cpu" in caplog.text
    assert "ignoring option(s) nlist" in caplog.text
    exact = MemoryBank(n, 1024, c, retriever="torch")
    for bank in (flat, exact):
        bank.fill(torch.arange(n), feats, logits, labels)
    q_idx = torch.randperm(n, generator=g)[:32]
    q = feats[q_idx] + 0.05 * torch.randn(32, 1024, generator=g)
    got, want = (b.retrieve(q, 8, labels[q_idx], exclude_indices=q_idx) for b in (flat, exact))
    assert torch.equal(got.sample_indices, want.sample_indices)
    assert torch.allclose(got.sims, want.sims, atol=1e-5)


def test_explicit_names_pass_through_unlogged(caplog):
    with caplog.at_level(logging.INFO, logger="ickd.memory"):
        for name in ("torch", "faiss_flat", "faiss_ivf"):
            kw = {"nlist": 2} if name == "faiss_ivf" else {}
            bank = MemoryBank(100, 8, 3, retriever=name, retriever_kwargs=kw)
            assert bank.retriever.name == bank.retriever_name == bank.backend_requested == name
            assert "explicitly" in bank.backend_reason
    assert "memory.backend=auto" not in caplog.text
    assert resolve_backend("faiss_flat", 10**9, 512, "cpu", {"use_gpu": True}) == (
        "faiss_flat", {"use_gpu": True}, "memory.backend=faiss_flat was set explicitly"
    )


def test_unknown_backend_error_lists_auto():
    with pytest.raises(ConfigError, match="set memory.backend to one of: faiss_flat, faiss_ivf, torch, auto"):
        MemoryBank(100, 8, 3, retriever="annoy")


def test_create_retriever_explains_auto_needs_the_bank():
    with pytest.raises(ConfigError, match="resolved from the bank's size and device"):
        retrieval.create_retriever("auto")


def test_config_default_is_auto_and_builds_an_exact_bank():
    cfg = compose_config("distill=ickd")
    assert cfg.memory.backend == "auto"
    bank = build_bank(cfg, num_samples=512, feature_dim=16, num_classes=10, device=torch.device("cpu"), seed=0)
    assert bank.backend_requested == "auto" and bank.retriever.name == "torch"


def test_faiss_blas_switch_is_lowered_only_during_our_search():
    import faiss

    from ickd.memory.faiss_backend import blas_search

    before = faiss.cvar.distance_compute_blas_threshold
    with blas_search(faiss, 256):
        inside = faiss.cvar.distance_compute_blas_threshold
    assert inside == min(before, 20 * 256)
    assert faiss.cvar.distance_compute_blas_threshold == before
    with pytest.raises(RuntimeError):  # restored when the search fails too
        with blas_search(faiss, 256):
            raise RuntimeError("search failed")
    assert faiss.cvar.distance_compute_blas_threshold == before
