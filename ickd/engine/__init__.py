from ickd.engine.callbacks import Callback, RunInfo
from ickd.engine.run import train
from ickd.engine.trainer import Trainer, TrainerConfig

__all__ = ["Callback", "RunInfo", "Trainer", "TrainerConfig", "train"]
