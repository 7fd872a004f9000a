"""Decoupled KD (Zhao et al. 2022), with the linear warm-up of the DKD term of the published recipe."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ickd.losses import dkd_loss
from ickd.methods.base import Method, StepOutputs
from ickd.methods.registry import METHODS


@METHODS.register("dkd")
class DKD(Method):
    def forward(self, out: StepOutputs):
        c = self.cfg
        factor = self.ramp_factor(out.epoch, out.student_logits)
        loss = dkd_loss(out.student_logits, out.teacher_logits, out.labels, float(c["alpha"]), float(c["beta"]),
                        float(c["temperature"]))
        return {
            "ce": float(c["ce_weight"]) * F.cross_entropy(out.student_logits.float(), out.labels),
            "dkd": loss * factor if isinstance(factor, torch.Tensor) else factor * loss,
        }
