"""Distillers: one per paradigm (offline, online, teacher-free), each combining any loss method.

A distiller owns the networks of a run and its memory banks. Its ``forward_train`` returns the
student's logits, a dict of weighted loss components (the total is their sum) and retrieval
statistics; the trainer only optimises ``trainable_parameters()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ickd import fastpath
from ickd.distill.context import PARADIGMS, BuildContext, RetrievalSpec, build_teacher
from ickd.errors import CheckpointError, ConfigError
from ickd.memory import MemoryBank, Neighbours
from ickd.methods import Method, StepOutputs, method_class
from ickd.models import forward_features



@dataclass
class StepOutput:
    """What a distiller's training forward returns to the trainer (the method sees a StepOutputs)."""

    logits: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def retrieval_stats(nb: Neighbours, prefix: str = "") -> dict[str, torch.Tensor]:
    """Fraction of same-class neighbours and mean neighbour similarity (device tensors, no sync)."""
    if fastpath.enabled("stats"):
        # Neighbours guarantees positive => valid and sims == 0 where not valid, so the masks drop
        # out; integer counts are exact, so the values are bit-identical to the masked form below.
        per_row = nb.positive.sum(dim=1)
        count = max(nb.valid.numel(), 1) if nb.all_valid else nb.valid.sum().clamp_min(1)
        return {
            f"{prefix}pos_frac": per_row.sum() / count,
            f"{prefix}nb_sim": nb.sims.float().sum() / count,
            f"{prefix}no_pos_frac": (per_row == 0).float().mean(),
        }
    valid = nb.valid.float()
    count = valid.sum().clamp_min(1.0)
    return {
        f"{prefix}pos_frac": (nb.positive.float() * valid).sum() / count,
        f"{prefix}nb_sim": (nb.sims.float() * valid).sum() / count,
        f"{prefix}no_pos_frac": (nb.positive.sum(dim=1) == 0).float().mean(),
    }


def _detached(features: dict[str, Any]) -> dict[str, Any]:
    """A feature dict with every tensor detached (the teacher side of a step)."""
    return {k: ([t.detach() for t in v] if isinstance(v, list) else v.detach()) for k, v in features.items()}


