"""PICD and NICD as one autograd node with a hand-written backward (``ickd.fastpath`` switch
``fused_incontext``).

Autograd records every op of the plain loss functions (``incontext.py``) and replays a backward op
for most of them: about 55 extra backward kernels per IC-KD step on top of some 90 forward ones. The
in-context terms depend on the student only through its logits ``z`` (targets, neighbour
probabilities and weights are all detached), so their gradient with respect to ``z`` has a short
closed form (docs/method.md's losses, differentiated):

- PICD ``T^2 mean_b KL(pbar_b || softmax(z_b / T))``: ``dL/dz = T (softmax(z/T) - pbar) / B``.
- NICD contrastive, ``l = [c(u_s, u_bar), c(u_s, u_j)...] / kappa`` per row, loss ``mean_b
  (logsumexp(l_b) - l_b0)`` with unit vectors ``u = p / |p|`` of probabilities at ``T_n``:
  ``dL/du_s = ((q_0 - 1) u_bar + sum_j q_j u_j) / (kappa B)`` with ``q = softmax(l)``, then through
  the normalisation ``(g - <g, u_s> u_s) / |p_s|`` and the softmax ``p_s (g - <g, p_s>) / T_n``.
- NICD penalty ``mean_b sum_j b_bj <p_s, p_j>``: ``dL/dp_s = sum_j b_bj p_j / B``, then the softmax.

Values equal the plain functions' within fp32 rounding and gradients within rel 1e-5
(tests/test_opcount.py, plus a float64 ``gradcheck`` of this node). No host synchronisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _softmax_backward(p: torch.Tensor, grad_p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gradient w.r.t. ``z`` of ``p = softmax(z / T)`` (rows over the last dim)."""
    return p * (grad_p - (grad_p * p).sum(dim=-1, keepdim=True)) * (1.0 / temperature)


class InContextLosses(torch.autograd.Function):
    """``(picd, nicd) = InContextLosses.apply(z, log_p_t, target_t, target_n, nb_logits, not_negative,
    penalty_weights, T, T_n, kappa, form)``.

    ``z`` (B, C) fp32 student logits, the only input with a gradient. ``log_p_t``: ``log_softmax(z/T)``
    already computed for KD (detached here; PICD's value only). ``target_t`` / ``target_n``: PICD's
    target at T and T_n (B, C). ``nb_logits`` (B, K, C) fp32; ``not_negative`` (B, K) bool: True
    where a neighbour is not a negative (same class or invalid). ``penalty_weights`` (B, K) for
    ``form="penalty"`` (else None). ``form=None``: no NICD (its output is a zero).
    """

    @staticmethod
    def forward(ctx, z, log_p_t, target_t, target_n, nb_logits, not_negative, penalty_weights, T, T_n, kappa, form):
        b = z.shape[0]
        ctx.T, ctx.T_n, ctx.kappa, ctx.form, ctx.batch = T, T_n, kappa, form, b
        # PICD: T^2 * mean KL(pbar || p_T(z)); xlogy gives 0 * log 0 = 0.
        picd = (torch.special.xlogy(target_t, target_t) - target_t * log_p_t).sum() * (T * T / b)
        saved = [log_p_t, target_t]
        if form is None:
            nicd = picd.new_zeros(())
        else:
            p_s = torch.softmax(z / T_n, dim=1)
            p_j = torch.softmax(nb_logits / T_n, dim=2)
            if form == "penalty":
                inner = torch.bmm(p_j, p_s.unsqueeze(2)).squeeze(2)  # (B, K)
                nicd = (penalty_weights * inner).sum(dim=1).mean()
                saved += [p_s, p_j, penalty_weights]
            else:
                # |p| >= 1 / sqrt(C) for a probability vector: the normalisation never clamps, which
                # the backward's closed form assumes.
                u_s = F.normalize(p_s, dim=1)
                # The positive target as column 0 of the neighbours: one normalisation, one bmm.
                u_all = F.normalize(torch.cat([target_n.unsqueeze(1), p_j], dim=1), dim=2)  # (B, 1 + K, C)
                logits = torch.bmm(u_all, u_s.unsqueeze(2)).squeeze(2) / kappa
                logits[:, 1:].masked_fill_(not_negative, float("-inf"))
                lse = torch.logsumexp(logits, dim=1, keepdim=True)
                nicd = (lse - logits[:, :1]).mean()
                saved += [u_s, u_all, logits, lse]
        ctx.save_for_backward(*saved)
        return picd, nicd

    @staticmethod
    def backward(ctx, grad_picd, grad_nicd):
        log_p_t, target_t, *rest = ctx.saved_tensors
        T, b = ctx.T, ctx.batch
        # PICD: T (softmax(z/T) - pbar) / B, times the incoming scalar gradient.
        grad = (log_p_t.exp() - target_t) * (grad_picd * (T / b))
        if ctx.form == "penalty":
            p_s, p_j, weights = rest
            grad_p = torch.bmm(weights.unsqueeze(1), p_j).squeeze(1) * (grad_nicd / b)
            grad = grad + _softmax_backward(p_s, grad_p, ctx.T_n)
        elif ctx.form is not None:
            u_s, u_all, logits, lse = rest
            q = torch.exp(logits - lse)  # softmax over [positive, negatives]; masked columns are 0
            # g = dL/du_s up to the factor grad / (kappa B): sum_j q_j u_j + (q_0 - 1) u_bar.
            g = torch.bmm(q.unsqueeze(1), u_all).squeeze(1) - u_all[:, 0]
            # Through u = p / |p| and p = softmax(z / T_n): dL/dp = (g - <g, u> u) / |p|, and
            # dL/dz = p (dL/dp - <dL/dp, p>) / T_n. Since <g - <g, u> u, u> = 0 the inner product
            # vanishes and p / |p| = u, so dL/dz = u (g - <g, u> u) / T_n.
            m = u_s * g
            grad_z = m - m.sum(dim=1, keepdim=True) * (u_s * u_s)
            grad = grad + grad_z * (grad_nicd / (ctx.kappa * b * ctx.T_n))
        return grad, None, None, None, None, None, None, None, None, None, None


def incontext_losses(
    z: torch.Tensor,
    log_p_t: torch.Tensor,
    target_t: torch.Tensor,
    target_n: torch.Tensor,
    nb_logits: torch.Tensor,
    not_negative: torch.Tensor,
    temperature: float,
    nicd_temperature: float,
    kappa: float,
    form: str | None,
    penalty_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PICD and NICD (unweighted, batch means) through :class:`InContextLosses`."""
    return InContextLosses.apply(
        z, log_p_t.detach(), target_t.detach(), target_n.detach(), nb_logits.detach(), not_negative,
        None if penalty_weights is None else penalty_weights.detach(), float(temperature),
        float(nicd_temperature), float(kappa), form,
    )
