"""Loss recipes: what a student learns from a (teacher logits, neighbours) pair.

A method turns the student's logits, the "teacher" logits on the same batch (a frozen teacher, a
peer, or the student's own EMA) and, for IC-KD, the retrieved in-context neighbours into a dict of
*weighted* loss components; the total loss is their sum. Paradigms (see ``paradigms.py``) decide
where the teacher outputs and the memory bank come from, so every method works in every paradigm.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ickd.errors import ConfigError
from ickd.losses import aggregate_positive_targets, dkd_loss, kd_loss, nicd_loss, picd_loss
from ickd.memory import Neighbours
from ickd.registry import Registry

METHODS: Registry[type["LossMethod"]] = Registry("distill method")


def _require_non_negative(cfg: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        value = cfg.get(key)
        if value is not None and float(value) < 0:
            raise ConfigError(f"distill.{key}={value} is negative; loss weights and temperatures must be >= 0")


def _require_positive(cfg: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        value = cfg.get(key)
        if value is not None and float(value) <= 0:
            raise ConfigError(f"distill.{key}={value} must be > 0")


def ramp(epoch: int, warmup_epochs: float) -> float:
    """Linear warm-up factor for epoch ``epoch`` (0-based): 1/W, 2/W, ..., then 1."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / float(warmup_epochs))


class LossMethod:
    """Base class. Subclasses set ``needs_teacher`` / ``needs_bank`` and implement ``__call__``."""

    needs_teacher = True
    needs_bank = False

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = dict(cfg)
        _require_non_negative(self.cfg, "ce_weight", "kd_weight", "picd_weight", "nicd_weight", "alpha", "beta", "warmup_epochs")
        _require_positive(self.cfg, "temperature", "tau_r", "kappa")

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor,
        neighbours: Neighbours | None,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def warmup_factor(self, epoch: int) -> float:
        """The linear warm-up of the method's distillation terms (``distill.warmup_epochs``; 1 without)."""
        return ramp(epoch, float(self.cfg.get("warmup_epochs", 0)))

    def step_signature(self, epoch: int) -> Any:
        """Every Python value ``__call__`` derives from ``epoch`` (a captured step bakes them in)."""
        return self.warmup_factor(epoch)


@METHODS.register("ce")
class CrossEntropy(LossMethod):
    needs_teacher = False

    def __call__(self, student_logits, teacher_logits, labels, neighbours, epoch):
        return {"ce": float(self.cfg["ce_weight"]) * F.cross_entropy(student_logits.float(), labels)}


@METHODS.register("kd")
class KD(LossMethod):
    """Hinton et al. 2015: CE + T^2 KL(p_T(teacher) || p_T(student))."""

    def __call__(self, student_logits, teacher_logits, labels, neighbours, epoch):
        c = self.cfg
        return {
            "ce": float(c["ce_weight"]) * F.cross_entropy(student_logits.float(), labels),
            "kd": float(c["kd_weight"]) * kd_loss(student_logits, teacher_logits, float(c["temperature"])),
        }


@METHODS.register("kd_matched")
class KDMatched(KD):
    """KD at IC-KD's total distillation weight (kd + picd + nicd): the baseline that tells an
    in-context effect from a larger distillation weight. Same loss as ``kd``, its own name so
    reports never mistake it for the recipe KD."""


@METHODS.register("dkd")
class DKD(LossMethod):
    """Zhao et al. 2022, with the linear warm-up of the DKD term used by the published recipe."""

    def __call__(self, student_logits, teacher_logits, labels, neighbours, epoch):
        c = self.cfg
        factor = self.warmup_factor(epoch)
        loss = dkd_loss(student_logits, teacher_logits, labels, float(c["alpha"]), float(c["beta"]), float(c["temperature"]))
        return {"ce": float(c["ce_weight"]) * F.cross_entropy(student_logits.float(), labels), "dkd": factor * loss}


@METHODS.register("ickd")
class ICKD(LossMethod):
    """IC-KD: CE + KD + PICD (pull to aggregated same-class neighbours) + NICD (push from others)."""

    needs_bank = True

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        _require_positive(self.cfg, "nicd_temperature")

    def nicd_temperature(self) -> float:
        """T_n of NICD (``distill.nicd_temperature``); null means the KD temperature T."""
        value = self.cfg["nicd_temperature"]
        return float(self.cfg["temperature"]) if value is None else float(value)

    def __call__(self, student_logits, teacher_logits, labels, neighbours, epoch):
        c = self.cfg
        T = float(c["temperature"])
        losses = {"ce": float(c["ce_weight"]) * F.cross_entropy(student_logits.float(), labels)}
        if float(c["kd_weight"]) > 0:
            losses["kd"] = float(c["kd_weight"]) * kd_loss(student_logits, teacher_logits, T)
        assert neighbours is not None, "IC-KD needs retrieved neighbours"
        factor = self.warmup_factor(epoch)
        nb_logits = neighbours.logits.float()  # fp32 bank logits; never round them to the student's bf16
        target = aggregate_positive_targets(
            nb_logits,
            neighbours.sims,
            neighbours.positive,
            teacher_logits,
            T,
            tau_r=float(c["tau_r"]),
            weighting=str(c["picd_weighting"]),
            aggregate=str(c["picd_aggregate"]),
        )
        losses["picd"] = factor * float(c["picd_weight"]) * picd_loss(student_logits, target, T)
        if float(c["nicd_weight"]) > 0:
            negative = neighbours.valid & ~neighbours.positive
            # NICD has its own temperature: at the KD temperature (T = 4) the softened distributions
            # all look alike under cosine and the term is inert (docs/method.md, "NICD temperature").
            t_n = self.nicd_temperature()
            nicd_target = target if t_n == T else aggregate_positive_targets(
                nb_logits,
                neighbours.sims,
                neighbours.positive,
                teacher_logits,
                t_n,
                tau_r=float(c["tau_r"]),
                weighting=str(c["picd_weighting"]),
                aggregate=str(c["picd_aggregate"]),
            )
            losses["nicd"] = factor * float(c["nicd_weight"]) * nicd_loss(
                student_logits,
                nicd_target,
                nb_logits,
                negative,
                t_n,
                kappa=float(c["kappa"]),
                form=str(c["nicd_form"]),
                neighbour_sims=neighbours.sims,
                tau_r=float(c["tau_r"]),
                weighting=str(c["nicd_weighting"]),
            )
        return losses


def create_method(cfg: Mapping[str, Any]) -> LossMethod:
    return METHODS.get(str(cfg["name"]))(cfg)
