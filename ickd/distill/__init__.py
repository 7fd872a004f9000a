"""Paradigms (offline, online, teacher-free): where a method's teacher outputs and memory bank come
from. The methods themselves live in ``ickd.methods``."""
from ickd.distill.build import build_distiller
from ickd.distill.paradigms import PARADIGMS, Distiller, StepOutput

__all__ = ["PARADIGMS", "Distiller", "StepOutput", "build_distiller"]
