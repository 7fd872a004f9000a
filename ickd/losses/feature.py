"""Feature-based distillation baselines (issue 13) as pure building blocks: FitNet, AT, CRD, ReviewKD.

Each loss follows its paper's CIFAR-100 setting, with megvii-research/mdistiller
(``mdistiller/distillers/{FitNet,AT,CRD,ReviewKD}.py``, ``mdistiller/engine/cfg.py``) as the reference
recipe; every deviation from it is named in the docstring where it happens. Nothing here is wired
into the distillers or configs yet: the integration (which feature maps to tap, the loss weights
below, ReviewKD's warm-up) comes later.

Conventions shared by every loss here:

* the teacher side is detached inside the loss (teacher features never receive gradients), while
  the student features and the trainable heads (:class:`ConvRegressor`, :class:`Embed`,
  :class:`ReviewKDHead`) do;
* no ``.item()`` and no data-dependent Python branching in the forward paths, so none of them waits
  for the device (the only checks are on shapes, which are host-side metadata);
* losses are returned unweighted: multiply by the ``*_WEIGHT`` constants (mdistiller's CIFAR-100
  values) at the call site.

Where the features come from in mdistiller's CIFAR ResNets (ickd's :class:`CifarResNet` currently
returns only ``(logits, pooled)``, so the integration will need hooks): ``feats[0]`` = stem output,
``feats[1..3]`` = the three stage outputs (post-ReLU), ``preact_feats[1..3]`` = the same before the
last ReLU of each stage, ``pooled_feat`` = the globally pooled last stage. For resnet8x4 and
resnet32x4 (widths [32, 64, 128, 256]) on 32x32 inputs the stage outputs are 64x32x32, 128x16x16,
256x8x8 and the pooled feature has 256 dimensions.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ickd.errors import ConfigError

__all__ = [
    "FITNET_WEIGHT",
    "FITNET_HINT_LAYER",
    "AT_WEIGHT",
    "AT_P",
    "CRD_WEIGHT",
    "REVIEWKD_WEIGHT",
    "REVIEWKD_WARMUP_EPOCHS",
    "HCL_LEVELS",
    "ConvRegressor",
    "fitnet_loss",
    "attention_map",
    "at_loss",
    "Embed",
    "ContrastMemory",
    "nce_contrast_loss",
    "CRDLoss",
    "ABF",
    "ReviewKDHead",
    "hcl_loss",
]

# mdistiller CIFAR-100 defaults (mdistiller/engine/cfg.py; cross-entropy weight 1.0 for all four).
FITNET_WEIGHT = 100.0  # CFG.FITNET.LOSS.FEAT_WEIGHT
FITNET_HINT_LAYER = 2  # CFG.FITNET.HINT_LAYER: feats[2] = output of the 2nd stage
AT_WEIGHT = 1000.0  # CFG.AT.LOSS.FEAT_WEIGHT (the paper's beta = 1000)
AT_P = 2  # CFG.AT.P
CRD_WEIGHT = 0.8  # CFG.CRD.LOSS.FEAT_WEIGHT
# CFG.REVIEWKD.REVIEWKD_WEIGHT = 1.0; configs/cifar100/reviewkd.yaml (resnet32x4 -> resnet8x4)
# overrides it to 5.0. Linear warm-up min(epoch / 20, 1) on top (not implemented here).
REVIEWKD_WEIGHT = 1.0
REVIEWKD_WARMUP_EPOCHS = 20
HCL_LEVELS = (4, 2, 1)


def _check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}"
        )


def _check_paired(student: Sequence[Tensor], teacher: Sequence[Tensor], what: str) -> None:
    """Multi-level losses pair student and teacher maps level by level."""
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"{what} needs equally many (>0) student and teacher maps, got {len(student)} "
            f"and {len(teacher)}"
        )


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# ------------------------------------------------------------------------------------------ FitNet
class ConvRegressor(nn.Module):
    """FitNet regressor (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").

    Maps a student hint ``(N, C_s, H_s, W_s)`` to the teacher's ``(N, C_t, H_t, W_t)``, as mdistiller's
    ``ConvReg`` (conv -> BatchNorm -> ReLU). The conv depends on the spatial sizes:

    * ``H_s == 2 H_t``: 3x3 conv, stride 2, padding 1 (halves the size);
    * ``2 H_s == H_t``: 4x4 transposed conv, stride 2, padding 1 (doubles it);
    * ``H_s >= H_t`` otherwise: a valid conv of kernel ``(1 + H_s - H_t, 1 + W_s - W_t)``, i.e. a
      1x1 conv when the sizes agree (the CIFAR ResNet case, where the 2nd-stage hints are 16x16);
    * ``H_s < H_t`` otherwise: unsupported (mdistiller raises too).

    ``student_size``/``teacher_size`` are ``H`` or ``(H, W)``. ``use_relu=True`` is mdistiller's
    default; the ReLU matches post-ReLU teacher hints. The conv keeps its bias and default init, as
    mdistiller's. Deviation: the ReLU is not in-place.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        student_size: int | Sequence[int],
        teacher_size: int | Sequence[int],
        use_relu: bool = True,
    ) -> None:
        super().__init__()
        (s_h, s_w), (t_h, t_w) = _hw(student_size), _hw(teacher_size)
        self.conv: nn.Module
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(
                student_channels, teacher_channels, kernel_size=4, stride=2, padding=1
            )
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(
                student_channels, teacher_channels, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w)
            )
        else:
            raise ConfigError(
                f"FitNet regressor: student hint {s_h}x{s_w} is smaller than the teacher's {t_h}x{t_w} "
                "(only equal, half or double sizes, or a larger student map, are supported); pick a "
                "hint layer with at least the teacher's resolution"
            )
        self.bn = nn.BatchNorm2d(teacher_channels)
        self.use_relu = use_relu

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_s, H_s, W_s) -> (N, C_t, H_t, W_t)``."""
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


def fitnet_loss(student_hint: Tensor, teacher_hint: Tensor) -> Tensor:
    """FitNet hint loss (Romero et al. 2015): ``mean((r(f_s) - f_t)^2)`` over all elements.

    ``student_hint`` is the regressed student map (the output of :class:`ConvRegressor`),
    ``teacher_hint`` the teacher's hint, both ``(N, C_t, H_t, W_t)``; the teacher is detached.
    Same as mdistiller (``F.mse_loss``, mean reduction; the paper's 1/2 factor is folded into the
    weight). mdistiller's CIFAR weight: :data:`FITNET_WEIGHT` = 100 on the 2nd-stage output
    (:data:`FITNET_HINT_LAYER`), cross-entropy 1.0, single-stage training (the paper's two-stage
    hint pre-training is not used).
    """
    _check_same_shape(student_hint, teacher_hint, "fitnet_loss")
    return F.mse_loss(student_hint, teacher_hint.detach(), reduction="mean")


# -------------------------------------------------------------------------------------------- AT
def attention_map(f: Tensor, p: float = AT_P) -> Tensor:
    """Spatial attention map (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention").

    ``(N, C, H, W) -> (N, H*W)``: ``normalize(mean_c f^p)``, L2-normalised per sample (``F.normalize``,
    eps 1e-12), as mdistiller and the authors' code (mean over channels, not the paper's sum: the
    normalisation makes them equal).
    """
    if f.dim() != 4:
        raise ValueError(f"attention_map expects (N, C, H, W), got shape {tuple(f.shape)}")
    return F.normalize(f.pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], p: float = AT_P) -> Tensor:
    """Attention-transfer loss (Zagoruyko & Komodakis 2017).

    ``sum over pairs j of mean_{n, i} (a_s[n, i] - a_t[n, i])^2`` with ``a = attention_map(f, p)``:
    the exact reduction of mdistiller (``(at_s - at_t).pow(2).mean()`` per pair, summed over pairs),
    i.e. the squared L2 distance of the normalised maps averaged over the batch and divided by H*W
    (not the paper's ``beta/2 * ||.||_2`` norm). Where a pair's spatial sizes differ, the larger
    feature map is average-pooled (``adaptive_avg_pool2d``) to the smaller size before the attention
    (as mdistiller; it pools to a square ``(H, H)``, here to ``(H, W)``: the same on square maps).
    Channels may differ. The teacher side is detached.

    mdistiller's CIFAR setting: the three stage outputs (``feats[1:]``), ``p = 2``, weight
    :data:`AT_WEIGHT` = 1000, cross-entropy 1.0.
    """
    _check_paired(student_feats, teacher_feats, "at_loss")
    total: Tensor | None = None
    for f_s, f_t in zip(student_feats, teacher_feats):
        f_t = f_t.detach()
        (s_h, s_w), (t_h, t_w) = f_s.shape[-2:], f_t.shape[-2:]
        if s_h > t_h:
            f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_w))
        elif s_h < t_h:
            f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_w))
        term = (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
        total = term if total is None else total + term
    assert total is not None
    return total


# ------------------------------------------------------------------------------------------- CRD
class Embed(nn.Module):
    """CRD embedding head (Tian et al. 2020, "Contrastive Representation Distillation").

    ``(N, *) -> (N, dim_out)``: flatten, linear, L2-normalise. mdistiller divides by the norm with no
    epsilon; here ``F.normalize`` (eps 1e-12) so an all-zero row cannot give NaN.
    """

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class ContrastMemory(nn.Module):
    """CRD's two momentum-updated memories of embeddings and their negative sampling (Tian et al. 2020).

    Buffers (all in ``state_dict``): ``memory_s``/``memory_t`` ``(n_data, feat_dim)``, the student and
    teacher embeddings of every training sample (mdistiller's ``memory_v1``/``memory_v2``), initialised
    uniform in ``[-stdv, stdv]`` with ``stdv = 1/sqrt(feat_dim/3)``; ``z_s``/``z_t``, the NCE
    normalisation constants (-1 = not set yet).

    ``forward(v_s, v_t, idx, contrast_idx)`` returns ``(out_s, out_t)``, both ``(B, K+1)``, column 0 the
    positive: ``out_s[b, k] = exp(<memory_t[j], v_s[b]> / T) / Z_s`` (student anchor against teacher
    memory) and ``out_t[b, k] = exp(<memory_s[j], v_t[b]> / T) / Z_t``, ``j = contrast_idx[b, k]``.
    On the first call each ``Z`` is set to ``mean(out) * n_data`` of that batch (a Monte-Carlo estimate
    of the partition function, kept fixed afterwards), as mdistiller, but with ``torch.where`` on
    device tensors instead of ``.item()``, so no host synchronisation. After the scores are computed,
    in training mode, the rows ``idx`` are updated, ``m = momentum``:
    ``memory[idx] <- normalize(m * memory[idx] + (1 - m) * v)`` (mdistiller updates in eval mode too;
    calls under ``eval()`` leave the memory and ``Z`` alone here).

    Negatives (``contrast_idx`` None): ``nce_k`` indices per row drawn uniformly with replacement,

    * ``labels`` None: among all ``n_data`` indices except the row's own ``idx``
      (draw ``r`` in ``[0, n_data - 1)``, ``j = r + (r >= idx)``);
    * ``labels`` given (dataset labels, ``(n_data,)``): among the samples of the other classes, which
      is what mdistiller's CIFAR-100 CRD data loader supplies (``mode="exact"``, ``contrastive_index``
      from ``cls_negative``). Implemented without rejection: sample indices sorted by class, draw
      ``r`` in ``[0, n_data - n_c)`` and skip the class's contiguous block.

    mdistiller's own fallback (``AliasMethod`` over uniform unigrams) may draw the positive as a
    negative; the one used on CIFAR (the loader's ``contrastive_index``) does not. Sampling uses the
    given ``torch.Generator`` (on the memory's device) or the global RNG, entirely on device.
    ``contrast_idx`` given: ``(B, K+1)``, column 0 must be ``idx`` (mdistiller's convention).

    Note: this per-sample memory is close to ickd's IC-KD :class:`ickd.memory.bank.MemoryBank`
    (slot = sample index, momentum updates with re-normalisation) and could later share its
    machinery; it is kept self-contained here on purpose.
    """

    memory_s: Tensor
    memory_t: Tensor
    z_s: Tensor
    z_t: Tensor

    def __init__(
        self,
        feat_dim: int,
        n_data: int,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if n_data < 2 or nce_k < 1 or feat_dim < 1:
            raise ConfigError(
                f"CRD memory: need n_data >= 2, nce_k >= 1, feat_dim >= 1 "
                f"(got {n_data}, {nce_k}, {feat_dim}); defaults nce_k 16384, feat_dim 128"
            )
        if not nce_t > 0:
            raise ConfigError(f"CRD nce_t={nce_t!r} must be positive (default 0.07)")
        if not 0 <= momentum < 1:
            raise ConfigError(f"CRD momentum={momentum!r} must be in [0, 1) (default 0.5)")
        self.feat_dim, self.n_data, self.nce_k = feat_dim, n_data, nce_k
        self.nce_t, self.momentum = float(nce_t), float(momentum)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            init = torch.rand(n_data, feat_dim, generator=generator).mul_(2 * stdv).sub_(stdv)
            self.register_buffer(name, init)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        # Class-exclusive sampling tables (derived from `labels`, so not saved in state_dict).
        self.by_class: Tensor | None
        self.class_start: Tensor | None
        self.class_count: Tensor | None
        self.sample_class: Tensor | None
        if labels is None:
            self.by_class = self.class_start = self.class_count = self.sample_class = None
        else:
            labels = torch.as_tensor(labels).long().flatten().cpu()
            if labels.numel() != n_data:
                raise ConfigError(f"CRD memory: {labels.numel()} labels for n_data={n_data}")
            if labels.min() < 0:
                raise ConfigError("CRD memory: labels must be non-negative class indices")
            counts = torch.bincount(labels)
            if (counts > 0).sum() < 2:
                raise ConfigError("CRD memory: class-exclusive negatives need at least two classes")
            order = torch.argsort(labels, stable=True)
            starts = torch.cumsum(counts, 0) - counts
            self.register_buffer("by_class", order, persistent=False)
            self.register_buffer("class_start", starts, persistent=False)
            self.register_buffer("class_count", counts, persistent=False)
            self.register_buffer("sample_class", labels, persistent=False)

    def sample(self, idx: Tensor, k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``(B,) -> (B, K+1)`` contrast indices: column 0 = ``idx``, then ``k`` (default ``nce_k``)
        negatives, none equal to ``idx`` (nor of its class when ``labels`` were given)."""
        k = self.nce_k if k is None else k
        idx = idx.to(self.memory_s.device).long().flatten()
        b = idx.shape[0]
        if self.by_class is None:
            r = torch.randint(0, self.n_data - 1, (b, k), generator=generator, device=idx.device)
            neg = r + (r >= idx[:, None]).long()
        else:
            assert self.sample_class is not None and self.class_start is not None
            assert self.class_count is not None
            cls = self.sample_class[idx]
            start, count = self.class_start[cls][:, None], self.class_count[cls][:, None]
            span = (self.n_data - count).double()
            u = torch.rand((b, k), generator=generator, device=idx.device, dtype=torch.float64)
            r = torch.minimum((u * span).long(), (span - 1).long())
            pos = r + (r >= start).long() * count
            neg = self.by_class[pos]
        return torch.cat([idx[:, None], neg], dim=1)

    def _scores(self, memory: Tensor, v: Tensor, contrast_idx: Tensor) -> Tensor:
        b, k1 = contrast_idx.shape
        weight = memory.index_select(0, contrast_idx.reshape(-1)).view(b, k1, -1)
        return torch.exp(torch.bmm(weight, v.to(weight.dtype).unsqueeze(2)).squeeze(2) / self.nce_t)

    @torch.no_grad()
    def _update(self, memory: Tensor, v: Tensor, idx: Tensor) -> None:
        mixed = memory.index_select(0, idx) * self.momentum + v.to(memory.dtype) * (1 - self.momentum)
        memory.index_copy_(0, idx, F.normalize(mixed, dim=1))

    def forward(
        self,
        v_s: Tensor,
        v_t: Tensor,
        idx: Tensor,
        contrast_idx: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``v_s``, ``v_t``: ``(B, feat_dim)`` L2-normalised embeddings; ``idx``: ``(B,)`` dataset indices.
        Returns ``(out_s, out_t)``, each ``(B, K+1)`` (see the class docstring)."""
        if v_s.shape != v_t.shape or v_s.dim() != 2 or v_s.shape[1] != self.feat_dim:
            raise ValueError(
                f"ContrastMemory: embeddings must both be (B, {self.feat_dim}), got "
                f"{tuple(v_s.shape)} and {tuple(v_t.shape)}"
            )
        idx = idx.to(self.memory_s.device).long().flatten()
        if idx.shape[0] != v_s.shape[0]:
            raise ValueError(f"ContrastMemory: {idx.shape[0]} indices for a batch of {v_s.shape[0]}")
        if contrast_idx is None:
            contrast_idx = self.sample(idx, generator=generator)
        else:
            contrast_idx = contrast_idx.to(self.memory_s.device).long()
            if contrast_idx.dim() != 2 or contrast_idx.shape[0] != idx.shape[0] or contrast_idx.shape[1] < 2:
                raise ValueError(
                    f"ContrastMemory: contrast_idx must be (B, K+1) with B={idx.shape[0]}, K >= 1 "
                    f"(column 0 the positive), got {tuple(contrast_idx.shape)}"
                )
        out_s = self._scores(self.memory_t, v_s, contrast_idx)  # student anchor vs teacher memory
        out_t = self._scores(self.memory_s, v_t, contrast_idx)  # teacher anchor vs student memory
        n = float(self.n_data)
        z_s = torch.where(self.z_s < 0, out_s.detach().mean() * n, self.z_s)
        z_t = torch.where(self.z_t < 0, out_t.detach().mean() * n, self.z_t)
        if self.training:
            self.z_s.copy_(z_s)
            self.z_t.copy_(z_t)
            self._update(self.memory_s, v_s.detach(), idx)
            self._update(self.memory_t, v_t.detach(), idx)
        return out_s / z_s, out_t / z_t


def nce_contrast_loss(x: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """CRD's NCE loss (Tian et al. 2020; mdistiller's ``ContrastLoss``) on ``(B, K+1)``
    normalised scores ``x`` whose column 0 is the positive.

    With noise probability ``P_n = 1/n_data`` and ``m = K``:
    ``-(1/B) sum_b [ log(x_b0 / (x_b0 + m P_n + eps)) + sum_k log(m P_n / (x_bk + m P_n + eps)) ]``.
    Returns a scalar (the batch mean). Same as mdistiller (which returns a 1-element tensor).
    """
    if x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(f"nce_contrast_loss expects (B, K+1) scores with K >= 1, got {tuple(x.shape)}")
    b, m = x.shape[0], x.shape[1] - 1
    mpn = m / float(n_data)
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + mpn + eps))
    log_d0 = torch.log(mpn / (x[:, 1:] + mpn + eps))
    return -(log_d1.sum() + log_d0.sum()) / b


class CRDLoss(nn.Module):
    """Contrastive Representation Distillation loss (Tian et al. 2020), as mdistiller's ``CRD``.

    ``forward(f_s, f_t, idx, contrast_idx=None, generator=None) -> scalar``:
    ``f_s`` ``(B, s_dim)`` and ``f_t`` ``(B, t_dim)`` are the pooled penultimate features (mdistiller
    ``pooled_feat``: 256 and 256 for resnet8x4 / resnet32x4); ``idx`` ``(B,)`` the dataset indices of
    the batch; ``contrast_idx`` optional ``(B, K+1)`` with the positive first (else drawn by
    :meth:`ContrastMemory.sample`). Both features go through a trainable :class:`Embed` head
    (``embed_s``, ``embed_t``: the teacher's head is trained too, the teacher features are detached
    before it); the loss is ``NCE(out_s) + NCE(out_t)``, the student-anchored (``s -> t``: student
    embedding against teacher memory) and teacher-anchored (``t -> s``) terms.

    Defaults = mdistiller CIFAR-100: ``feat_dim`` 128, ``nce_k`` 16384, ``nce_t`` 0.07, ``momentum``
    0.5, weight :data:`CRD_WEIGHT` = 0.8 with cross-entropy 1.0 (and in mdistiller's ``crd.yaml`` also
    vanilla KD off). ``n_data`` is the training-set size (50000 on CIFAR-100). Pass the training
    ``labels`` to draw negatives from other classes, as mdistiller's CIFAR loader does; the memory
    and ``Z`` are updated only in training mode (see :class:`ContrastMemory`).
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        n_data: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, nce_k, nce_t, momentum, labels, generator)

    def forward(
        self,
        f_s: Tensor,
        f_t: Tensor,
        idx: Tensor,
        contrast_idx: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        v_s = self.embed_s(f_s)
        v_t = self.embed_t(f_t.detach())
        out_s, out_t = self.contrast(v_s, v_t, idx, contrast_idx, generator)
        n = self.contrast.n_data
        return nce_contrast_loss(out_s, n) + nce_contrast_loss(out_t, n)


# -------------------------------------------------------------------------------------- ReviewKD
class ABF(nn.Module):
    """Attention-based fusion (Chen et al. 2021, "Distilling Knowledge via Knowledge Review").

    ``forward(x, y=None, out_size=None) -> (out, residual)``: ``x`` ``(N, C_in, H, W)`` is a student
    feature, ``y`` ``(N, C_mid, h, w)`` the residual from the deeper level (upsampled, nearest, to
    ``H x W``). ``x' = BN(conv1x1(x))`` (``C_mid``); if ``fuse``: ``z = sigmoid(conv1x1([x', y]))``
    (2 maps) and ``x' = x' * z_0 + y * z_1``. ``x'`` is resized (nearest) to ``out_size`` if it differs,
    then ``out = BN(conv3x3(x'))`` ``(N, C_out, out_size)`` and ``residual = x'``. As mdistiller (incl.
    ``kaiming_uniform_(a=1)`` on the two convs, no bias on them); the residual's target size is taken
    from ``x`` instead of a separate ``shape`` argument (mdistiller's CIFAR shapes equal it).
    """

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channel)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        self.att_conv: nn.Module | None = (
            nn.Sequential(nn.Conv2d(2 * mid_channel, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: Tensor, y: Tensor | None = None, out_size: int | Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            if y is None:
                raise ValueError("ABF(fuse=True) needs the residual y of the deeper level")
            y = F.interpolate(y, size=tuple(x.shape[-2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0:1] + y * z[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != _hw(out_size):
            x = F.interpolate(x, size=_hw(out_size), mode="nearest")
        return self.conv2(x), x


class ReviewKDHead(nn.Module):
    """ReviewKD's review path (Chen et al. 2021): one :class:`ABF` per student level, fused deep to shallow.

    ``student_channels``/``teacher_channels``: per level, shallow to deep, the last level being the
    pooled feature. mdistiller CIFAR (resnet8x4 -> resnet32x4): student ``[64, 128, 256, 256]``
    (the three stage outputs + pooled), teacher ``[64, 128, 256, 256]``. ``mid_channel`` defaults to
    ``min(max_mid_channel, student_channels[-1])`` = 256 (mdistiller: ``min(512, in_channels[-1])``).
    The deepest ABF does not fuse; every other one fuses with the residual of the level below it.
    ``out_sizes`` (per level, ``H`` or ``(H, W)``): the teacher map sizes, default = the student's own
    (mdistiller ``OUT_SHAPES`` = ``SHAPES`` = ``[1, 8, 16, 32]`` deep to shallow on CIFAR).

    ``forward(feats) -> list``: ``feats`` shallow to deep, ``(N, C_i, H_i, W_i)`` each, the last may be
    ``(N, C)`` (pooled; viewed as ``(N, C, 1, 1)``); returns the outputs shallow to deep,
    ``(N, teacher_channels[i], out_size_i)``, to compare with the teacher's by :func:`hcl_loss`
    (mdistiller's teacher targets: pre-ReLU stage outputs ``preact_feats[1:]`` + pooled; the student
    inputs are the post-ReLU ``feats``). Deviation: ``abfs`` is stored shallow to deep (mdistiller
    stores it reversed), which only changes state_dict key numbers.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        mid_channel: int | None = None,
        max_mid_channel: int = 512,
        out_sizes: Sequence[int | Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels) or not student_channels:
            raise ConfigError(
                f"ReviewKD: {len(student_channels)} student levels vs {len(teacher_channels)} teacher "
                "levels; give one channel count per level for both (shallow to deep, pooled last)"
            )
        if out_sizes is not None and len(out_sizes) != len(student_channels):
            raise ConfigError(f"ReviewKD: {len(out_sizes)} out_sizes for {len(student_channels)} levels")
        mid = min(max_mid_channel, student_channels[-1]) if mid_channel is None else mid_channel
        self.mid_channel = mid
        last = len(student_channels) - 1
        self.abfs = nn.ModuleList(
            ABF(c_s, mid, c_t, fuse=i < last)
            for i, (c_s, c_t) in enumerate(zip(student_channels, teacher_channels))
        )
        self.out_sizes = None if out_sizes is None else [_hw(s) for s in out_sizes]

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.abfs):
            raise ValueError(f"ReviewKDHead: {len(feats)} features for {len(self.abfs)} levels")
        xs = [f if f.dim() == 4 else f.reshape(f.shape[0], -1, 1, 1) for f in feats]
        outs: list[Tensor] = []
        residual: Tensor | None = None
        for i in range(len(xs) - 1, -1, -1):
            size = tuple(xs[i].shape[-2:]) if self.out_sizes is None else self.out_sizes[i]
            out, residual = self.abfs[i](xs[i], residual, size)
            outs.append(out)
        return outs[::-1]


def hcl_loss(fstudent: Sequence[Tensor], fteacher: Sequence[Tensor]) -> Tensor:
    """Hierarchical context loss of ReviewKD (Chen et al. 2021), as mdistiller's ``hcl_loss``.

    For each level (``(N, C, H, W)`` pairs of equal shape; ``(N, C)`` is treated as ``1x1``):
    ``MSE(f_s, f_t)`` at full size with weight 1, plus, for each ``l`` in :data:`HCL_LEVELS` = (4, 2, 1)
    with ``l < H``, ``MSE(pool_l(f_s), pool_l(f_t))`` (``adaptive_avg_pool2d`` to ``l x l``) with
    weight halved for each level used (1/2, 1/4, 1/8, ...); the level's sum is divided by the sum of
    the weights used (e.g. 8x8: weights 1, 1/2, 1/4, 1/8, total 1.875; 4x4: 1, 1/2, 1/4; 1x1: 1).
    The levels are summed. The teacher side is detached. mdistiller's CIFAR weight:
    :data:`REVIEWKD_WEIGHT` (1.0 in cfg.py, 5.0 in its resnet32x4 -> resnet8x4 config), times a linear
    warm-up ``min(epoch / 20, 1)`` (:data:`REVIEWKD_WARMUP_EPOCHS`; not applied here).
    """
    _check_paired(fstudent, fteacher, "hcl_loss")
    total: Tensor | None = None
    for fs, ft in zip(fstudent, fteacher):
        ft = ft.detach()
        fs = fs[:, :, None, None] if fs.dim() == 2 else fs
        ft = ft[:, :, None, None] if ft.dim() == 2 else ft
        _check_same_shape(fs, ft, "hcl_loss")
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction="mean")
        weight, weight_sum = 1.0, 1.0
        for level in HCL_LEVELS:
            if level >= h:
                continue
            weight /= 2.0
            pooled = F.mse_loss(
                F.adaptive_avg_pool2d(fs, (level, level)), F.adaptive_avg_pool2d(ft, (level, level))
            )
            loss = loss + pooled * weight
            weight_sum += weight
        loss = loss / weight_sum
        total = loss if total is None else total + loss
    assert total is not None
    return total
