"""Training: one entry point (`train`) driven by YAML configs (`configs/`).

``import med2e3.training`` reads configs only; `train` (torch, transformers, the model) is imported when used.
"""

from typing import Any

from med2e3.training.config import TrainConfig, load_config
from med2e3.training.runs import preflight

__all__ = ["TrainConfig", "load_config", "preflight", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from med2e3.training.trainer import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
