"""In-context distillation losses: PICD target aggregation, PICD and NICD (docs/method.md).

Shapes: B queries, K retrieved neighbours, C classes. Everything that is not the student's logits
is detached inside these functions, so gradients reach only ``student_logits``. No host
synchronisation (no ``.item()``, no boolean indexing): safe inside a captured CUDA graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ickd.errors import ConfigError
from ickd.losses.kd import check_temperature

__all__ = [
    "WEIGHTINGS",
    "AGGREGATES",
    "NICD_FORMS",
    "aggregate_positive_targets",
    "aggregate_positive_targets_at",
    "picd_loss",
    "nicd_loss",
    "neighbour_weights",
    "nicd_contrastive_bound",
]

WEIGHTINGS = ("similarity", "uniform")
AGGREGATES = ("logits", "probs")
NICD_FORMS = ("contrastive", "penalty")


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _check_positive(value: float, key: str, default: str) -> None:
    if not value > 0 or value != value or math.isinf(value):
        raise ConfigError(f"{key}={value!r} must be a positive finite number (default {default})")


def neighbour_weights(
    mask: torch.Tensor,
    sims: torch.Tensor | None,
    tau_r: float,
    weighting: str,
    key: str = "distill.picd_weighting",
) -> torch.Tensor:
    """(B, K) weights over the neighbours selected by ``mask``; rows sum to 1, or 0 if none selected.

    ``similarity``: softmax over the selected j of ``s_ij / tau_r``; ``uniform``: ``1 / |selected|``.
    """
    _check_choice(weighting, WEIGHTINGS, key)
    mask = mask.detach().bool()
    if weighting == "uniform":
        w = mask.float()
        return w / w.sum(dim=1, keepdim=True).clamp(min=1.0)
    if sims is None:
        raise ConfigError(
            f"{key}=similarity needs the neighbour similarities; pass neighbour_sims or set {key}=uniform"
        )
    _check_positive(tau_r, "distill.tau_r", "0.1")
    scores = sims.detach().float() / tau_r
    # A row with nothing selected would be softmax of all -inf (NaN); give it zeros instead.
    any_sel = mask.any(dim=1, keepdim=True)
    scores = torch.where(mask, scores, torch.full_like(scores, float("-inf")))
    scores = torch.where(any_sel, scores, torch.zeros_like(scores))
    return torch.softmax(scores, dim=1) * mask


def aggregate_positive_targets(
    neighbour_logits: torch.Tensor,
    neighbour_sims: torch.Tensor,
    positive: torch.Tensor,
    fallback_logits: torch.Tensor,
    temperature: float,
    tau_r: float = 0.1,
    weighting: str = "similarity",
    aggregate: str = "logits",
) -> torch.Tensor:
    """PICD target ``pbar_i`` (B, C): probabilities at temperature T, detached.

    ``aggregate="logits"``: ``softmax(sum_j a_ij z_j / T)``; ``"probs"``: ``sum_j a_ij softmax(z_j / T)``,
    with ``a_ij`` from :func:`neighbour_weights` over the positives. Rows without positives use
    ``softmax(fallback_logits / T)`` (the sample's own teacher output), so PICD equals KD there.
    """
    return aggregate_positive_targets_at(
        neighbour_logits, neighbour_sims, positive, fallback_logits, (temperature,), tau_r, weighting, aggregate
    )[0]


def aggregate_positive_targets_at(
    neighbour_logits: torch.Tensor,
    neighbour_sims: torch.Tensor,
    positive: torch.Tensor,
    fallback_logits: torch.Tensor,
    temperatures: tuple[float, ...],
    tau_r: float = 0.1,
    weighting: str = "similarity",
    aggregate: str = "logits",
    masked_rows_may_be_nan: bool = False,
) -> list[torch.Tensor]:
    """:func:`aggregate_positive_targets` at several temperatures (PICD's T and NICD's T_n) with the
    neighbour weights, the aggregated logits and the has-positive mask computed once; each target
    is bit-identical to a separate call. ``masked_rows_may_be_nan``: compute the similarity weights
    with fewer ops, letting rows without positives pass through NaN before their fallback
    (the returned targets are the same, bit for bit)."""
    for t in temperatures:
        check_temperature(t)
    _check_choice(aggregate, AGGREGATES, "distill.picd_aggregate")
    z = neighbour_logits.detach().float()
    if masked_rows_may_be_nan and weighting == "similarity":
        # Rows without a positive become NaN here (softmax of all -inf) and are replaced by the
        # fallback below; the other rows are bit-identical to neighbour_weights' (4 ops, not 8).
        _check_positive(tau_r, "distill.tau_r", "0.1")
        a = torch.softmax((neighbour_sims.detach().float() / tau_r).masked_fill(~positive.detach().bool(), float("-inf")), dim=1)
    else:
        a = neighbour_weights(positive, neighbour_sims, tau_r, weighting, "distill.picd_weighting")
    zbar = torch.einsum("bk,bkc->bc", a, z) if aggregate == "logits" else None
    fallback_z = fallback_logits.detach().float()
    has_pos = positive.detach().bool().any(dim=1, keepdim=True)
    targets = []
    for temperature in temperatures:
        t = float(temperature)
        if zbar is not None:
            target = torch.softmax(zbar / t, dim=1)
        else:
            target = torch.einsum("bk,bkc->bc", a, torch.softmax(z / t, dim=2))
        fallback = torch.softmax(fallback_z / t, dim=1)
        targets.append(torch.where(has_pos, target, fallback).detach())
    return targets


def picd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float, *,
              student_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(pbar || p_T(z_s))``, mean over the batch (``pbar`` from aggregate_positive_targets).
    ``student_log_probs``: ``log_softmax(z_s / T)`` already computed (shared with KD; identical values)."""
    check_temperature(temperature)
    t = float(temperature)
    p = target_probs.detach().float()
    log_ps = F.log_softmax(student_logits.float() / t, dim=1) if student_log_probs is None else student_log_probs
    # xlogy gives 0 * log 0 = 0 for classes the target assigns no mass.
    kl = (torch.special.xlogy(p, p) - p * log_ps).sum(dim=1)
    return kl.mean() * (t * t)


def nicd_contrastive_bound(num_negatives: int, kappa: float) -> float:
    """Upper bound of the contrastive NICD per sample: ``log(1 + K_neg * exp(1 / kappa))``.

    Cosine similarities of probability vectors lie in [0, 1], so each term
    ``log(1 + sum_j exp((s_j - s_pos) / kappa))`` is in ``[0, log(1 + |N_i| e^{1/kappa})]``.
    """
    return math.log1p(num_negatives * math.exp(1.0 / kappa))


def nicd_loss(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    neighbour_logits: torch.Tensor,
    negative: torch.Tensor,
    temperature: float,
    kappa: float = 0.1,
    form: str = "contrastive",
    neighbour_sims: torch.Tensor | None = None,
    tau_r: float = 0.1,
    weighting: str = "similarity",
    *,
    student_log_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative in-context distillation (bounded), mean over the whole batch.

    ``contrastive``: ``-log(e^{c(p_s, pbar)/kappa} / (e^{c(p_s, pbar)/kappa} + sum_{j in N_i}
    e^{c(p_s, p_j)/kappa}))`` with ``c`` the cosine of probability vectors at temperature T;
    per sample in ``[0, log(1 + |N_i| e^{1/kappa})]``. ``weighting``/``neighbour_sims`` are unused.
    ``penalty``: ``sum_{j in N_i} b_ij <p_s, p_j>`` with ``b`` from :func:`neighbour_weights` over the
    negatives; in ``[0, 1]``. Samples without negatives contribute 0 in both forms (and still count
    in the batch mean, so the loss scale does not jump when few rows have negatives).
    ``student_log_probs``: ``log_softmax(z_s / T)`` already computed (shared with KD and PICD); the
    student's probabilities are then its ``exp`` (equal to the softmax within float rounding).
    """
    check_temperature(temperature)
    _check_choice(form, NICD_FORMS, "distill.nicd_form")
    t = float(temperature)
    neg = negative.detach().bool()
    p_s = torch.softmax(student_logits.float() / t, dim=1) if student_log_probs is None else student_log_probs.exp()
    p_j = torch.softmax(neighbour_logits.detach().float() / t, dim=2)
    if form == "penalty":
        b = neighbour_weights(neg, neighbour_sims, tau_r, weighting, "distill.nicd_weighting")
        inner = torch.einsum("bc,bkc->bk", p_s, p_j)
        return (b * inner).sum(dim=1).mean()

    _check_positive(kappa, "distill.kappa", "0.1")
    # ||p||_2 >= 1/sqrt(C) for a probability vector, so normalising never divides by ~0.
    u_s = F.normalize(p_s, dim=1)
    u_bar = F.normalize(target_probs.detach().float(), dim=1)
    u_j = F.normalize(p_j, dim=2)
    pos = (u_s * u_bar).sum(dim=1, keepdim=True) / kappa  # (B, 1)
    negs = torch.einsum("bc,bkc->bk", u_s, u_j) / kappa  # (B, K)
    negs = negs.masked_fill(~neg, float("-inf"))
    logits = torch.cat([pos, negs], dim=1)
    # -log softmax of the positive column; rows without negatives give exactly 0.
    per_sample = torch.logsumexp(logits, dim=1) - pos.squeeze(1)
    return per_sample.mean()
