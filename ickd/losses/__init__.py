"""Distillation losses as pure functions: tensors in, scalar out (equations in docs/method.md)."""
from ickd.losses.incontext import (
    AGGREGATES,
    NICD_FORMS,
    WEIGHTINGS,
    aggregate_positive_targets,
    aggregate_positive_targets_at,
    neighbour_weights,
    nicd_contrastive_bound,
    nicd_loss,
    picd_loss,
)
from ickd.losses.kd import dkd_loss, kd_loss, student_log_probs

__all__ = [
    "kd_loss",
    "student_log_probs",
    "dkd_loss",
    "aggregate_positive_targets",
    "aggregate_positive_targets_at",
    "picd_loss",
    "nicd_loss",
    "neighbour_weights",
    "nicd_contrastive_bound",
    "WEIGHTINGS",
    "AGGREGATES",
    "NICD_FORMS",
]
