"""Classic distillation losses: vanilla KD (Hinton et al. 2015) and Decoupled KD (Zhao et al. 2022).

All functions take logits, return a scalar (batch mean), detach the teacher side themselves and do
no host synchronisation (safe inside a captured CUDA graph).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ickd.errors import ConfigError

__all__ = ["kd_loss", "dkd_loss", "check_temperature", "student_log_probs"]


def check_temperature(temperature: float, key: str = "distill.temperature") -> None:
    if not temperature > 0 or temperature != temperature:
        raise ConfigError(f"{key}={temperature!r} must be positive; the usual range is 1 to 8 (default 4)")


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p || q) from log-probabilities; 0 * log 0 counts as 0."""
    p = log_p.exp()
    terms = p * (log_p - log_q)
    # Where p underflows to 0 the term is 0 even if log_p - log_q is -inf + inf.
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


def student_log_probs(student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(z_s / T)`` in fp32: computed once per step and shared by KD, PICD and NICD
    (the ``student_log_probs`` argument of :func:`kd_loss` and ``picd_loss``)."""
    return F.log_softmax(student_logits.float() / float(temperature), dim=1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *,
            student_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(p_T(z_t) || p_T(z_s))``, mean over the batch. ``student_log_probs``: the same
    ``log_softmax(z_s / T)`` already computed (shared with other terms; identical values)."""
    check_temperature(temperature)
    t = float(temperature)
    log_ps = F.log_softmax(student_logits.float() / t, dim=1) if student_log_probs is None else student_log_probs
    log_pt = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return _kl_from_log_probs(log_pt, log_ps).mean() * (t * t)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD``, each ``T^2``-scaled, mean over the batch.

    TCKD = KL(b_t || b_s) with binary distributions b = [p_y, 1 - p_y] (target vs all non-target);
    NCKD = KL(q_t || q_s) with q = softmax over the non-target classes only, all at temperature T.
    Computed in log space (``log(1 - p_y)`` as a logsumexp over non-target log-probabilities) so it
    stays finite for confident logits.
    """
    check_temperature(temperature)
    if alpha < 0 or beta < 0:
        raise ConfigError(
            f"distill.alpha={alpha} and distill.beta={beta} must be non-negative (DKD defaults 1.0 and 8.0)"
        )
    t = float(temperature)
    zs = student_logits.float() / t
    zt = teacher_logits.detach().float() / t
    gt = F.one_hot(target.detach().long(), zs.shape[1]).bool()

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(z, dim=1)
        log_target = log_p.masked_fill(~gt, float("-inf")).logsumexp(dim=1)
        log_other = log_p.masked_fill(gt, float("-inf")).logsumexp(dim=1)
        return torch.stack([log_target, log_other], dim=1)

    tckd = _kl_from_log_probs(binary_log_probs(zt), binary_log_probs(zs))

    # Non-target distribution: softmax with the target class removed. A masked -inf gives log 0 = -inf
    # for the target column, whose KL term _kl_from_log_probs drops (p = 0).
    log_qs = F.log_softmax(zs.masked_fill(gt, float("-inf")), dim=1)
    log_qt = F.log_softmax(zt.masked_fill(gt, float("-inf")), dim=1)
    nckd = _kl_from_log_probs(log_qt, log_qs.masked_fill(gt, 0.0))
    return (alpha * tckd.mean() + beta * nckd.mean()) * (t * t)
