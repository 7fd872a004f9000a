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

from ickd import fastpath
from ickd.errors import ConfigError
from ickd.losses import aggregate_positive_targets, aggregate_positive_targets_at, dkd_loss, kd_loss, nicd_loss, picd_loss
from ickd.losses.fused import incontext_losses
from ickd.losses.incontext import neighbour_weights
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

    # --- the warm-up as a device scalar (``ickd.fastpath`` switch ``device_ramp``) ----------------
    # A captured CUDA graph bakes Python floats in, so a ramp passed as a float recaptures the step
    # every epoch of the warm-up. Instead the step multiplies by a 0-d device tensor that is set
    # outside the graph whenever the epoch changes: by ``set_epoch`` (called from ``step_signature``,
    # which the trainer evaluates before every graph step) and by an eager ``__call__`` itself.
    _ramp: torch.Tensor | None = None
    _ramp_epoch: int | None = None

    def _device_ramp(self) -> bool:
        return fastpath.enabled("device_ramp") and float(self.cfg.get("warmup_epochs", 0) or 0) > 0

    def set_epoch(self, epoch: int, device: torch.device | None = None) -> None:
        """Write epoch ``epoch``'s warm-up factor into the device scalar (outside any graph)."""
        if not self._device_ramp():
            return
        if self._ramp is None or (device is not None and self._ramp.device != device):
            if device is None:
                return  # allocated by the first (eager) step, on the logits' device
            self._ramp = torch.ones((), device=device)
            self._ramp_epoch = None
        if self._ramp_epoch != epoch:
            self._ramp.fill_(self.warmup_factor(epoch))
            self._ramp_epoch = epoch

    def ramp_factor(self, epoch: int, like: torch.Tensor) -> float | torch.Tensor:
        """The warm-up factor a loss term is multiplied by: a float, or the device scalar."""
        if not self._device_ramp():
            return self.warmup_factor(epoch)
        if fastpath.capturing(like.device):
            if self._ramp is None or self._ramp.device != like.device:
                raise RuntimeError("the warm-up factor first appeared during CUDA-graph capture; run an eager step first")
        else:  # a fill inside a capture would be replayed with the capture-time value
            self.set_epoch(epoch, like.device)
        assert self._ramp is not None
        return self._ramp

    def step_signature(self, epoch: int) -> Any:
        """Every Python value ``__call__`` derives from ``epoch`` (a captured step bakes them in).
        With a device-scalar ramp there is none; the call updates that scalar (it runs before
        every graph step, outside the graph)."""
        if self._device_ramp():
            self.set_epoch(epoch)
            return "device-ramp"
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
        factor = self.ramp_factor(epoch, student_logits)
        loss = dkd_loss(student_logits, teacher_logits, labels, float(c["alpha"]), float(c["beta"]), float(c["temperature"]))
        return {"ce": float(c["ce_weight"]) * F.cross_entropy(student_logits.float(), labels), "dkd": loss * factor if isinstance(factor, torch.Tensor) else factor * loss}


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
        t_n = self.nicd_temperature()
        use_nicd = float(c["nicd_weight"]) > 0
        # ``ickd.fastpath`` switch ``shared_softmax``: one log_softmax of the student per temperature
        # (CE's 1, KD/PICD's T, NICD's T_n), shared by the terms, and the neighbour aggregation
        # once for T and T_n. CE, KD, PICD values are bit-identical; NICD's p_s = exp(log p_s)
        # equals softmax within float rounding; gradients sum in another order (tests/test_opcount.py).
        lp: dict[float, torch.Tensor] = {}
        # ``fused_incontext``: PICD and NICD as one autograd node with a closed-form backward
        # (ickd/losses/fused.py); it takes the student's log-softmax at T from here and computes
        # NICD's probabilities at T_n itself.
        fused = fastpath.enabled("fused_incontext") and fastpath.enabled("shared_softmax")
        z = student_logits.float()
        if fastpath.enabled("shared_softmax"):
            for t in dict.fromkeys((1.0, T, *((t_n,) if use_nicd and not fused else ()))):
                lp[t] = F.log_softmax(z if t == 1.0 else z / t, dim=1)
            ce = F.nll_loss(lp[1.0], labels)  # = F.cross_entropy(z, labels), bit for bit
        else:
            ce = F.cross_entropy(student_logits.float(), labels)
        losses = {"ce": float(c["ce_weight"]) * ce}
        if float(c["kd_weight"]) > 0:
            losses["kd"] = float(c["kd_weight"]) * kd_loss(student_logits, teacher_logits, T, student_log_probs=lp.get(T))
        assert neighbours is not None, "IC-KD needs retrieved neighbours"
        factor = self.ramp_factor(epoch, student_logits)
        nb_logits = neighbours.logits.float()  # fp32 bank logits; never round them to the student's bf16
        temps = (T, t_n) if use_nicd and t_n != T and (lp or fused) else (T,)
        targets = aggregate_positive_targets_at(
            nb_logits,
            neighbours.sims,
            neighbours.positive,
            teacher_logits,
            temps,
            tau_r=float(c["tau_r"]),
            weighting=str(c["picd_weighting"]),
            aggregate=str(c["picd_aggregate"]),
            masked_rows_may_be_nan=fused,
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
                _require_positive(c, "kappa")
            picd, nicd = incontext_losses(z, lp[T], target, nicd_target, nb_logits, neighbours.not_negative, T, t_n,
                                          float(c["kappa"]), form, weights)
            losses["picd"] = self._ramped(factor, float(c["picd_weight"]), picd)
            if use_nicd:
                losses["nicd"] = self._ramped(factor, float(c["nicd_weight"]), nicd)
            return losses
        losses["picd"] = self._ramped(factor, float(c["picd_weight"]), picd_loss(student_logits, target, T, student_log_probs=lp.get(T)))
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
                    nb_logits,
                    neighbours.sims,
                    neighbours.positive,
                    teacher_logits,
                    t_n,
                    tau_r=float(c["tau_r"]),
                    weighting=str(c["picd_weighting"]),
                    aggregate=str(c["picd_aggregate"]),
                )
            losses["nicd"] = self._ramped(factor, float(c["nicd_weight"]), nicd_loss(
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
                student_log_probs=lp.get(t_n),
            ))
        return losses

    @staticmethod
    def _ramped(factor: float | torch.Tensor, weight: float, loss: torch.Tensor) -> torch.Tensor:
        if isinstance(factor, torch.Tensor):  # device-scalar ramp: weight * loss, then the ramp
            return factor * (weight * loss)
        return factor * weight * loss


def create_method(cfg: Mapping[str, Any]) -> LossMethod:
    return METHODS.get(str(cfg["name"]))(cfg)
