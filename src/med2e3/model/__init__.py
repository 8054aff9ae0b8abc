"""The Med-2E3 network: ViT3D, connectors and TG-IS, and the conditional-generation model."""

from med2e3.model.modeling import (
    STAGE_TRAINABLE,
    Med2E3CausalLMOutput,
    Med2E3ForConditionalGeneration,
    Med2E3PreTrainedModel,
    VolumeEncoding,
)

__all__ = [
    "STAGE_TRAINABLE",
    "Med2E3CausalLMOutput",
    "Med2E3ForConditionalGeneration",
    "Med2E3PreTrainedModel",
    "VolumeEncoding",
]
