"""med2e3: Med-2E3, a 3D medical multimodal LLM with dual 3D/2D encoders and text-guided slice scoring."""

from med2e3.config import Med2E3Config, ViT3DConfig
from med2e3.data.processor import Med2E3Processor
from med2e3.model import Med2E3ForConditionalGeneration, VolumeEncoding

__version__ = "0.1.0"

__all__ = ["Med2E3Config", "Med2E3ForConditionalGeneration", "Med2E3Processor", "ViT3DConfig", "VolumeEncoding"]
