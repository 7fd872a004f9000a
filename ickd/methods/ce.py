"""Cross-entropy on the labels only: the student trained alone (and the teacher stage)."""
from __future__ import annotations

import torch.nn.functional as F

from ickd.methods.base import Method, StepOutputs
from ickd.methods.registry import METHODS


@METHODS.register("ce")
class CrossEntropy(Method):
    needs_teacher = False

    def forward(self, out: StepOutputs):
        return {"ce": float(self.cfg["ce_weight"]) * F.cross_entropy(out.student_logits.float(), out.labels)}
