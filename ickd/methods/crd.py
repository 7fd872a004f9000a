"""Contrastive Representation Distillation (Tian et al. 2020): CE + an NCE loss between trainable
embeddings of the student's and the teacher's pooled features, with negatives drawn from momentum
memories of every training sample's embeddings. CIFAR-100 recipe of mdistiller: embedding 128,
16,384 negatives, NCE temperature 0.07, memory momentum 0.5, weight 0.8, CE 1.0, no KD term.

The sample memory is CRD's own (``ickd.losses.feature.ContrastMemory``: two momentum-updated
embedding tables with negative sampling, in ``state_dict``), not the IC-KD ``MemoryBank``: CRD never
retrieves neighbours, and its entries are embeddings of heads that train, so the bank's slot policy
and search backends do not apply (docs/design.md, "Methods").
"""
from __future__ import annotations

import torch.nn.functional as F

from ickd.errors import ConfigError
from ickd.losses.feature import CRDLoss
from ickd.methods.base import Method, MethodContext, StepOutputs
from ickd.methods.registry import METHODS


@METHODS.register("crd")
class CRD(Method):
    def __init__(self, cfg, context: MethodContext | None = None) -> None:
        super().__init__(cfg, context)
        if context is None:
            raise ConfigError("distill=crd builds embeddings from the networks' feature sizes; build it through the distiller")
        c = self.cfg
        n, nce_k = int(context.num_train), int(c["nce_k"])
        if nce_k >= n:
            raise ConfigError(f"distill.nce_k={nce_k} negatives need a training set of more than {nce_k} samples "
                              f"(this one has {n}); lower distill.nce_k (e.g. {max(1, n // 4)})")
        s_dim = context.feature_shapes("student")["pooled"][0]
        t_dim = context.feature_shapes("teacher")["pooled"][0]
        self.crd = CRDLoss(s_dim, t_dim, n, feat_dim=int(c["feat_dim"]), nce_k=nce_k, nce_t=float(c["nce_t"]),
                           momentum=float(c["nce_momentum"]))

    def forward(self, out: StepOutputs):
        c = self.cfg
        loss = self.crd(out.student_features["pooled"].float(), out.teacher_features["pooled"].float(), out.indices)
        return {
            "ce": float(c["ce_weight"]) * F.cross_entropy(out.student_logits.float(), out.labels),
            "crd": float(c["feat_weight"]) * loss,
        }
