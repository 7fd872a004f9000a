"""How much in-context signal an IC-KD configuration carries, measured on real batches.

Two questions decide whether IC-KD can differ from KD at all (docs/method.md, "Revision 2"):

* Are the retrieved neighbours' similarities informative? If the top-k cosines of a row are all
  alike, ``softmax(s / tau_r)`` weights are uniform and similarity weighting is inert.
* Does each term push the student with a comparable force? A term whose gradient is a few percent
  of KD's is inert whatever its weight; a PICD gradient parallel to KD's is KD at a larger weight.

:func:`signal_diagnostics` answers both for an offline distiller (a frozen teacher, a filled bank):
similarity statistics of the retrieved rows, the spread of the PICD weights, and the gradient norm
of every weighted loss term on the student's parameters, with the cosine between PICD's and KD's
gradients. ``bench/validity.py`` prints them; the tests hold the shipped defaults to the issue's
acceptance bounds with them.
"""
from __future__ import annotations

import statistics
from typing import Any, Iterable

import torch

from ickd.distill.paradigms import OfflineDistiller
from ickd.errors import ConfigError
from ickd.losses import neighbour_weights
from ickd.methods import StepOutputs

__all__ = ["signal_diagnostics", "fill_bank", "FIRST_IMPLEMENTATION"]

#: Overrides that restore the first implementation's retrieval and weights (docs/method.md,
#: "Revision 2"): the baseline the shipped defaults are measured against.
FIRST_IMPLEMENTATION = (
    "memory.feature_transform=none",
    "distill.tau_r=0.1",
    "distill.nicd_temperature=null",
    "distill.picd_weight=1.0",
    "distill.nicd_weight=0.5",
)


@torch.no_grad()
def fill_bank(distiller: OfflineDistiller, data: Any, batch_size: int = 500, seed: int = 0) -> None:
    """The trainer's fill pass (shuffled when the bank holds fewer than N entries)."""
    bank = distiller.banks["teacher"]
    loader = data.train_loader(batch_size, shuffle=bank.size < bank.num_samples, augment=False, seed=seed)
    loader.set_epoch(0)
    distiller.eval()
    distiller.fill_banks(loader)


def _flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def signal_diagnostics(
    distiller: OfflineDistiller, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], epoch: int = 10**6
) -> dict[str, Any]:
    """Similarity and gradient statistics of an offline IC-KD distiller over ``batches``.

    ``epoch`` defaults to past any warm-up, so the terms enter at their full weight. Returns a dict:
    ``sim_mean``, ``sim_row_std`` (mean within-row std of the top-k similarities), ``sim_row_spread``
    (median within-row max - min), ``pos_frac``, ``weight_ratio`` (median largest/smallest PICD weight
    in rows with >= 2 positives), ``grad_norm`` (per weighted term: mean over batches of the L2 norm
    of its gradient on the student's parameters), ``grad_share`` (each norm / the KD term's, i.e. of
    w_kd * KD), ``cos_picd_kd`` (mean cosine of the PICD and KD gradients) and ``batches``.
    """
    if not isinstance(distiller, OfflineDistiller) or "teacher" not in distiller.banks or distiller.teacher is None:
        raise ConfigError("signal diagnostics need an offline IC-KD distiller with a teacher and its memory bank (distill=ickd paradigm=offline)")
    bank = distiller.banks["teacher"]
    method = distiller.method
    tau_r = float(method.cfg["tau_r"])
    weighting = str(method.cfg["picd_weighting"])
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    distiller.eval()  # fixed BN statistics: the measurement must not change the student
    spreads, row_stds, means, pos_fracs, ratios, cosines = [], [], [], [], [], []
    norms: dict[str, list[float]] = {}
    count = 0
    for x, y, idx in batches:
        with torch.no_grad():
            t_logits, t_feats = distiller.teacher(x)
        s_logits, _ = distiller.student(x)
        nb = distiller.retrieval.retrieve(bank, t_feats.float(), y, idx)
        sims, valid = nb.sims.float(), nb.valid
        n_valid = valid.sum(dim=1)
        rows = n_valid >= 2
        big, small = torch.finfo(sims.dtype).max, torch.finfo(sims.dtype).min
        row_max = torch.where(valid, sims, torch.full_like(sims, small)).amax(dim=1)
        row_min = torch.where(valid, sims, torch.full_like(sims, big)).amin(dim=1)
        spreads.extend((row_max - row_min)[rows].tolist())
        mean_row = (sims * valid).sum(dim=1) / n_valid.clamp(min=1)
        var_row = (((sims - mean_row[:, None]) ** 2) * valid).sum(dim=1) / n_valid.clamp(min=1)
        row_stds.extend(var_row[rows].sqrt().tolist())
        means.append(float((sims * valid).sum() / valid.sum().clamp(min=1)))
        pos_fracs.append(float((nb.positive & valid).sum() / valid.sum().clamp(min=1)))
        w = neighbour_weights(nb.positive, nb.sims, tau_r, weighting)
        pos_rows = nb.positive.sum(dim=1) >= 2
        w_max = torch.where(nb.positive, w, torch.zeros_like(w)).amax(dim=1)
        w_min = torch.where(nb.positive, w, torch.full_like(w, big)).amin(dim=1)
        ratios.extend((w_max / w_min.clamp(min=1e-30))[pos_rows].tolist())
        losses = method(StepOutputs(s_logits, t_logits, y, idx, epoch, nb))
        grads = {name: _flat_grad(loss, params) for name, loss in losses.items() if loss.requires_grad}
        for name, g in grads.items():
            norms.setdefault(name, []).append(float(g.norm()))
        if "picd" in grads and "kd" in grads:
            cosines.append(float(torch.nn.functional.cosine_similarity(grads["picd"], grads["kd"], dim=0)))
        count += 1
    if count == 0:
        raise ConfigError("signal diagnostics got no batches; pass at least one (x, y, idx) batch")
    grad_norm = {name: statistics.fmean(v) for name, v in norms.items()}
    kd = grad_norm.get("kd")
    return {
        "batches": count,
        "sim_mean": statistics.fmean(means),
        "sim_row_std": statistics.fmean(row_stds) if row_stds else 0.0,
        "sim_row_spread": statistics.median(spreads) if spreads else 0.0,
        "pos_frac": statistics.fmean(pos_fracs),
        "weight_ratio": statistics.median(ratios) if ratios else 1.0,
        "grad_norm": grad_norm,
        "grad_share": {name: (v / kd if kd else float("nan")) for name, v in grad_norm.items()},
        "cos_picd_kd": statistics.fmean(cosines) if cosines else float("nan"),
    }
