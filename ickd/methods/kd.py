"""Hinton et al. 2015: CE + T^2 KL(p_T(teacher) || p_T(student))."""
from __future__ import annotations

import torch.nn.functional as F

from ickd.losses import kd_loss
from ickd.methods.base import Method, StepOutputs
from ickd.methods.registry import METHODS


@METHODS.register("kd")
class KD(Method):
    def forward(self, out: StepOutputs):
        c = self.cfg
        return {
            "ce": float(c["ce_weight"]) * F.cross_entropy(out.student_logits.float(), out.labels),
            "kd": float(c["kd_weight"]) * kd_loss(out.student_logits, out.teacher_logits, float(c["temperature"])),
        }


@METHODS.register("kd_matched")
class KDMatched(KD):
    """KD at IC-KD's total distillation weight (kd + picd + nicd): the baseline that tells an
    in-context effect from a larger distillation weight. Same loss as ``kd``, its own name so
    reports never mistake it for the recipe KD."""
