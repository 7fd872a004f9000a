"""ReviewKD (Chen et al. 2021): CE + a review path (attention-based fusion, deep to shallow) maps the
student's stage outputs onto the teacher's, compared by the hierarchical context loss at several
pooling levels. CIFAR-100 recipe of mdistiller: student ``stages[1:]`` + pooled, teacher ``preact[1:]``
+ pooled, weight 1.0 (5.0 in its ResNet32x4 -> ResNet8x4 config), linear warm-up over 20 epochs
(here ``min(1, (epoch + 1) / 20)``, the other methods' ramp), CE 1.0."""
from __future__ import annotations

import torch.nn.functional as F

from ickd.errors import ConfigError
from ickd.losses.feature import ReviewKDHead, hcl_loss
from ickd.methods.base import Method, MethodContext, StepOutputs
from ickd.methods.registry import METHODS


@METHODS.register("reviewkd")
class ReviewKD(Method):
    needs_features = ("stages", "preact")

    def __init__(self, cfg, context: MethodContext | None = None) -> None:
        super().__init__(cfg, context)
        if context is None:
            raise ConfigError("distill=reviewkd builds its review path from the networks' feature shapes; build it through the distiller")
        s, t = context.feature_shapes("student"), context.feature_shapes("teacher")
        s_levels = [shape[0] for shape in s["stages"][1:]] + [s["pooled"][0]]
        t_levels = [shape[0] for shape in t["preact"][1:]] + [t["pooled"][0]]
        if len(s_levels) != len(t_levels):
            raise ConfigError(f"distill=reviewkd pairs stages one to one, but the student has {len(s_levels) - 1} "
                              f"stages and the teacher {len(t_levels) - 1}; use networks of the same family")
        sizes = [shape[1:] for shape in t["preact"][1:]] + [(1, 1)]
        self.head = ReviewKDHead(s_levels, t_levels, out_sizes=sizes)

    def forward(self, out: StepOutputs):
        c = self.cfg
        student = [*out.student_features["stages"][1:], out.student_features["pooled"]]
        teacher = [*out.teacher_features["preact"][1:], out.teacher_features["pooled"]]
        reviewed = self.head([f.float() for f in student])
        factor = self.ramp_factor(out.epoch, out.student_logits)
        loss = hcl_loss(reviewed, [f.float() for f in teacher])
        return {
            "ce": float(c["ce_weight"]) * F.cross_entropy(out.student_logits.float(), out.labels),
            "reviewkd": self.ramped(factor, float(c["feat_weight"]), loss),
        }
