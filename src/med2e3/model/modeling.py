"""Med2E3ForConditionalGeneration: 3D + 2D encoders -> connectors -> TG-IS -> LLM.

Data flow for one batch (shapes for B volumes, S slices, Dl = LLM width):

    pixel_values  B x 1 x S x H x W  in [0, 1]
      ViT3D (block output, CLS dropped) -> Connector3D        -> V3  B x N3 x Dl
      SigLIP on each slice (B*S images) -> MLPConnector        -> V2  B x S x N2 x Dl
      question -> BERT pooler -> TG-IS(V3, V2)                 -> s   B x S
      [V3 ; sum_j s_j V2_j]                                    -> B x (N3 + N2) x Dl
    written into the LLM's input embeddings at the image-token positions (one masked_scatter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertModel, GenerationMixin, PreTrainedModel, SiglipVisionModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from med2e3.config import Med2E3Config
from med2e3.errors import InputError
from med2e3.model.tgis import TGIS, Connector3D, MLPConnector, aggregate_slices
from med2e3.model.vit3d import ViT3D

TrainingStage = Literal["pretrain", "finetune"]

# Parts trainable in each stage of the release's training scripts (Shi et al., arXiv 2411.12783): stage 1 the
# connectors; stage 2 also the LLM and the 2D encoder, the 3D encoder staying frozen. The BERT question encoder
# belongs to M3D-CLIP, i.e. to the frozen 3D side; the TG-IS text projection is trained.
STAGE_TRAINABLE: dict[str, tuple[str, ...]] = {
    "pretrain": ("projector3d", "projector2d", "tgis"),
    "finetune": ("projector3d", "projector2d", "tgis", "vision2d", "language_model"),
}


@dataclass
class VolumeEncoding(ModelOutput):
    """Question-independent features of a batch of volumes (cache these to ask many questions)."""

    tokens3d: torch.Tensor | None = None  # B x N3 x Dl
    slice_tokens: torch.Tensor | None = None  # B x S x N2 x Dl (None for slice_aggregation="none")

    @classmethod
    def cat(cls, encodings: Sequence[VolumeEncoding]) -> VolumeEncoding:
        """Concatenate encodings along the batch (one row per question; a volume may repeat)."""
        slices = [e.slice_tokens for e in encodings]
        return cls(
            tokens3d=torch.cat([e.tokens3d for e in encodings]),
            slice_tokens=None if slices[0] is None else torch.cat(slices),
        )

    def expand(self, n: int) -> VolumeEncoding:
        """Repeat each volume n times along the batch (one volume asked n questions)."""
        return VolumeEncoding(
            *(None if t is None else t.repeat_interleave(n, dim=0) for t in self.to_tuple())
        )


@dataclass
class Med2E3CausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the TG-IS slice scores (B x S; None when no volume was encoded)."""

    slice_scores: torch.Tensor | None = None


