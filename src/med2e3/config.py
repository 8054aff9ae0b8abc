"""Configuration of Med-2E3: the one place where dimensions live.

`Med2E3Config` composes four sub-configs — the causal LLM (`text_config`, Phi-3 by
default), the 2D slice encoder (`vision2d_config`, SigLIP), the 3D encoder
(`vision3d_config`, our `ViT3DConfig`) and the TG-IS question encoder
(`question_encoder_config`, BERT) — plus the named fields of the method
(pooling, slices, TG-IS temperature and dropout, feature selection).

Presets are plain configs: ``Med2E3Config.from_preset("tiny")``.
"""

from __future__ import annotations

from typing import Any, Literal

from transformers import AutoConfig, BertConfig, PreTrainedConfig, SiglipVisionConfig
from transformers.configuration_utils import SubConfigSpec

from med2e3.errors import ConfigError

SliceAggregation = Literal["tgis", "mean", "none"]
SLICE_AGGREGATIONS: tuple[str, ...] = ("tgis", "mean", "none")


def _triple(value: int | list[int] | tuple[int, ...], field: str) -> list[int]:
    values = [value] * 3 if isinstance(value, int) else list(value)
    if len(values) != 3 or not all(isinstance(v, int) and v > 0 for v in values):
        raise ConfigError(f"{field} must be a positive int or three positive ints, got {value!r}")
    return values


