"""FitNet (Romero et al. 2015): CE + a regressor maps a student stage's feature map onto the teacher's
("hint"), MSE. CIFAR-100 recipe of mdistiller: hint = the 2nd stage's output (``stages[2]``), feature
weight 100, CE 1.0, no KD term."""
from __future__ import annotations

import torch.nn.functional as F

from ickd.errors import ConfigError
from ickd.losses.feature import ConvRegressor, fitnet_loss
from ickd.methods.base import Method, MethodContext, StepOutputs
from ickd.methods.registry import METHODS


@METHODS.register("fitnet")
class FitNet(Method):
    needs_features = ("stages",)

    def __init__(self, cfg, context: MethodContext | None = None) -> None:
        super().__init__(cfg, context)
        if context is None:
            raise ConfigError("distill=fitnet builds a regressor from the networks' feature shapes; build it through the distiller")
        self.hint = int(self.cfg["hint_layer"])
        s, t = context.feature_shapes("student")["stages"], context.feature_shapes("teacher")["stages"]
        if not 0 <= self.hint < min(len(s), len(t)):
            raise ConfigError(f"distill.hint_layer={self.hint} is not a stage index of both networks "
                              f"(student has {len(s)} stages, teacher {len(t)}; 0 is the stem)")
        self.regressor = ConvRegressor(s[self.hint][0], t[self.hint][0], s[self.hint][1:], t[self.hint][1:])

    def forward(self, out: StepOutputs):
        c = self.cfg
        hint = self.regressor(out.student_features["stages"][self.hint])
        return {
            "ce": float(c["ce_weight"]) * F.cross_entropy(out.student_logits.float(), out.labels),
            "fitnet": float(c["feat_weight"]) * fitnet_loss(hint.float(), out.teacher_features["stages"][self.hint].float()),
        }
