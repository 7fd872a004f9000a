from ickd.distill.build import build_distiller
from ickd.distill.methods import METHODS, LossMethod, create_method
from ickd.distill.paradigms import PARADIGMS, Distiller, StepOutput

__all__ = ["METHODS", "PARADIGMS", "Distiller", "LossMethod", "StepOutput", "build_distiller", "create_method"]