class ViT3DConfig(PreTrainedConfig):
    """The 3D ViT of M3D-CLIP (MONAI-style): patch embedding, CLS token, pre-norm blocks, final norm.

    `image_size` and `patch_size` are (D, H, W). `intermediate_size` is MONAI's `mlp_dim`.
    """

    model_type = "med2e3_vit3d"

    in_channels: int = 1
    image_size: list[int] | tuple[int, ...] = (32, 256, 256)
    patch_size: list[int] | tuple[int, ...] = (4, 16, 16)
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    qkv_bias: bool = False
    dropout_rate: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self, **kwargs: Any) -> None:
        self.image_size = _triple(self.image_size, "vision3d_config.image_size")
        self.patch_size = _triple(self.patch_size, "vision3d_config.patch_size")
        for axis, (size, patch) in enumerate(zip(self.image_size, self.patch_size, strict=True)):
            if size % patch:
                raise ConfigError(
                    f"vision3d_config.image_size[{axis}]={size} is not divisible by patch_size[{axis}]={patch}"
                )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision3d_config.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        super().__post_init__(**kwargs)

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Number of patches along (D, H, W)."""
        d, h, w = (s // p for s, p in zip(self.image_size, self.patch_size, strict=True))
        return d, h, w


class Med2E3Config(PreTrainedConfig):
    """Composite config of `Med2E3ForConditionalGeneration`.

    Args (beyond the four sub-configs):
        slice_aggregation: how the per-slice 2D tokens are combined: ``"tgis"`` (text-guided
            inter-slice scores, the paper), ``"mean"`` (uniform weights) or ``"none"`` (3D tokens only,
            no 2D branch at all).
        pool_size: kernel and stride of the 3D average pooling applied to the 3D patch grid.
        tgis_temperature: tau in ``softmax(<z_j, t> / tau)``.
        tgis_score_dropout: dropout applied to the slice scores in training (the release uses 0.1).
        vision3d_feature_layer: which ViT3D block output feeds the connector (index into the list of
            block outputs; -1 = last block, taken before the final LayerNorm, CLS dropped).
        vision2d_feature_layer: index into SigLIP's ``hidden_states`` (-1 = last encoder layer,
            before SigLIP's post-layernorm).
        vision2d_normalize: apply SigLIP's mean/std (0.5/0.5) normalisation to slices; the release
            feeds [0, 1] slices as they are (False).
        image_token: the placeholder token of the tokenizer where the visual tokens go.
        image_token_id: its id; the processor expands it to `num_image_tokens` copies.
    """

    model_type = "med2e3"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="phi3"),
        "vision2d_config": SiglipVisionConfig,
        "vision3d_config": ViT3DConfig,
        "question_encoder_config": BertConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    vision2d_config: dict | PreTrainedConfig | None = None
    vision3d_config: dict | PreTrainedConfig | None = None
    question_encoder_config: dict | PreTrainedConfig | None = None
    slice_aggregation: str = "tgis"
    pool_size: int = 2
    tgis_temperature: float = 5.0
    tgis_score_dropout: float = 0.1
    vision3d_feature_layer: int = -1
    vision2d_feature_layer: int = -1
    vision2d_normalize: bool = False
    projector_hidden_act: str = "gelu"
    image_token: str = "<image3d>"
    image_token_id: int = 32011
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._validate()

    # ---- validation -------------------------------------------------------------------------------
    def _validate(self) -> None:
        if self.slice_aggregation not in SLICE_AGGREGATIONS:
            raise ConfigError(
                f"slice_aggregation must be one of {SLICE_AGGREGATIONS}, got {self.slice_aggregation!r}"
            )
        if self.tgis_temperature <= 0:
            raise ConfigError(f"tgis_temperature must be > 0, got {self.tgis_temperature}")
        if not 0.0 <= self.tgis_score_dropout < 1.0:
            raise ConfigError(f"tgis_score_dropout must be in [0, 1), got {self.tgis_score_dropout}")
        v3 = self.vision3d_config
        if self.pool_size < 1:
            raise ConfigError(f"pool_size must be >= 1, got {self.pool_size}")
        for axis, n in zip("DHW", v3.grid_size, strict=True):
            if n % self.pool_size:
                raise ConfigError(
                    f"pool_size={self.pool_size} does not divide the 3D patch grid along {axis} "
                    f"({n} patches = vision3d_config.image_size / patch_size)"
                )
        if not -v3.num_hidden_layers <= self.vision3d_feature_layer < v3.num_hidden_layers:
            raise ConfigError(
                f"vision3d_feature_layer={self.vision3d_feature_layer} is out of range for "
                f"{v3.num_hidden_layers} blocks"
            )
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ConfigError(
                f"image_token_id={self.image_token_id} is outside the LLM vocabulary "
                f"(text_config.vocab_size={self.text_config.vocab_size})"
            )
        if self.slice_aggregation == "none":
            return
        v2 = self.vision2d_config
        depth, height, width = v3.image_size
        if height != width or v2.image_size != height:
            raise ConfigError(
                f"vision2d_config.image_size={v2.image_size} must equal the volume's slice size "
                f"(vision3d_config.image_size H x W = {height} x {width})"
            )
        if self.depth_groups == 0 or depth % self.depth_groups:
            raise ConfigError(
                f"the {depth} slices cannot be split evenly into the {self.depth_groups} pooled 3D depth groups "
                "(vision3d_config.image_size[0] / patch_size[0] / pool_size)"
            )
        n_layers = v2.num_hidden_layers + 1  # hidden_states holds the embeddings too
        if not -n_layers <= self.vision2d_feature_layer < n_layers:
            raise ConfigError(
                f"vision2d_feature_layer={self.vision2d_feature_layer} is out of range for "
                f"{v2.num_hidden_layers} SigLIP layers"
            )

    # ---- derived geometry -------------------------------------------------------------------------
    @property
    def num_slices(self) -> int:
        """Depth slices of the model's input volume (each is one 2D-encoder image)."""
        return self.vision3d_config.image_size[0]

    @property
    def depth_groups(self) -> int:
        """Depth extent of the pooled 3D grid: each group covers num_slices / depth_groups slices."""
        return self.vision3d_config.grid_size[0] // self.pool_size

    @property
    def num_3d_tokens(self) -> int:
        d, h, w = (n // self.pool_size for n in self.vision3d_config.grid_size)
        return d * h * w

    @property
    def num_2d_tokens(self) -> int:
        """2D tokens per slice (SigLIP patches; SigLIP has no CLS token)."""
        if self.slice_aggregation == "none":
            return 0
        return (self.vision2d_config.image_size // self.vision2d_config.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens written into the LLM sequence at the placeholder."""
        return self.num_3d_tokens + self.num_2d_tokens

    @property
    def volume_shape(self) -> tuple[int, int, int, int]:
        """Expected (C, D, H, W) of one preprocessed volume."""
        v3 = self.vision3d_config
        return (v3.in_channels, *v3.image_size)

    # ---- presets ----------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Med2E3Config:
        """Build a preset config (``"paper"`` or ``"tiny"``); keyword overrides replace top-level fields."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        fields = {**PRESETS[name](), **overrides}
        return cls(**fields)


def _paper() -> dict[str, Any]:
    """The published model: Phi-3-mini-128k-instruct, SigLIP-large-patch16-256, M3D-CLIP ViT3D, BERT-base."""
    return {
        "text_config": {
            "model_type": "phi3",
            "vocab_size": 32064,
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "bos_token_id": 1,
            "eos_token_id": 32000,
            "pad_token_id": 32000,
        },
        "vision2d_config": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 256,
            "patch_size": 16,
            "vision_use_head": False,
        },
        "vision3d_config": {
            "image_size": [32, 256, 256],
            "patch_size": [4, 16, 16],
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        },
        "question_encoder_config": {
            "vocab_size": 30522,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "max_position_embeddings": 512,
        },
        "image_token_id": 32011,
    }


TINY_VOCAB_SIZE = 1024
TINY_QUESTION_VOCAB_SIZE = 1024


def _tiny() -> dict[str, Any]:
    """The paper's structure, shrunk: a 32x64x64 volume, narrow widths, two layers each."""
    return {
        "text_config": {
            "model_type": "phi3",
            "vocab_size": TINY_VOCAB_SIZE,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 1024,
            "original_max_position_embeddings": 1024,
            "bos_token_id": None,
            "eos_token_id": 0,
            "pad_token_id": 0,
        },
        "vision2d_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 16,
            "vision_use_head": False,
        },
        "vision3d_config": {
            "image_size": [32, 64, 64],
            "patch_size": [4, 16, 16],
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "question_encoder_config": {
            "vocab_size": TINY_QUESTION_VOCAB_SIZE,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "max_position_embeddings": 128,
        },
        "image_token_id": 1,
    }


PRESETS = {"paper": _paper, "tiny": _tiny}

AutoConfig.register(ViT3DConfig.model_type, ViT3DConfig)
AutoConfig.register(Med2E3Config.model_type, Med2E3Config)