class Med2E3PreTrainedModel(PreTrainedModel):
    config: Med2E3Config
    config_class = Med2E3Config
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["Block", "SiglipEncoderLayer", "BertLayer", "Phi3DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ViT3D):
            init.trunc_normal_(module.patch_embedding.position_embeddings, std=0.02)
            init.trunc_normal_(module.cls_token, std=0.02)


class Med2E3ForConditionalGeneration(Med2E3PreTrainedModel, GenerationMixin):
    """Med-2E3: a causal LLM reading a 3D volume through dual 3D/2D encoders with TG-IS slice scoring."""

    def __init__(self, config: Med2E3Config):
        super().__init__(config)
        text_width = config.text_config.hidden_size
        v3 = config.vision3d_config
        self.vision3d = ViT3D(v3)
        self.projector3d = Connector3D(
            v3.hidden_size, text_width, v3.grid_size, config.pool_size, config.projector_hidden_act
        )
        if config.slice_aggregation != "none":
            self.vision2d = SiglipVisionModel(config.vision2d_config)
            self.projector2d = MLPConnector(
                config.vision2d_config.hidden_size, text_width, config.projector_hidden_act
            )
        if config.slice_aggregation == "tgis":
            self.question_encoder = BertModel(config.question_encoder_config, add_pooling_layer=True)
            self.tgis = TGIS(
                config.question_encoder_config.hidden_size,
                text_width,
                config.depth_groups,
                config.tgis_temperature,
                config.tgis_score_dropout,
            )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # ---- embeddings (for resize_token_embeddings, PEFT, generation) --------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ---- vision -----------------------------------------------------------------------------------
    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raise InputError for a volume batch of the wrong shape, dtype or range, before any compute."""
        expected = self.config.volume_shape
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            got = (
                pixel_values.dtype if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            )
            raise InputError(f"pixel_values must be a floating-point tensor, got {got}")
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[1:]) != expected:
            raise InputError(
                f"pixel_values must have shape B x {' x '.join(map(str, expected))} (B, C, D, H, W), "
                f"got {tuple(pixel_values.shape)}"
            )
        if pixel_values.is_meta:  # shape-only run
            return
        lo, hi = torch.stack([pixel_values.amin(), pixel_values.amax()]).tolist()  # one device sync
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN and inf reach the min or the max
            raise InputError("pixel_values contain NaN or infinite values")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise InputError(
                f"pixel_values must be in [0, 1] (preprocessed volume), got range [{lo:.3g}, {hi:.3g}]"
            )

    def encode_volume(self, pixel_values: torch.Tensor, check: bool = True) -> VolumeEncoding:
        """Run both encoders and connectors: the part of the model that does not depend on the question.

        ``check=False`` skips `check_pixel_values` (its range check waits for the device), for a caller that
        checked already, e.g. one replaying the encoders from a CUDA graph."""
        if check:
            self.check_pixel_values(pixel_values)
        config = self.config
        dtype = self.projector3d.mlp.linear_1.weight.dtype
        volume = pixel_values.to(dtype)
        block_out = self.vision3d.block_output(volume, config.vision3d_feature_layer)  # B x (1 + N) x C3
        tokens3d = self.projector3d(block_out[:, 1:])  # B x N3 x Dl
        if config.slice_aggregation == "none":
            return VolumeEncoding(tokens3d=tokens3d)
        b, _, s, h, w = volume.shape
        slices = (
            volume.permute(0, 2, 1, 3, 4).reshape(b * s, 1, h, w).expand(-1, 3, -1, -1)
        )  # (B*S) x 3 x H x W
        if config.vision2d_normalize:
            slices = (slices - 0.5) / 0.5
        out = self.vision2d(pixel_values=slices, output_hidden_states=True)
        features2d = out.hidden_states[config.vision2d_feature_layer]  # (B*S) x N2 x C2
        slice_tokens = self.projector2d(features2d).unflatten(0, (b, s))  # B x S x N2 x Dl
        return VolumeEncoding(tokens3d=tokens3d, slice_tokens=slice_tokens)

    def encode_question(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """BERT pooler output of the TG-IS question: B x H_bert."""
        return self.question_encoder(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def visual_tokens(
        self,
        encoding: VolumeEncoding,
        question_input_ids: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Aggregate the slices for each question: (B x T x Dl visual tokens, B x S slice scores or None)."""
        v3, v2 = encoding.tokens3d, encoding.slice_tokens
        mode = self.config.slice_aggregation
        if mode == "none":
            return v3, None
        if mode == "mean":
            scores = torch.full(v2.shape[:2], 1.0 / v2.shape[1], dtype=v2.dtype, device=v2.device)
        else:
            if question_input_ids is None:
                raise InputError(
                    "slice_aggregation='tgis' needs question_input_ids (the TG-IS question tokens)"
                )
            if question_input_ids.shape[0] != v2.shape[0]:
                raise InputError(
                    f"{question_input_ids.shape[0]} questions for {v2.shape[0]} volumes: one question per volume"
                )
            scores = self.tgis(v3, v2, self.encode_question(question_input_ids, question_attention_mask))
        return torch.cat([v3, aggregate_slices(scores, v2)], dim=1), scores  # B x (N3 + N2) x Dl

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        volume_encoding: VolumeEncoding | None = None,
        question_input_ids: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The one way from a volume to the LLM: (B x T x Dl visual tokens, B x S slice scores or None).

        The volume comes as ``pixel_values`` (encoded here) or as a cached ``volume_encoding``
        (`encode_volume`), never both.
        """
        if (pixel_values is None) == (volume_encoding is None):
            raise InputError("give the volume as exactly one of pixel_values or volume_encoding")
        if volume_encoding is None:
            volume_encoding = self.encode_volume(pixel_values)
        return self.visual_tokens(volume_encoding, question_input_ids, question_attention_mask)

    def _volume_inputs(
        self,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        volume_encoding: VolumeEncoding | None,
        image_embeds: torch.Tensor | None,
        question_input_ids: torch.Tensor | None,
        question_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(image_embeds, slice_scores) from whichever volume input was given; conflicting inputs raise."""
        given = [
            n
            for n, v in (("pixel_values", pixel_values), ("volume_encoding", volume_encoding))
            if v is not None
        ]
        if image_embeds is not None and given:
            raise InputError(f"give the volume once: image_embeds together with {' and '.join(given)}")
        if not given:
            return image_embeds, None
        if input_ids is None:
            raise InputError("a volume needs input_ids, to find its image placeholder")
        n = (pixel_values if pixel_values is not None else volume_encoding.tokens3d).shape[0]
        self._image_mask(input_ids, n)  # fail before the encoders run
        return self.get_image_features(
            pixel_values, volume_encoding, question_input_ids, question_attention_mask
        )

    # ---- merge ------------------------------------------------------------------------------------
    def _image_mask(self, input_ids: torch.Tensor, n_volumes: int) -> torch.Tensor:
        """Positions of the image tokens; checks each row holds exactly one expanded placeholder."""
        mask = input_ids == self.config.image_token_id
        counts = mask.sum(dim=1)
        n = self.config.num_image_tokens
        if input_ids.shape[0] != n_volumes:
            raise InputError(
                f"{input_ids.shape[0]} prompts for {n_volumes} volumes: give one volume per prompt"
            )
        bad = (counts != n).nonzero().flatten().tolist()
        if bad:
            row = bad[0]
            found = int(counts[row])
            what = "no image placeholder" if found == 0 else f"{found / n:g} image placeholders"
            raise InputError(
                f"prompt {row} has {what} ({found} image tokens); each prompt needs exactly one "
                f"{self.config.image_token!r} placeholder expanded to {n} tokens (use Med2E3Processor)"
            )
        return mask

    def _position_ids(self, attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Positions that skip padding, so left- and right-padded batches match unpadded runs."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        question_input_ids: torch.LongTensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        volume_encoding: VolumeEncoding | None = None,
        image_embeds: torch.Tensor | None = None,
        slice_scores: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Med2E3CausalLMOutput:
        """Causal-LM forward with the volume spliced in at the image tokens.

        The volume comes as ``pixel_values`` (encoded here), as a cached ``volume_encoding``, or as final
        ``image_embeds`` (with their ``slice_scores``), in decreasing order of work done here.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids or inputs_embeds")
        if image_embeds is not None and input_ids is None:
            raise InputError("image_embeds need input_ids, to find the image placeholder")
        if pixel_values is not None or volume_encoding is not None:
            image_embeds, slice_scores = self._volume_inputs(
                input_ids,
                pixel_values,
                volume_encoding,
                image_embeds,
                question_input_ids,
                question_attention_mask,
            )
        if inputs_embeds is None:
            # skipped under torch.compile (decode steps): a static cache's length is a tensor, and the check
            # would split the compiled graph at every step
            if (
                image_embeds is None
                and not torch.compiler.is_compiling()
                and (cache is None or cache.get_seq_length() == 0)
            ):
                if (input_ids == self.config.image_token_id).any():
                    raise InputError("input_ids contain image tokens but no volume was given (pixel_values)")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if image_embeds is not None:
            mask = self._image_mask(input_ids, image_embeds.shape[0]).unsqueeze(-1)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_embeds.to(inputs_embeds.dtype))
            if labels is not None:
                labels = labels.masked_fill(mask.squeeze(-1), -100)
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            position_ids = self._position_ids(attention_mask, inputs_embeds.shape[1])
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return Med2E3CausalLMOutput(
            loss=out.loss,
            logits=out.logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            slice_scores=slice_scores,
        )

    # ---- generation -------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any
    ):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and inputs.get("use_cache", True):
            for key in ("image_embeds", "slice_scores", "question_input_ids", "question_attention_mask"):
                inputs.pop(key, None)
        return inputs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        question_input_ids: torch.LongTensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        volume_encoding: VolumeEncoding | None = None,
        **kwargs: Any,
    ):
        """`GenerationMixin.generate` with the volume encoded once, before decoding.

        With ``return_dict_in_generate=True`` the output carries ``slice_scores`` (B x S, or None).
        The image token is never generated.
        """
        kwargs["image_embeds"], scores = self._volume_inputs(
            input_ids,
            pixel_values,
            volume_encoding,
            kwargs.get("image_embeds"),
            question_input_ids,
            question_attention_mask,
        )
        slice_scores = scores if scores is not None else kwargs.get("slice_scores")
        suppress = list(kwargs.pop("suppress_tokens", None) or [])
        kwargs["suppress_tokens"] = [*suppress, self.config.image_token_id]
        out = super().generate(input_ids=input_ids, **kwargs)
        if isinstance(out, ModelOutput):
            out.slice_scores = slice_scores
        return out

    # ---- training stages --------------------------------------------------------------------------
    def set_training_stage(
        self,
        stage: TrainingStage,
        train_vision2d: bool = True,
        train_question_encoder: bool = False,
        train_vision3d: bool = False,
    ) -> list[str]:
        """Freeze everything except the parts trained in ``stage``; return the trainable parameter names.

        ``train_vision3d`` also trains the 3D encoder (the release keeps its pretrained M3D-CLIP ViT frozen;
        a randomly initialised one has not learnt what to see). ``train_question_encoder`` also trains the
        TG-IS question encoder. The release keeps it frozen (it
        is M3D-CLIP's pretrained BERT); a randomly initialised one maps every question to nearly the same
        vector, and the answer loss alone did not teach the tiny preset's otherwise (docs/results.md).
        """
        if stage not in STAGE_TRAINABLE:
            raise ValueError(f"unknown training stage {stage!r}; choose from {sorted(STAGE_TRAINABLE)}")
        parts = [p for p in STAGE_TRAINABLE[stage] if train_vision2d or p != "vision2d"]
        if train_question_encoder:
            parts.append("question_encoder")
        if train_vision3d:
            parts.append("vision3d")
        self.requires_grad_(False)
        for part in parts:
            module = getattr(self, part, None)
            if module is not None:
                module.requires_grad_(True)
        if hasattr(self, "vision2d"):  # features come from hidden_states: SigLIP's final norm is never used
            self.vision2d.post_layernorm.requires_grad_(False)
        return [name for name, p in self.named_parameters() if p.requires_grad]
