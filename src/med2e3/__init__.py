"""med2e3: Med-2E3, a 3D medical multimodal LLM with dual 3D/2D encoders and text-guided slice scoring.

The public names are imported on first use, so that light entry points (``med2e3 --help``, the error
types) do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Med2E3Config": "med2e3.config",
    "ViT3DConfig": "med2e3.config",
    "Med2E3Processor": "med2e3.data.processor",
    "Med2E3ForConditionalGeneration": "med2e3.model",
    "VolumeEncoding": "med2e3.model",
}

__all__ = [
    "Med2E3Config",
    "Med2E3ForConditionalGeneration",
    "Med2E3Processor",
    "ViT3DConfig",
    "VolumeEncoding",
]

if TYPE_CHECKING:
    from med2e3.config import Med2E3Config, ViT3DConfig
    from med2e3.data.processor import Med2E3Processor
    from med2e3.model import Med2E3ForConditionalGeneration, VolumeEncoding


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'med2e3' has no attribute {name!r}")
