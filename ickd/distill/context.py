"""Building blocks of a run's distiller: networks, the teacher, the memory bank, the retrieval spec
and the method, from the ``teacher`` / ``student`` / ``model`` / ``distill`` / ``memory`` config
sections, with every inconsistency reported before training starts. Paradigms build themselves from
a :class:`BuildContext` (ickd/distill/paradigms.py); ``build.py`` picks the paradigm."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ickd.errors import ConfigError
from ickd.memory import MemoryBank, Neighbours
from ickd.methods import Method, MethodContext, create_method
from ickd.models import create_model, load_pretrained
from ickd.registry import Registry
from ickd.runs.rundir import RunDir

#: Paradigm name -> Distiller class (ickd/distill/paradigms.py registers them).
PARADIGMS: Registry[type] = Registry("paradigm")


@dataclass
class RetrievalSpec:
    k: int
    split: str = "topk"
    k_pos: int | None = None
    k_neg: int | None = None
    retrieval: str = "knn"  # knn | random (the random-neighbour ablation, memory.retrieval)

    def retrieve(self, bank: MemoryBank, feats: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor | None) -> Neighbours:
        return bank.retrieve(
            feats, self.k, labels, exclude_indices=idx, split=self.split, k_pos=self.k_pos, k_neg=self.k_neg,
            retrieval=self.retrieval,
        )


FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_net(spec: Mapping[str, Any], num_classes: int, in_channels: int) -> nn.Module:
    return create_model(str(spec["name"]), num_classes, in_channels=in_channels, **dict(spec.get("kwargs") or {}))


def resolve_checkpoint_path(path: str) -> Path:
    """Accept a checkpoint file or an ickd run folder (its best checkpoint, ``RunDir.best_checkpoint``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        best = RunDir(p).best_checkpoint
        for candidate in (best, p / best.name):  # a run folder, or its checkpoints folder
            if candidate.is_file():
                return candidate
        raise ConfigError(f"teacher.checkpoint={path} is a folder without {best.relative_to(p)}; point it at a .pt/.pth file "
                          "or at an ickd teacher run folder")
    return p


def build_teacher(cfg: Mapping[str, Any], num_classes: int, in_channels: int) -> nn.Module:
    spec = cfg["teacher"]
    ckpt = spec["checkpoint"]
    if not ckpt:
        raise ConfigError(
            f"offline distillation with distill={cfg['distill']['name']} needs a trained teacher, but teacher.checkpoint is not set. "
            f"Train one with `ickd train stage=teacher model={spec['name']} dataset={cfg['dataset']['name']}` and pass "
            f"teacher.checkpoint=<its run folder or {RunDir.CHECKPOINTS}/{RunDir.BEST}>, or use a published CIFAR-100 teacher file (README)."
        )
    teacher = build_net(spec, num_classes, in_channels)
    # Weights-only unless the user says the file is trusted (full unpickling can run code from it).
    load_pretrained(teacher, str(resolve_checkpoint_path(str(ckpt))), strict=True, trust=bool(spec.get("trust_checkpoint")))
    return teacher


def build_bank(
    cfg: Mapping[str, Any], num_samples: int, feature_dim: int, num_classes: int, device: torch.device, seed: int,
    fill_pass: bool | None = None,
) -> MemoryBank:
    """The memory bank of ``cfg["memory"]``. ``fill_pass``: whether a no-grad pass fills it before
    training (default: paradigm=offline with memory.fill=pass, the only setting that has one)."""
    mem = cfg["memory"]
    transform = str(mem["feature_transform"])
    if fill_pass is None:
        # Only a paradigm whose bank source is a trained, frozen network can fill the bank in one pass.
        fill_pass = not PARADIGMS.get(str(cfg["paradigm"]["name"])).source_trains and str(mem["fill"]) == "pass"
    if transform == "auto":
        # Whitening needs the whole bank once (a fill pass); banks filled online are only centred.
        transform = "center_whiten" if fill_pass else "center"
    if transform == "center_whiten" and not fill_pass:
        raise ConfigError(
            "memory.feature_transform=center_whiten computes its whitening once from the bank filled before "
            "training, but this bank is filled online (memory.fill=online, or the online/teacher_free paradigm); "
            "use memory.feature_transform=center, or memory.fill=pass in the offline paradigm"
        )
    dtype_name = str(mem["feature_dtype"])
    if dtype_name == "auto":
        # fp16 halves the bytes the similarity matmul reads on the GPU (accumulation stays fp32 in
        # cuBLAS); on CPU a half matmul is slower than fp32, so the bank stays fp32 there.
        dtype_name = "float16" if torch.device(device).type == "cuda" else "float32"
    if dtype_name not in FEATURE_DTYPES:
        raise ConfigError(f"memory.feature_dtype={dtype_name!r} is not one of {sorted(FEATURE_DTYPES)} or auto")
    retriever_kwargs = {k: mem[k] for k in ("nlist", "nprobe", "use_gpu") if mem[k] is not None}
    spec = retrieval_spec(cfg)
    bank = MemoryBank(
        num_samples=num_samples,
        feature_dim=feature_dim,
        num_logits=num_classes,
        size=mem["size"],
        subset=str(mem["subset"]),
        update=str(mem["update"]),
        momentum=float(mem["momentum"]),
        retriever=str(mem["backend"]),
        retriever_kwargs=retriever_kwargs,
        feature_dtype=FEATURE_DTYPES[dtype_name],
        device=device,
        seed=seed,
        feature_transform=transform,
        center_momentum=mem["center_momentum"],
        retrieval=spec.retrieval,
        whiten_eps=float(mem["whiten_eps"]),
    )
    bank.check_k(spec.k, k_pos=spec.k_pos, k_neg=spec.k_neg, split=spec.split)
    return bank


def retrieval_spec(cfg: Mapping[str, Any]) -> RetrievalSpec:
    mem = cfg["memory"]
    split = str(mem["split"])
    k_pos = mem["k_pos"] if split == "separate" else None
    k_neg = mem["k_neg"] if split == "separate" else None
    k = int(mem["k"]) if split != "separate" else int(k_pos or 0) + int(k_neg or 0)
    return RetrievalSpec(k=k, split=split, k_pos=k_pos, k_neg=k_neg, retrieval=str(mem["retrieval"]))


@dataclass
class BuildContext:
    """What every paradigm's ``build`` gets: the run's config and the data's sizes."""

    cfg: Mapping[str, Any]
    num_classes: int
    in_channels: int
    num_train: int
    device: torch.device
    image_size: int = 32

    @property
    def seed(self) -> int:
        return int(self.cfg["seed"])

    def net(self, section: str) -> nn.Module:
        return build_net(self.cfg[section], self.num_classes, self.in_channels)

    def method(self, student: nn.Module, teacher: nn.Module | None) -> Method:
        context = MethodContext(self.num_classes, self.num_train, student=student, teacher=teacher,
                                input_shape=(self.in_channels, self.image_size, self.image_size))
        return create_method(self.cfg["distill"], context)

    def bank(self, feature_dim: int, seed_offset: int = 0) -> MemoryBank:
        return build_bank(self.cfg, self.num_train, feature_dim, self.num_classes, self.device, self.seed + seed_offset)

    def retrieval(self, method: Method) -> RetrievalSpec | None:
        return retrieval_spec(self.cfg) if method.needs_bank else None
