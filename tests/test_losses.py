"""Distillation losses against hand computations, edge cases, bounds and gradient flow."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ickd.errors import ConfigError
from ickd.losses import (
    aggregate_positive_targets,
    dkd_loss,
    kd_loss,
    nicd_contrastive_bound,
    nicd_loss,
    picd_loss,
)


def np_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------------------------ KD / DKD
def test_kd_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    T = 2.0
    pt, ps = np_softmax(t.numpy() / T), np_softmax(s.numpy() / T)
    expected = T * T * np_kl(pt, ps).mean()
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_matches_its_definition_and_is_non_negative():
    s = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 2.0]])
    t = torch.tensor([[2.0, 1.0, 0.0, 0.5], [1.0, 1.5, 1.0, -2.0]])
    y = torch.tensor([0, 2])
    T, alpha, beta = 4.0, 1.0, 8.0
    tckd, nckd = [], []
    for i in range(2):
        ps, pt = np_softmax(s[i].numpy() / T), np_softmax(t[i].numpy() / T)
        bs = np.array([ps[y[i]], 1 - ps[y[i]]])
        bt = np.array([pt[y[i]], 1 - pt[y[i]]])
        tckd.append(np_kl(bt, bs))
        others = [c for c in range(4) if c != y[i]]
        nckd.append(np_kl(np_softmax(t[i].numpy()[others] / T), np_softmax(s[i].numpy()[others] / T)))
    expected = T * T * (alpha * np.mean(tckd) + beta * np.mean(nckd))
    assert dkd_loss(s, t, y, alpha, beta, T).item() == pytest.approx(expected, rel=1e-5)
    # alpha, beta select the two parts
    assert dkd_loss(s, t, y, 1.0, 0.0, T).item() == pytest.approx(T * T * np.mean(tckd), rel=1e-5)
    for seed in range(5):
        a, b = rand(16, 10, seed=seed, scale=3), rand(16, 10, seed=seed + 100, scale=3)
        yy = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(seed))
        assert dkd_loss(a, b, yy, 1.0, 8.0, T).item() >= 0
    assert dkd_loss(t, t, y, 1.0, 8.0, T).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss", ["kd", "dkd"])
def test_kd_losses_finite_gradients_for_extreme_logits(loss):
    s = (torch.sign(rand(8, 10)) * 1e4).requires_grad_()
    t = torch.sign(rand(8, 10, seed=1)) * 1e4
    y = torch.arange(8) % 10
    value = kd_loss(s, t, 4.0) if loss == "kd" else dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    (grad,) = torch.autograd.grad(value, s)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


# ------------------------------------------------------------------------------------ PICD target
@pytest.mark.parametrize("weighting", ["similarity", "uniform"])
@pytest.mark.parametrize("aggregate", ["logits", "probs"])
def test_picd_equals_kd_when_positives_are_own_teacher_output(weighting, aggregate):
    B, K, C, T = 6, 5, 7, 4.0
    s, t = rand(B, C), rand(B, C, seed=1, scale=2)
    positive = torch.rand(B, K, generator=torch.Generator().manual_seed(2)) > 0.4
    positive[0] = False  # row 0 falls back to its own teacher logits
    positive[1] = True
    neighbours = t.unsqueeze(1).expand(B, K, C).clone()
    neighbours[~positive] = rand(B, K, C, seed=3, scale=5)[~positive]  # non-positives must not matter
    pbar = aggregate_positive_targets(neighbours, rand(B, K, seed=4), positive, t, T, 0.1, weighting, aggregate)
    torch.testing.assert_close(picd_loss(s, pbar, T), kd_loss(s, t, T))


def test_empty_positive_set_falls_back_to_own_teacher_logits():
    B, K, C, T = 3, 4, 5, 2.0
    t = rand(B, C, seed=1)
    positive = torch.zeros(B, K, dtype=torch.bool)
    positive[2, 1] = True
    nl = rand(B, K, C, seed=2, scale=3)
    pbar = aggregate_positive_targets(nl, rand(B, K), positive, t, T)
    torch.testing.assert_close(pbar[:2], torch.softmax(t[:2] / T, dim=1))
    torch.testing.assert_close(pbar[2], torch.softmax(nl[2, 1] / T, dim=0))


def test_similarity_versus_uniform_weighting():
    T, tau = 1.0, 0.1
    nl = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 9.0]]])
    sims = torch.tensor([[0.9, 0.5, 0.99]])
    positive = torch.tensor([[True, True, False]])  # the most similar entry is a negative: ignored
    fallback = torch.zeros(1, 3)
    a = np_softmax(np.array([0.9, 0.5]) / tau)
    z = nl[0, :2].numpy()
    sim = aggregate_positive_targets(nl, sims, positive, fallback, T, tau, "similarity", "logits")
    uni = aggregate_positive_targets(nl, sims, positive, fallback, T, tau, "uniform", "logits")
    np.testing.assert_allclose(sim[0].numpy(), np_softmax((a[:, None] * z).sum(0) / T), rtol=1e-5)
    np.testing.assert_allclose(uni[0].numpy(), np_softmax(z.mean(0) / T), rtol=1e-5)
    assert sim[0, 0] > sim[0, 1]  # the closer neighbour dominates
    assert uni[0, 0].item() == pytest.approx(uni[0, 1].item())
    # a larger tau_r flattens the similarity weights towards uniform
    flat = aggregate_positive_targets(nl, sims, positive, fallback, T, 100.0, "similarity", "logits")
    torch.testing.assert_close(flat, uni, atol=1e-2, rtol=0)


def test_aggregating_probabilities_differs_from_aggregating_logits():
    T = 1.0
    nl = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]])
    positive = torch.ones(1, 2, dtype=torch.bool)
    args = (nl, torch.zeros(1, 2), positive, torch.zeros(1, 3), T, 0.1, "uniform")
    by_logits = aggregate_positive_targets(*args, aggregate="logits")[0].numpy()
    by_probs = aggregate_positive_targets(*args, aggregate="probs")[0].numpy()
    np.testing.assert_allclose(by_logits, np_softmax(np.array([5.0, 5.0, 0.0]) / T), rtol=1e-5)
    expected = 0.5 * (np_softmax(np.array([10.0, 0, 0]) / T) + np_softmax(np.array([0, 10.0, 0]) / T))
    np.testing.assert_allclose(by_probs, expected, rtol=1e-5)
    # Both are distributions. Averaging logits is a normalised geometric mean of the softmaxes: it
    # puts ~exp(-5) mass on class 2, seen by neither neighbour; the mixture puts only ~exp(-10) there.
    assert by_logits.sum() == pytest.approx(1.0) and by_probs.sum() == pytest.approx(1.0)
    assert by_probs[2] < by_logits[2]
    # identical positives: the two rules coincide
    same = nl[:, :1].expand(1, 2, 3)
    a = aggregate_positive_targets(same, torch.zeros(1, 2), positive, torch.zeros(1, 3), 3.0, aggregate="logits")
    b = aggregate_positive_targets(same, torch.zeros(1, 2), positive, torch.zeros(1, 3), 3.0, aggregate="probs")
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------ NICD
def test_nicd_contrastive_matches_hand_computation():
    T, kappa = 2.0, 0.5
    s = torch.tensor([[1.0, 0.0, -1.0]])
    pbar = torch.softmax(torch.tensor([[2.0, 0.0, 0.0]]) / T, dim=1)
    nl = torch.tensor([[[0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]])
    negative = torch.tensor([[True, True, False]])

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    ps = np_softmax(s[0].numpy() / T)
    pos = cos(ps, pbar[0].numpy()) / kappa
    negs = [cos(ps, np_softmax(nl[0, j].numpy() / T)) / kappa for j in (0, 1)]
    expected = -pos + math.log(math.exp(pos) + sum(math.exp(v) for v in negs))
    got = nicd_loss(s, pbar, nl, negative, T, kappa)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_nicd_penalty_matches_hand_computation():
    T, tau = 1.0, 0.1
    s = torch.tensor([[1.0, 0.0, -1.0]])
    nl = torch.tensor([[[0.0, 3.0, 0.0], [0.0, 0.0, 3.0]]])
    sims = torch.tensor([[0.8, 0.6]])
    negative = torch.ones(1, 2, dtype=torch.bool)
    ps = np_softmax(s[0].numpy() / T)
    inner = np.array([ps @ np_softmax(nl[0, j].numpy() / T) for j in range(2)])
    b = np_softmax(sims[0].numpy() / tau)
    args = (s, torch.zeros(1, 3), nl, negative, T)
    got = nicd_loss(*args, form="penalty", neighbour_sims=sims, tau_r=tau)
    assert got.item() == pytest.approx(float((b * inner).sum()), rel=1e-5)
    got_u = nicd_loss(*args, form="penalty", weighting="uniform")
    assert got_u.item() == pytest.approx(float(inner.mean()), rel=1e-5)


def test_nicd_pushes_student_away_from_negatives():
    T = 4.0
    pbar = torch.softmax(torch.tensor([[5.0, 0.0, 0.0, 0.0]]) / T, dim=1)
    nl = torch.tensor([[[0.0, 5.0, 0.0, 0.0]]])
    negative = torch.ones(1, 1, dtype=torch.bool)
    for form in ("contrastive", "penalty"):
        near_target = nicd_loss(torch.tensor([[5.0, 0, 0, 0]]), pbar, nl, negative, T, form=form, weighting="uniform")
        near_negative = nicd_loss(torch.tensor([[0, 5.0, 0, 0]]), pbar, nl, negative, T, form=form, weighting="uniform")
        assert near_negative > near_target, form


@pytest.mark.parametrize("form", ["contrastive", "penalty"])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_nicd_finite_and_bounded_with_finite_gradients_at_extreme_logits(form, T):
    B, K, C, kappa = 16, 8, 10, 0.1
    s = (torch.sign(rand(B, C)) * 1e4).requires_grad_()
    nl = torch.sign(rand(B, K, C, seed=1)) * 1e4
    negative = torch.rand(B, K, generator=torch.Generator().manual_seed(2)) > 0.3
    pbar = aggregate_positive_targets(nl, rand(B, K, seed=3), ~negative, torch.sign(rand(B, C, seed=4)) * 1e4, T)
    value = nicd_loss(s, pbar, nl, negative, T, kappa, form, neighbour_sims=rand(B, K, seed=5))
    (grad,) = torch.autograd.grad(value, s)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    upper = nicd_contrastive_bound(K, kappa) if form == "contrastive" else 1.0
    assert 0.0 <= value.item() <= upper
    # the worst case reaches close to the bound: student identical to every negative, far from pbar
    if form == "contrastive":
        s2 = torch.tensor([[1e4, -1e4, -1e4]])
        worst = nicd_loss(s2, torch.tensor([[0.0, 1.0, 0.0]]), s2.expand(1, 3).unsqueeze(1).repeat(1, 4, 1),
                          torch.ones(1, 4, dtype=torch.bool), T, kappa)
        assert worst.item() == pytest.approx(nicd_contrastive_bound(4, kappa), rel=1e-4)


@pytest.mark.parametrize("form", ["contrastive", "penalty"])
def test_nicd_is_zero_without_negatives(form):
    B, K, C = 4, 6, 5
    s = rand(B, C).requires_grad_()
    nl = rand(B, K, C, seed=1)
    pbar = torch.softmax(rand(B, C, seed=2), dim=1)
    value = nicd_loss(s, pbar, nl, torch.zeros(B, K, dtype=torch.bool), 4.0, form=form, neighbour_sims=rand(B, K))
    assert value.item() == 0.0
    (grad,) = torch.autograd.grad(value, s)
    assert (grad == 0).all()
    # rows without negatives count as 0 in the batch mean
    negative = torch.zeros(B, K, dtype=torch.bool)
    negative[0, :2] = True
    whole = nicd_loss(s, pbar, nl, negative, 4.0, form=form, neighbour_sims=rand(B, K))
    first = nicd_loss(s[:1], pbar[:1], nl[:1], negative[:1], 4.0, form=form, neighbour_sims=rand(B, K)[:1])
    assert whole.item() == pytest.approx(first.item() / B, rel=1e-5)


# ------------------------------------------------------------------------------------ gradient flow
def test_gradients_reach_only_the_student_logits():
    B, K, C, T, y = 4, 5, 6, 4.0, torch.tensor([0, 1, 2, 3])
    s = rand(B, C).requires_grad_()
    t = rand(B, C, seed=1).requires_grad_()
    nl = rand(B, K, C, seed=2).requires_grad_()
    sims = rand(B, K, seed=3).requires_grad_()
    positive = torch.rand(B, K, generator=torch.Generator().manual_seed(4)) > 0.5
    pbar = aggregate_positive_targets(nl, sims, positive, t, T)
    assert not pbar.requires_grad
    pbar_leaf = pbar.clone().requires_grad_()
    total = (
        kd_loss(s, t, T)
        + dkd_loss(s, t, y, 1.0, 8.0, T)
        + picd_loss(s, pbar_leaf, T)
        + nicd_loss(s, pbar_leaf, nl, ~positive, T)
        + nicd_loss(s, pbar_leaf, nl, ~positive, T, form="penalty", neighbour_sims=sims)
    )
    total.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    for other in (t, nl, sims, pbar_leaf):
        assert other.grad is None


# ------------------------------------------------------------------------------------ errors
def test_loss_config_errors():
    s, t = rand(2, 3), rand(2, 3, seed=1)
    nl, m = rand(2, 2, 3), torch.ones(2, 2, dtype=torch.bool)
    cases = [
        (lambda: kd_loss(s, t, 0.0), "distill.temperature=0.0 must be positive"),
        (lambda: dkd_loss(s, t, torch.tensor([0, 1]), -1.0, 8.0, 4.0), "must be non-negative"),
        (lambda: aggregate_positive_targets(nl, rand(2, 2), m, t, 4.0, weighting="knn"), "distill.picd_weighting='knn'"),
        (lambda: aggregate_positive_targets(nl, rand(2, 2), m, t, 4.0, aggregate="mean"), "distill.picd_aggregate='mean'"),
        (lambda: aggregate_positive_targets(nl, rand(2, 2), m, t, 4.0, tau_r=0.0), "distill.tau_r=0.0"),
        (lambda: nicd_loss(s, torch.softmax(t, 1), nl, m, 4.0, form="kl"), "choose one of: contrastive, penalty"),
        (lambda: nicd_loss(s, torch.softmax(t, 1), nl, m, 4.0, kappa=0.0), "distill.kappa=0.0"),
        (lambda: nicd_loss(s, torch.softmax(t, 1), nl, m, 4.0, form="penalty"), "pass neighbour_sims or set distill.nicd_weighting=uniform"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as info:
            call()
        assert message in str(info.value), str(info.value)
