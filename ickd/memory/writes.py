"""Write rules of the memory bank: the update rule and the feature transform.

* :class:`UpdateRule`: ``frozen`` (updates are no-ops), ``overwrite`` (replace) or ``momentum``
  (``m*old + (1-m)*new`` for the feature, re-normalised, and the logits, only where the slot already
  holds that sample; a first write is plain). Whether a layout can mix at all is the slot policy's
  :attr:`~ickd.memory.slots.SlotPolicy.keeps_history` (a FIFO queue enqueues instead).
* :class:`FeatureTransform`: ``none``, ``center`` or ``center_whiten`` (module docstring of
  :mod:`ickd.memory.bank`): the stored mean ``mu`` (an EMA over written batches, set exactly by a
  fill pass), the whitening fitted at the end of a fill pass, and the map ``u = normalize(T(v))``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ickd import fastpath
from ickd.errors import ConfigError

__all__ = ["UpdateRule", "FeatureTransform"]

_CHUNK = 65536  # rows per step when a fill pass's end reads or rewrites the whole bank


class UpdateRule:
    """How ``update`` writes: ``frozen``, ``overwrite`` or ``momentum`` with factor ``momentum``."""

    def __init__(self, name: str, momentum: float) -> None:
        self.name, self.momentum = name, float(momentum)

    @property
    def frozen(self) -> bool:
        return self.name == "frozen"

    def mixes(self, keeps_history: bool) -> bool:
        """Whether an update mixes with the old entry, for a layout that does (or not) keep one."""
        return self.name == "momentum" and keeps_history

    def mix(
        self,
        slots: torch.Tensor,
        idx: torch.Tensor,
        f: torch.Tensor,
        z: torch.Tensor,
        feats: torch.Tensor,
        logits: torch.Tensor,
        sample_idx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows to store: the momentum mix of ``f``, ``z`` with the slots' entries where the slot
        already holds that sample, else ``f``, ``z`` themselves."""
        m_ = self.momentum
        had = (sample_idx[slots] == idx).unsqueeze(1)
        mixed_f = F.normalize(m_ * feats[slots].float() + (1.0 - m_) * f, dim=1)
        mixed_z = m_ * logits[slots] + (1.0 - m_) * z
        return torch.where(had, mixed_f, f), torch.where(had, mixed_z, z)


class FeatureTransform:
    """The bank's feature transform and its state (``mu``, ``mu_set``, ``whiten``)."""

    def __init__(
        self, kind: str, feature_dim: int, center_momentum: float, whiten_eps: float, device: torch.device
    ) -> None:
        self.kind, self.feature_dim = kind, feature_dim
        self.center_momentum, self.whiten_eps, self.device = float(center_momentum), float(whiten_eps), device
        # mu_set is a device flag so that the first online write can initialise mu without the host
        # looking at it.
        self.mu = torch.zeros(feature_dim, dtype=torch.float32, device=device)
        self.mu_set = torch.zeros((), dtype=torch.bool, device=device)
        self.known_set = False  # a host mirror of mu_set once it is known True (no sync to read)
        self.whiten: torch.Tensor | None = None  # (D, D) float32: T(v) = (v - mu) @ whiten

    @property
    def needs_whitening(self) -> bool:
        """``center_whiten`` without its whitening yet (no fill pass has ended)."""
        return self.kind == "center_whiten" and self.whiten is None

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """u = normalize(T(v)) for normalised float32 rows ``v``."""
        if self.kind == "none":
            return v
        c = v - self.mu
        if self.whiten is not None:
            # In fp32 whatever the caller's autocast: the fill pass and the bank writes run inside
            # the step's bf16 autocast, and a bf16 whitening of entries would not match the fp32
            # whitening of the queries (retrieval runs with autocast off).
            with torch.autocast(c.device.type, enabled=False):
                c = c @ self.whiten
        return F.normalize(c, dim=1)

    def track_mean(self, f: torch.Tensor) -> None:
        """mu <- c*mu + (1-c)*mean(f), or mean(f) for the first batch (device ops only, no sync)."""
        if self.kind == "none":
            return
        batch_mean = f.mean(dim=0)
        c = self.center_momentum
        if self.known_set and fastpath.enabled("lean_bank"):
            # The same two products and sum, in place (4 ops, not 7); bit-identical.
            self.mu.mul_(c).add_(batch_mean * (1.0 - c))
            return
        self.mu.copy_(torch.where(self.mu_set, c * self.mu + (1.0 - c) * batch_mean, batch_mean))
        self.mu_set.fill_(True)
        self.known_set = True

    def reset(self) -> None:
        """A fill pass begins: mu unset, no whitening."""
        with torch.no_grad():
            self.mu.zero_()
            self.mu_set.fill_(False)
        self.known_set = False
        self.whiten = None

    @torch.no_grad()
    def fit(self, feats: torch.Tensor, sample_idx: torch.Tensor, feature_dtype: torch.dtype) -> bool:
        """End of a fill pass: set mu (and the whitening) exactly from the entries of ``feats`` whose
        slot holds a sample, and transform those entries in place. False when nothing changed."""
        if self.kind == "none":
            return False
        rows = torch.nonzero(sample_idx >= 0).squeeze(1)
        n = int(rows.numel())
        if n == 0:
            if self.kind == "center_whiten":
                raise ConfigError(
                    "memory.feature_transform=center_whiten: the fill pass wrote no entries, so there is nothing "
                    "to whiten; check the training set, or use memory.feature_transform=center"
                )
            return False  # mu stays unset: the first write initialises it
        chunks = rows.split(_CHUNK)
        total = torch.zeros(self.feature_dim, dtype=torch.float64, device=self.device)
        for ch in chunks:
            total += feats[ch].double().sum(dim=0)
        mu = total / n
        if self.kind == "center_whiten":
            if n < 2:
                raise ConfigError(
                    f"memory.feature_transform=center_whiten needs at least 2 entries to estimate a covariance, "
                    f"the fill pass wrote {n}; use memory.feature_transform=center"
                )
            cov = torch.zeros(self.feature_dim, self.feature_dim, dtype=torch.float64, device=self.device)
            for ch in chunks:
                x = feats[ch].double() - mu
                cov += x.T @ x
            cov /= n
            evals, evecs = torch.linalg.eigh(cov)
            evals = evals.clamp(min=0.0)
            eps = self.whiten_eps * float(evals.mean()) or 1e-12  # all-equal entries: any tiny eps
            # PCA whitening: coordinates along the eigenvectors, each scaled to unit variance.
            self.whiten = (evecs * (evals + eps).rsqrt()).float()
        self.mu.copy_(mu.float())
        self.mu_set.fill_(True)
        self.known_set = True
        for ch in chunks:
            feats.index_copy_(0, ch, self.apply(feats[ch].float()).to(feature_dtype))
        return True

    def load(self, mu: torch.Tensor | None, mu_set: torch.Tensor | None, whiten: torch.Tensor | None) -> None:
        """Restore saved state (None mu: a version-1 checkpoint, untransformed)."""
        with torch.no_grad():
            if mu is None or mu_set is None:
                self.mu.zero_()
                self.mu_set.fill_(False)
            else:
                self.mu.copy_(mu.to(self.device, torch.float32))
                self.mu_set.copy_(mu_set.to(self.device, torch.bool))
        self.known_set = bool(self.mu_set)  # one read at load time
        self.whiten = None if whiten is None else whiten.to(self.device, torch.float32)
