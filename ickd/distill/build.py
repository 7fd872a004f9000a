"""Turn the ``teacher`` / ``student`` / ``model`` / ``distill`` / ``paradigm`` / ``memory`` config
sections into a ready :class:`Distiller`, with every inconsistency reported before training starts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ickd.distill.methods import LossMethod, create_method
from ickd.distill.paradigms import (
    PARADIGMS,
    Distiller,
    OfflineDistiller,
    OnlineDistiller,
    RetrievalSpec,
    TeacherFreeDistiller,
)
from ickd.errors import ConfigError
from ickd.memory import MemoryBank
from ickd.models import create_model, load_pretrained

FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _build_net(spec: Mapping[str, Any], num_classes: int, in_channels: int) -> nn.Module:
    return create_model(str(spec["name"]), num_classes, in_channels=in_channels, **dict(spec.get("kwargs") or {}))


def resolve_checkpoint_path(path: str) -> Path:
    """Accept a checkpoint file or an ickd run folder (its ``checkpoints/best.pt``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "best.pt", p / "best.pt"):
            if candidate.is_file():
                return candidate
        raise ConfigError(f"teacher.checkpoint={path} is a folder without checkpoints/best.pt; point it at a .pt/.pth file or at an ickd teacher run folder")
    return p


def build_teacher(cfg: Mapping[str, Any], num_classes: int, in_channels: int) -> nn.Module:
    spec = cfg["teacher"]
    ckpt = spec["checkpoint"]
    if not ckpt:
        raise ConfigError(
            f"offline distillation with distill={cfg['distill']['name']} needs a trained teacher, but teacher.checkpoint is not set. "
            f"Train one with `ickd train stage=teacher model={spec['name']} dataset={cfg['dataset']['name']}` and pass "
            "teacher.checkpoint=<its run folder or checkpoints/best.pt>, or use a published CIFAR-100 teacher file (README)."
        )
    teacher = _build_net(spec, num_classes, in_channels)
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
        paradigm = str(cfg["paradigm"]["name"])
        fill_pass = paradigm == "offline" and str(mem["fill"]) == "pass"
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


def build_distiller(cfg: Mapping[str, Any], num_classes: int, in_channels: int, num_train: int, device: torch.device) -> Distiller:
    """Build the distiller of a run. ``stage=teacher`` trains ``model`` (or the teacher architecture) with CE."""
    stage = str(cfg["stage"])
    seed = int(cfg["seed"])
    if stage == "teacher":
        spec = cfg["model"] or cfg["teacher"]
        net = _build_net(spec, num_classes, in_channels)
        method = create_method({"name": "ce", "ce_weight": 1.0})
        return OfflineDistiller(net, method, None, teacher=None, bank=None).to(device)
    if stage != "student":
        raise ConfigError(f"stage={stage!r} is not valid; use stage=student (distil a student) or stage=teacher (train a teacher with CE)")

    method: LossMethod = create_method(cfg["distill"])
    paradigm = str(cfg["paradigm"]["name"])
    PARADIGMS.get(paradigm)  # clear error listing valid paradigms
    student = _build_net(cfg["student"], num_classes, in_channels)
    retrieval = retrieval_spec(cfg) if method.needs_bank else None
    if method.needs_bank and paradigm != "offline" and str(cfg["memory"]["update"]) == "frozen":
        # Online and teacher-free banks are filled during the first epoch by networks that are still
        # training: freezing them would keep near-random early outputs for the whole run.
        raise ConfigError(
            f"memory.update=frozen with paradigm={paradigm} would freeze the first epoch's outputs of a network "
            "that is still learning (near-random features and logits) for the whole run; use memory.update=overwrite "
            "or momentum, or paradigm=offline (a frozen pre-trained teacher) for a frozen bank"
        )
    fill_pass = str(cfg["memory"]["fill"]) == "pass"

    if paradigm == "offline":
        teacher = build_teacher(cfg, num_classes, in_channels) if method.needs_teacher else None
        bank = None
        if method.needs_bank:
            bank = build_bank(cfg, num_train, teacher.feature_dim, num_classes, device, seed)
        return OfflineDistiller(student, method, retrieval, teacher=teacher, bank=bank, fill_pass=fill_pass).to(device)

    if paradigm == "online":
        peer = _build_net(cfg["teacher"], num_classes, in_channels)
        banks = None
        if method.needs_bank:
            banks = {
                "student": build_bank(cfg, num_train, student.feature_dim, num_classes, device, seed),
                "peer": build_bank(cfg, num_train, peer.feature_dim, num_classes, device, seed + 1),
            }
        return OnlineDistiller(student, method, retrieval, peer=peer, banks=banks).to(device)

    # teacher_free
    source = str(cfg["paradigm"]["bank_source"])
    if source not in ("self", "ema"):
        raise ConfigError(f"paradigm.bank_source={source!r} is not valid; use self or ema")
    bank = build_bank(cfg, num_train, student.feature_dim, num_classes, device, seed) if method.needs_bank else None
    return TeacherFreeDistiller(
        student, method, retrieval, bank=bank, source=source, ema_decay=float(cfg["paradigm"]["ema_decay"])
    ).to(device)
