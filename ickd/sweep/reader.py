"""StudyReader: the read-only view of a study that reports (``ickd report``, ``ickd compare``, the
demo) use, instead of reaching into the sweep CLI, the storage or the study files.

The handful of calls a report needs: the study's name, folder, storage label (redacted), frozen spec,
the Optuna study (read), its trials, their counts by state, the best trial and the ``ickd train``
overrides of a trial. ``ickd sweep status``/``best`` use the same counting and best-trial rules.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from ickd.sweep.space import params_to_overrides
from ickd.sweep.spec import StudySpec
from ickd.sweep.studies import StudyHandle


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state name, with budget-skipped trials counted apart as SKIPPED."""
    counts = {s.name: 0 for s in TrialState}
    skipped = 0
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("skipped"):
            skipped += 1
        else:
            counts[t.state.name] += 1
    counts["SKIPPED"] = skipped
    return counts


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


class StudyReader:
    """Open with :meth:`open` (a study name under the root, or a folder) or wrap a StudyHandle."""

    def __init__(self, handle: StudyHandle) -> None:
        self._handle = handle
        self._study: optuna.Study | None = None

    @classmethod
    def open(cls, study: "str | os.PathLike | StudyHandle | StudyReader", root: str | os.PathLike | None = None) -> "StudyReader":
        if isinstance(study, StudyReader):
            return study
        return cls(study if isinstance(study, StudyHandle) else StudyHandle.load(study, root))

    @property
    def name(self) -> str:
        return self._handle.spec.name

    @property
    def folder(self) -> Path:
        return self._handle.dir

    @property
    def storage_label(self) -> str:
        """Where the trials are stored, redacted (never a password)."""
        return self._handle.storage_label

    @property
    def spec(self) -> StudySpec:
        return self._handle.spec

    def study(self) -> optuna.Study:
        """The Optuna study (loaded once per reader)."""
        if self._study is None:
            self._study = self._handle.study()
        return self._study

    def trials(self) -> list[FrozenTrial]:
        """Every trial except the budget-skipped ones."""
        return [t for t in self.study().get_trials(deepcopy=False) if not t.user_attrs.get("skipped")]

    def counts(self) -> dict[str, int]:
        """Trials by state (only states with trials), as ``ickd sweep status`` counts them."""
        return {k: v for k, v in trial_counts(self.study()).items() if v}

    def best(self) -> FrozenTrial | None:
        return best_trial(self.study())

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The ``ickd train`` overrides of a trial with ``params``: the study's base, then the params."""
        return [*self.spec.base, *params_to_overrides(params)]
