"""Turn the run's config into a ready :class:`Distiller`: the paradigm named by ``paradigm.name``
builds itself from its registry entry (``Distiller.build``) with a :class:`BuildContext`."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ickd.distill.context import (  # noqa: F401  (re-exported: the builders' public home)
    FEATURE_DTYPES,
    BuildContext,
    build_bank,
    build_net,
    build_teacher,
    resolve_checkpoint_path,
    retrieval_spec,
)
from ickd.distill.paradigms import PARADIGMS, Distiller, OfflineDistiller
from ickd.errors import ConfigError
from ickd.methods import create_method, method_class


def build_distiller(cfg: Mapping[str, Any], num_classes: int, in_channels: int, num_train: int, device: torch.device,
                    image_size: int = 32) -> Distiller:
    """Build the distiller of a run: the paradigm named by ``paradigm.name`` builds itself from its
    registry entry (``Distiller.build``). ``stage=teacher`` trains ``model`` (or the teacher
    architecture) with CE."""
    stage = str(cfg["stage"])
    if stage == "teacher":
        spec = cfg["model"] or cfg["teacher"]
        net = build_net(spec, num_classes, in_channels)
        method = create_method({"name": "ce", "ce_weight": 1.0})
        return OfflineDistiller(net, method, None, teacher=None, bank=None).to(device)
    if stage != "student":
        raise ConfigError(f"stage={stage!r} is not valid; use stage=student (distil a student) or stage=teacher (train a teacher with CE)")
    paradigm = str(cfg["paradigm"]["name"])
    cls = PARADIGMS.get(paradigm)  # clear error listing valid paradigms
    if method_class(cfg["distill"]).needs_bank and cls.source_trains and str(cfg["memory"]["update"]) == "frozen":
        # Online and teacher-free banks are filled during the first epoch by networks that are still
        # training: freezing them would keep near-random early outputs for the whole run.
        raise ConfigError(
            f"memory.update=frozen with paradigm={paradigm} would freeze the first epoch's outputs of a network "
            "that is still learning (near-random features and logits) for the whole run; use memory.update=overwrite "
            "or momentum, or paradigm=offline (a frozen pre-trained teacher) for a frozen bank"
        )
    context = BuildContext(cfg, num_classes, in_channels, num_train, torch.device(device), image_size)
    return cls.build(context).to(device)
