"""A method that is the sum of other methods' losses: ``distill=dkd+ickd`` (DKD plus IC-KD's in-context
terms), ``crd+ickd``, ``kd+picd``, or any ``terms`` a YAML declares.

Config::

    name: dkd+ickd
    terms:                # term name -> that method's own config section (its ``name`` or ``_target_``)
      dkd: {name: dkd, ...}
      incontext: {name: incontext, ...}

Each term keeps its own weights; the losses are merged into one dict, and two terms returning the
same loss name is an error (e.g. two CE terms: give one of them ``ce_weight: 0`` is not enough, as
the key still appears; use a term without CE such as ``incontext``). The composite needs a teacher,
a bank or features when any term does.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ickd.errors import ConfigError
from ickd.methods.base import Method, MethodContext, StepOutputs
from ickd.methods.registry import METHODS, create_method


@METHODS.register("composite")
class Composite(Method):
    def __init__(self, cfg: Mapping[str, Any], context: MethodContext | None = None) -> None:
        super().__init__({k: v for k, v in dict(cfg).items() if k != "terms"}, context)
        terms = cfg.get("terms")
        if not terms:
            raise ConfigError(f"distill={cfg.get('name')!r} composes methods but declares no `terms`; "
                              "list them as `terms: {name: {name: <method>, ...}, ...}`")
        self.terms = nn.ModuleDict({str(key): create_method(dict(term), context) for key, term in dict(terms).items()})
        self.needs_teacher = any(t.needs_teacher for t in self.terms.values())
        self.needs_bank = any(t.needs_bank for t in self.terms.values())
        self.needs_features = tuple(dict.fromkeys(f for t in self.terms.values() for f in t.needs_features))
        self._checked = False

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for key, term in self.terms.items():
            part = term(out)
            if not self._checked:
                clash = set(part) & set(losses)
                if clash:
                    raise ConfigError(
                        f"distill={self.cfg.get('name')!r}: term {key!r} returns loss(es) {sorted(clash)} that an earlier "
                        "term returns too; compose terms with distinct losses (e.g. `incontext` instead of `ickd`, "
                        "which has its own CE and KD)"
                    )
            losses.update(part)
        self._checked = True
        return losses