class Distiller(nn.Module):
    #: Whether the network that fills the bank is itself still training (online peers, the student
    #: or its EMA): then no fill pass before training exists and a frozen bank would keep the first
    #: epoch's near-random outputs. False for a frozen pre-trained teacher.
    source_trains: bool = True

    def __init__(self, student: nn.Module, method: Method, retrieval: RetrievalSpec | None) -> None:
        super().__init__()
        self.student = student
        self.method = method  # a submodule: its parameters train, its state is checkpointed
        self.retrieval = retrieval
        self.banks: dict[str, MemoryBank] = {}

    # --- what the trainer uses -------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [*self.student.parameters(), *self.method.parameters()]

    def _forward(self, net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``net``'s logits and feature dict with what the method needs (``Method.needs_features``)."""
        return forward_features(net, x, self.method.needs_features)

    @classmethod
    def build(cls, ctx: BuildContext) -> "Distiller":
        """This paradigm's distiller for a run (``ctx``: ickd.distill.build.BuildContext)."""
        raise NotImplementedError

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int) -> StepOutput:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimiser step (EMA updates)."""

    # --- what a captured (CUDA graph) step needs to know ----------------------------------------
    def _fills_online(self, epoch: int) -> bool:
        return bool(self.banks) and epoch == 0 and self.bank_fill_source() is None

    def step_signature(self, epoch: int) -> Any:
        """The Python values ``forward_train`` derives from ``epoch``; a change means a new capture."""
        return (self.method.step_signature(epoch), self._fills_online(epoch))

    def prepare_epoch(self, epoch: int) -> None:
        """Set the per-epoch device values a captured step reads (the method's warm-up scalar);
        outside any graph. ``step_signature`` does the same before every graph step."""
        self.method.set_epoch(epoch)

    def capture_blocker(self, epoch: int) -> str | None:
        """Why this epoch's step cannot be captured in a CUDA graph right now (None: it can)."""
        if self._fills_online(epoch):
            return "the memory bank is filled online during the first epoch (range checks sync)"
        for name, bank in self.banks.items():
            reason = bank.capture_blocker()
            if reason:
                return f"memory bank {name!r}: {reason}"
        return None

    def eval_models(self) -> dict[str, nn.Module]:
        """Models evaluated each epoch; the first is the run's reported model."""
        return {"student": self.student}

    def bank_fill_source(self) -> nn.Module | None:
        """The network whose no-grad pass fills the bank before training (None: fill online)."""
        return None

    @torch.no_grad()
    def fill_banks(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        source = self.bank_fill_source()
        if source is None or not self.banks:
            return
        bank = next(iter(self.banks.values()))
        # The pass stores untransformed features; finish_fill sets the feature transform's mean
        # (and whitening) from the filled bank exactly and transforms the entries once.
        bank.begin_fill()
        for x, y, idx in batches:
            logits, feats = self._fill_forward(source, x)
            bank.fill(idx, feats.float(), logits.float(), y)
        bank.finish_fill()

    def _fill_forward(self, source: nn.Module, x: torch.Tensor):
        """The fill pass's forward of ``source`` (the same network the training steps query with)."""
        return source(x)

    def distil(self, logits, teacher_logits, teacher_feats, y, idx, epoch, bank: MemoryBank | None, prefix: str = "",
               student_features: dict[str, Any] | None = None, teacher_features: dict[str, Any] | None = None):
        """The method's losses for one student: retrieve its neighbours from ``bank`` (queried with
        the teacher-side pooled features of the batch, the bank's own feature space) when there is
        one, then call the method on the step's outputs."""
        nb, stats = None, {}
        # Losses are computed in fp32 (the networks' forward stays under the trainer's autocast):
        # the einsum/bmm inside PICD/NICD would otherwise round targets and similarities to bf16.
        with torch.autocast(logits.device.type, enabled=False):
            if bank is not None:
                nb = self.retrieval.retrieve(bank, teacher_feats.float(), y, idx)
                stats = retrieval_stats(nb, prefix)
            out = StepOutputs(logits, teacher_logits, y, idx, epoch, nb, student_features or {}, teacher_features or {})
            return self.method(out), stats

    def write_bank(self, bank: MemoryBank, epoch: int, idx, feats, logits, labels) -> None:
        """Store the batch's outputs: ``fill`` while an online-filled bank is still being built
        (the first epoch, so even ``memory.update=frozen`` banks get filled), else ``update``."""
        if epoch == 0 and self.bank_fill_source() is None:
            bank.fill(idx, feats, logits, labels)
        else:
            bank.update(idx, feats, logits, labels)

    def bank_stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, bank in self.banks.items():
            for key, value in bank.stats().items():
                out[f"bank_{key}" if len(self.banks) == 1 else f"bank_{name}_{key}"] = value
        return out

    # --- checkpointing -----------------------------------------------------------------------
    def training_state(self) -> dict[str, Any]:
        """What must be saved to resume exactly (frozen teachers are reloaded from their file)."""
        state: dict[str, Any] = {"student": self.student.state_dict()}
        state["banks"] = {name: bank.state_dict() for name, bank in self.banks.items()}
        method_state = self.method.state_dict()
        if method_state:  # a method with heads or memories (FitNet, CRD...); none for logit methods
            state["method"] = method_state
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        for name, bank in self.banks.items():
            bank.load_state_dict(state["banks"][name])
        method_state = self.method.state_dict()
        if method_state or "method" in state:
            if "method" not in state:
                raise CheckpointError(
                    f"the checkpoint has no state for the method's {len(method_state)} parameter/buffer tensors "
                    "(it was written by another distill method); resume with the method that wrote it"
                )
            self.method.load_state_dict(state["method"])


@PARADIGMS.register("offline")
class OfflineDistiller(Distiller):
    """A frozen, pre-trained teacher feeds the loss and the bank (also: plain training if no teacher)."""

    source_trains = False

    def __init__(self, student, method, retrieval, teacher: nn.Module | None, bank: MemoryBank | None, fill_pass: bool = True):
        super().__init__(student, method, retrieval)
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        if bank is not None:
            self.banks["teacher"] = bank
        self.fill_pass = fill_pass
        # (key, folded copy) of the frozen teacher for autocast steps; a plain attribute, not a
        # submodule: no state_dict entry, never trained, rebuilt when its key changes.
        self._folded: tuple[Any, nn.Module | None] | None = None

    @classmethod
    def build(cls, ctx):
        student = ctx.net("student")
        teacher = None
        if method_class(ctx.cfg["distill"]).needs_teacher:
            teacher = build_teacher(ctx.cfg, ctx.num_classes, ctx.in_channels)
        method = ctx.method(student, teacher)
        bank = ctx.bank(teacher.feature_dim) if method.needs_bank else None
        return cls(student, method, ctx.retrieval(method), teacher=teacher, bank=bank,
                   fill_pass=str(ctx.cfg["memory"]["fill"]) == "pass")

    def train(self, mode: bool = True) -> "OfflineDistiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BN statistics must not drift
        return self

    def bank_fill_source(self):
        return self.teacher if self.fill_pass else None

    def _fill_forward(self, source, x):
        # The bank holds what the steps query with: the folded teacher under autocast.
        return (self._step_teacher(x) if source is self.teacher else source)(x)

    def _step_teacher(self, x: torch.Tensor) -> nn.Module:
        """The teacher a training step runs: under autocast, a copy with its BatchNorms folded into
        the convolutions and the weights in the autocast dtype (``ickd.fastpath`` switch
        ``teacher_fold``; no BN pass and no weight cast per step), else the teacher itself."""
        assert self.teacher is not None
        device = x.device.type
        if (not (fastpath.enabled("teacher_fold") and torch.is_autocast_enabled(device)) or self.teacher.training
                or self.method.needs_features):  # the folded copy only has the plain forward
            return self.teacher
        from ickd.models.fold import fold_frozen

        params = list(self.teacher.parameters())
        fmt = torch.channels_last if any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                                         and not p.is_contiguous() for p in params) else torch.contiguous_format
        dtype = torch.get_autocast_dtype(device)
        # In-place changes of the teacher (a load_state_dict) bump the parameters' versions.
        key = (dtype, x.device, fmt, tuple(p.data_ptr() for p in params[:1]), sum(p._version for p in params))
        if self._folded is None or self._folded[0] != key:
            if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # Folding inside a capture would recompute the folded weights in every replay.
                raise RuntimeError("the folded teacher changed during CUDA-graph capture; run an eager step first")
            self._folded = (key, fold_frozen(self.teacher, dtype, fmt))
        return self._folded[1] or self.teacher

    def forward_train(self, x, y, idx, epoch):
        teacher_logits = teacher_feats = None
        t_features: dict[str, Any] = {}
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits, t_features = self._forward(self._step_teacher(x), x)
            teacher_feats = t_features["pooled"]
        logits, s_features = self._forward(self.student, x)
        bank = self.banks.get("teacher")
        if bank is not None and fastpath.enabled("lean_bank"):
            # Cast once (exact): retrieval, the losses and the bank write each cast them otherwise.
            teacher_logits, teacher_feats = teacher_logits.float(), teacher_feats.float()
        losses, stats = self.distil(logits, teacher_logits, teacher_feats, y, idx, epoch, bank,
                                    student_features=s_features, teacher_features=t_features)
        if bank is not None:
            self.write_bank(bank, epoch, idx, teacher_feats.float(), teacher_logits.float(), y)
        return StepOutput(logits, losses, stats)


@PARADIGMS.register("online")
class OnlineDistiller(Distiller):
    """DML-style: two peers trained together, each the other's teacher and each the other's bank."""

    def __init__(self, student, method, retrieval, peer: nn.Module, banks: dict[str, MemoryBank] | None):
        super().__init__(student, method, retrieval)
        self.peer = peer
        self.banks.update(banks or {})

    @classmethod
    def build(cls, ctx):
        student = ctx.net("student")
        peer = ctx.net("teacher")
        method = ctx.method(student, peer)
        banks = None
        if method.needs_bank:
            banks = {"student": ctx.bank(student.feature_dim), "peer": ctx.bank(peer.feature_dim, seed_offset=1)}
        return cls(student, method, ctx.retrieval(method), peer=peer, banks=banks)

    def trainable_parameters(self):
        return list(self.student.parameters()) + list(self.peer.parameters()) + list(self.method.parameters())

    def eval_models(self):
        return {"student": self.student, "peer": self.peer}

    def forward_train(self, x, y, idx, epoch):
        logits_s, f_s = self._forward(self.student, x)
        logits_p, f_p = self._forward(self.peer, x)
        feats_s, feats_p = f_s["pooled"].detach().float(), f_p["pooled"].detach().float()
        # Each peer learns from the other's outputs and retrieves from the other's bank.
        losses, stats = self.distil(logits_s, logits_p.detach(), feats_p, y, idx, epoch, self.banks.get("peer"),
                                    student_features=f_s, teacher_features=_detached(f_p))
        peer_losses, peer_stats = self.distil(logits_p, logits_s.detach(), feats_s, y, idx, epoch, self.banks.get("student"), "peer_",
                                              student_features=f_p, teacher_features=_detached(f_s))
        losses.update({f"peer_{name}": value for name, value in peer_losses.items()})
        stats.update(peer_stats)
        if self.banks:
            self.write_bank(self.banks["student"], epoch, idx, feats_s, logits_s.detach().float(), y)
            self.write_bank(self.banks["peer"], epoch, idx, feats_p, logits_p.detach().float(), y)
        return StepOutput(logits_s, losses, stats)

    def training_state(self):
        state = super().training_state()
        state["peer"] = self.peer.state_dict()
        return state

    def load_training_state(self, state):
        super().load_training_state(state)
        self.peer.load_state_dict(state["peer"])


@PARADIGMS.register("teacher_free")
class TeacherFreeDistiller(Distiller):
    """Self-distillation: the student's own detached outputs (or an EMA copy's) are the teacher."""

    def __init__(self, student, method, retrieval, bank: MemoryBank | None, source: str = "ema", ema_decay: float = 0.999):
        super().__init__(student, method, retrieval)
        if bank is not None:
            self.banks["self"] = bank
        self.source = source
        self.ema: AveragedModel | None = None
        if source == "ema":
            self.ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)

    @classmethod
    def build(cls, ctx):
        source = str(ctx.cfg["paradigm"]["bank_source"])
        if source not in ("self", "ema"):
            raise ConfigError(f"paradigm.bank_source={source!r} is not valid; use self or ema")
        student = ctx.net("student")
        method = ctx.method(student, student)
        bank = ctx.bank(student.feature_dim) if method.needs_bank else None
        return cls(student, method, ctx.retrieval(method), bank=bank, source=source,
                   ema_decay=float(ctx.cfg["paradigm"]["ema_decay"]))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ema is not None:
            self.ema.eval()
        return self

    def forward_train(self, x, y, idx, epoch):
        logits, s_features = self._forward(self.student, x)
        if self.ema is not None:
            with torch.no_grad():
                t_logits, t_features = self._forward(self.ema.module, x)
        else:
            t_logits, t_features = logits.detach(), _detached(s_features)
        t_feats = t_features["pooled"]
        bank = self.banks.get("self")
        losses, stats = self.distil(logits, t_logits, t_feats, y, idx, epoch, bank,
                                    student_features=s_features, teacher_features=t_features)
        if bank is not None:
            self.write_bank(bank, epoch, idx, t_feats.float(), t_logits.float(), y)
        return StepOutput(logits, losses, stats)

    def after_step(self):
        if self.ema is not None:
            self.ema.update_parameters(self.student)

    def eval_models(self):
        models = {"student": self.student}
        if self.ema is not None:
            models["ema"] = self.ema
        return models

    def training_state(self):
        state = super().training_state()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_training_state(self, state):
        super().load_training_state(state)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
