"""What a distillation method is: an ``nn.Module`` over one training step's outputs.

A method receives a :class:`StepOutputs` (the student's and the teacher's logits and features, the
labels, the dataset indices, the epoch and, when the run has a memory bank, the retrieved
neighbours) and returns a dict of *weighted* named losses; the step's loss is their sum
(mdistiller's contract). Its parameters (projection heads, embeddings) join the optimiser and its
``state_dict`` (buffers such as CRD's sample memory) joins the checkpoints, because the distiller
holds it as a submodule. Paradigms (``ickd/distill/paradigms.py``) decide where the teacher outputs
and the bank come from, so every method works in every paradigm that can supply what it declares.

A method declares what it needs (class attributes): ``needs_teacher`` (teacher outputs),
``needs_bank`` (retrieved neighbours) and ``needs_features`` (keys of the feature dict beyond the
pooled features: ``"stages"``, ``"preact"``; see :data:`ickd.models.FEATURE_KEYS`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ickd import fastpath
from ickd.errors import ConfigError
from ickd.memory import Neighbours
from ickd.models import forward_features


@dataclass
class StepOutputs:
    """Everything a method may read about one training step (B samples, C classes).

    ``student_logits`` (B, C) with gradient; ``teacher_logits`` (B, C) detached, or None without a
    teacher; ``labels`` (B,) int64; ``indices`` (B,) dataset indices (for per-sample memories);
    ``epoch`` (0-based); ``neighbours``: the in-context samples retrieved for the batch (IC-KD), or
    None; ``student_features`` / ``teacher_features``: dicts with ``"pooled"`` (B, D) and, when a
    method asks for them, ``"stages"`` (feature maps after each stage, the stem first) and
    ``"preact"`` (the same before the stage's last activation). Teacher-side tensors are detached.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    labels: torch.Tensor
    indices: torch.Tensor
    epoch: int
    neighbours: Neighbours | None = None
    student_features: dict[str, Any] = field(default_factory=dict)
    teacher_features: dict[str, Any] = field(default_factory=dict)
    _log_probs: dict[float, torch.Tensor] = field(default_factory=dict, repr=False)
    _z: torch.Tensor | None = field(default=None, repr=False)

    def student_z(self) -> torch.Tensor:
        """The student's logits in fp32 (cast once: under autocast they come out in bf16)."""
        if self._z is None:
            self._z = self.student_logits.float()
        return self._z

    def student_log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """``log_softmax(z_s / T)`` in fp32, computed once per temperature and shared by every term
        that asks (``ickd.fastpath`` switch ``shared_softmax``; off: computed at each call)."""
        t = float(temperature)
        cached = self._log_probs.get(t)
        if cached is not None and fastpath.enabled("shared_softmax"):
            return cached
        z = self.student_z()
        value = F.log_softmax(z if t == 1.0 else z / t, dim=1)
        self._log_probs[t] = value
        return value


@dataclass
class MethodContext:
    """What a method may need to build itself: sizes, and the networks to probe feature shapes of.

    ``teacher`` is the network that plays the teacher (the frozen teacher offline, the peer online,
    the student itself teacher-free); ``input_shape`` is (channels, height, width) of a sample.
    """

    num_classes: int
    num_train: int
    student: nn.Module | None = None
    teacher: nn.Module | None = None
    input_shape: tuple[int, int, int] = (3, 32, 32)

    def feature_shapes(self, which: str) -> dict[str, Any]:
        """Shapes of ``which`` ("student" | "teacher")'s feature dict, from one no-grad forward of two
        zero samples on the network's device (the network's train/eval mode is kept)."""
        net = self.student if which == "student" else self.teacher
        if net is None:
            raise ConfigError(f"this method needs the {which}'s features, but the run has no {which} network")
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        mode = net.training
        net.eval()
        try:
            with torch.no_grad():
                _, feats = forward_features(net, torch.zeros(2, *self.input_shape, device=device), ("stages", "preact"))
        finally:
            net.train(mode)
        return {key: ([tuple(t.shape[1:]) for t in value] if isinstance(value, list) else tuple(value.shape[1:]))
                for key, value in feats.items()}


def require_non_negative(cfg: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        value = cfg.get(key)
        if value is not None and float(value) < 0:
            raise ConfigError(f"distill.{key}={value} is negative; loss weights and temperatures must be >= 0")


def require_positive(cfg: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        value = cfg.get(key)
        if value is not None and float(value) <= 0:
            raise ConfigError(f"distill.{key}={value} must be > 0")


def ramp(epoch: int, warmup_epochs: float) -> float:
    """Linear warm-up factor for epoch ``epoch`` (0-based): 1/W, 2/W, ..., then 1."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / float(warmup_epochs))


class Method(nn.Module):
    """Base class of distillation methods. Subclasses implement :meth:`forward`.

    ``cfg`` is the method's config section (``distill``); ``context`` carries sizes and networks for
    methods that build trainable heads (None for methods without any).
    """

    needs_teacher: bool = True
    needs_bank: bool = False
    needs_features: tuple[str, ...] = ()

    def __init__(self, cfg: Mapping[str, Any], context: MethodContext | None = None) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        require_non_negative(self.cfg, "ce_weight", "kd_weight", "picd_weight", "nicd_weight", "alpha", "beta", "warmup_epochs")
        require_positive(self.cfg, "temperature", "tau_r", "kappa")
        self._ramp: torch.Tensor | None = None
        self._ramp_epoch: int | None = None

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- the linear warm-up of a method's distillation terms (``distill.warmup_epochs``) -------------
    def warmup_factor(self, epoch: int) -> float:
        return ramp(epoch, float(self.cfg.get("warmup_epochs", 0) or 0))

    # A captured CUDA graph bakes Python floats in, so a ramp passed as a float recaptures the step
    # every epoch of the warm-up. Instead the step multiplies by a 0-d device tensor that is set
    # outside the graph whenever the epoch changes: by ``set_epoch`` (called from ``step_signature``,
    # which the trainer evaluates before every graph step) and by an eager call itself
    # (``ickd.fastpath`` switch ``device_ramp``).
    def _device_ramp(self) -> bool:
        return fastpath.enabled("device_ramp") and float(self.cfg.get("warmup_epochs", 0) or 0) > 0

    def set_epoch(self, epoch: int, device: torch.device | None = None) -> None:
        """Write epoch ``epoch``'s warm-up factor into the device scalar (outside any graph)."""
        for child in self.children():
            if isinstance(child, Method):
                child.set_epoch(epoch, device)
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
        """Every Python value ``forward`` derives from ``epoch`` (a captured step bakes them in).
        With a device-scalar ramp there is none; the call updates that scalar (it runs before
        every graph step, outside the graph)."""
        children = tuple(c.step_signature(epoch) for c in self.children() if isinstance(c, Method))
        if self._device_ramp():
            self.set_epoch(epoch)
            own: Any = "device-ramp"
        else:
            own = self.warmup_factor(epoch)
        return (own, *children) if children else own

    @staticmethod
    def ramped(factor: float | torch.Tensor, weight: float, loss: torch.Tensor) -> torch.Tensor:
        """``factor * weight * loss``; with a device-scalar ramp, ``weight * loss`` first."""
        if isinstance(factor, torch.Tensor):
            return factor * (weight * loss)
        return factor * weight * loss
