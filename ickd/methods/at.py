"""Attention Transfer (Zagoruyko & Komodakis 2017): CE + the distance between the student's and the
teacher's normalised spatial attention maps at every stage. CIFAR-100 recipe of mdistiller: the stage
outputs after the stem (``stages[1:]``), p = 2, weight 1000, CE 1.0."""
from __future__ import annotations

import torch.nn.functional as F

from ickd.losses.feature import at_loss
from ickd.methods.base import Method, StepOutputs
from ickd.methods.registry import METHODS


@METHODS.register("at")
class AT(Method):
    needs_features = ("stages",)

    def forward(self, out: StepOutputs):
        c = self.cfg
        s = [f.float() for f in out.student_features["stages"][1:]]
        t = [f.float() for f in out.teacher_features["stages"][1:]]
        return {
            "ce": float(c["ce_weight"]) * F.cross_entropy(out.student_logits.float(), out.labels),
            "at": float(c["feat_weight"]) * at_loss(s, t, p=float(c["p"])),
        }
