"""Training: one entry point (`train`) driven by YAML configs (`configs/`)."""

from med2e3.training.config import TrainConfig, load_config
from med2e3.training.trainer import train

__all__ = ["TrainConfig", "load_config", "train"]
