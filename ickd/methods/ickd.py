"""IC-KD (Zhu, Li, Wang 2025; docs/method.md): CE + KD + PICD (pull the student towards the aggregated
teacher outputs of same-class neighbours) + NICD (push it from different-class neighbours), with the
neighbours retrieved from a memory bank of teacher features.

``incontext`` is the PICD + NICD part alone, a term to add to another method (``distill=dkd+ickd``,
``crd+ickd``, ``kd+picd``: ickd/methods/composite.py).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ickd import fastpath
from ickd.losses import aggregate_positive_targets, aggregate_positive_targets_at, kd_loss, nicd_loss, picd_loss
from ickd.losses.fused import incontext_losses
from ickd.losses.incontext import neighbour_weights
from ickd.methods.base import Method, MethodContext, StepOutputs, require_positive
from ickd.methods.registry import METHODS


@METHODS.register("incontext")
class InContext(Method):
    """PICD + NICD over the retrieved neighbours (keys ``picd`` and, with ``nicd_weight > 0``, ``nicd``)."""

    needs_bank = True

    def __init__(self, cfg: Mapping[str, Any], context: MethodContext | None = None) -> None:
        super().__init__(cfg, context)
        require_positive(self.cfg, "nicd_temperature")

    def nicd_temperature(self) -> float:
        """T_n of NICD (``distill.nicd_temperature``); null means the KD temperature T."""
        value = self.cfg["nicd_temperature"]
        return float(self.cfg["temperature"]) if value is None else float(value)

    def _log_probs(self, out: StepOutputs, with_ce: bool) -> tuple[dict[float, torch.Tensor], bool]:
        """The student's shared log-softmaxes (``shared_softmax``: CE's 1, KD/PICD's T, NICD's T_n
        unless the fused node computes it) and whether the fused PICD/NICD node is used."""
        T, t_n = float(self.cfg["temperature"]), self.nicd_temperature()
        use_nicd = float(self.cfg["nicd_weight"]) > 0
        # ``fused_incontext``: PICD and NICD as one autograd node with a closed-form backward
        # (ickd/losses/fused.py); it takes the student's log-softmax at T and computes NICD's
        # probabilities at T_n itself.
        fused = fastpath.enabled("fused_incontext") and fastpath.enabled("shared_softmax")
        lp: dict[float, torch.Tensor] = {}
        if fastpath.enabled("shared_softmax"):
            temps = ((1.0,) if with_ce else ()) + (T,) + ((t_n,) if use_nicd and not fused else ())
            for t in dict.fromkeys(temps):
                lp[t] = out.student_log_probs(t)
        return lp, fused

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        lp, fused = self._log_probs(out, with_ce=False)
        return self.incontext_terms(out, lp, fused)

    def incontext_terms(self, out: StepOutputs, lp: dict[float, torch.Tensor], fused: bool) -> dict[str, torch.Tensor]:
        c = self.cfg
        T = float(c["temperature"])
        t_n = self.nicd_temperature()
        use_nicd = float(c["nicd_weight"]) > 0
        student_logits, teacher_logits, neighbours = out.student_logits, out.teacher_logits, out.neighbours
        assert neighbours is not None, "IC-KD needs retrieved neighbours"
        losses: dict[str, torch.Tensor] = {}
        factor = self.ramp_factor(out.epoch, student_logits)
        nb_logits = neighbours.logits.float()  # fp32 bank logits; never round them to the student's bf16
        temps = (T, t_n) if use_nicd and t_n != T and (lp or fused) else (T,)
        targets = aggregate_positive_targets_at(
            nb_logits, neighbours.sims, neighbours.positive, teacher_logits, temps, tau_r=float(c["tau_r"]),
            weighting=str(c["picd_weighting"]), aggregate=str(c["picd_aggregate"]), masked_rows_may_be_nan=fused,
        )
        target = targets[0]
        if fused:
            nicd_target = targets[-1] if use_nicd else target
            form = str(c["nicd_form"]) if use_nicd else None
            weights = None
            if form == "penalty":
                weights = neighbour_weights(neighbours.negative, neighbours.sims, float(c["tau_r"]),
                                            str(c["nicd_weighting"]), "distill.nicd_weighting")
            elif form is not None:
                require_positive(c, "kappa")
            picd, nicd = incontext_losses(out.student_z(), lp[T], target, nicd_target, nb_logits, neighbours.not_negative,
                                          T, t_n, float(c["kappa"]), form, weights)
            losses["picd"] = self.ramped(factor, float(c["picd_weight"]), picd)
            if use_nicd:
                losses["nicd"] = self.ramped(factor, float(c["nicd_weight"]), nicd)
            return losses
        losses["picd"] = self.ramped(factor, float(c["picd_weight"]), picd_loss(student_logits, target, T, student_log_probs=lp.get(T)))
        if use_nicd:
            negative = neighbours.valid & ~neighbours.positive
            # NICD has its own temperature: at the KD temperature (T = 4) the softened distributions
            # all look alike under cosine and the term is inert (docs/method.md, "NICD temperature").
            if t_n == T:
                nicd_target = target
            elif len(targets) > 1:
                nicd_target = targets[1]
            else:
                nicd_target = aggregate_positive_targets(
                    nb_logits, neighbours.sims, neighbours.positive, teacher_logits, t_n, tau_r=float(c["tau_r"]),
                    weighting=str(c["picd_weighting"]), aggregate=str(c["picd_aggregate"]),
                )
            losses["nicd"] = self.ramped(factor, float(c["nicd_weight"]), nicd_loss(
                student_logits, nicd_target, nb_logits, negative, t_n, kappa=float(c["kappa"]), form=str(c["nicd_form"]),
                neighbour_sims=neighbours.sims, tau_r=float(c["tau_r"]), weighting=str(c["nicd_weighting"]),
                student_log_probs=lp.get(t_n),
            ))
        return losses


@METHODS.register("ickd")
class ICKD(InContext):
    """IC-KD: CE + KD + PICD + NICD."""

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        c = self.cfg
        T = float(c["temperature"])
        # CE, KD, PICD values are bit-identical with and without the shared log-softmax; NICD's
        # p_s = exp(log p_s) equals softmax within float rounding (tests/test_opcount.py).
        lp, fused = self._log_probs(out, with_ce=True)
        if lp:
            ce = F.nll_loss(lp[1.0], out.labels)  # = F.cross_entropy(z, labels), bit for bit
        else:
            ce = F.cross_entropy(out.student_z(), out.labels)
        losses = {"ce": float(c["ce_weight"]) * ce}
        if float(c["kd_weight"]) > 0:
            losses["kd"] = float(c["kd_weight"]) * kd_loss(out.student_logits, out.teacher_logits, T, student_log_probs=lp.get(T))
        losses.update(self.incontext_terms(out, lp, fused))
        return losses
