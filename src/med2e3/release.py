"""Load the authors' released Med-2E3 weights, or real pretrained backbones, into our model.

Two ways in (docs/release.md):

* ``load_release(folder)`` reads a checkpoint in the release layout (``args/config.json``, ``llm/``,
  ``vision2d_model/``, ``vision2d_connector/``, ``vision3d_model/``, ``vision3d_connector/``) and maps
  every saved tensor by name onto `Med2E3ForConditionalGeneration`; ``convert_release`` writes the result
  as an ordinary ``save_pretrained`` folder.
* ``model_from_components(llm=..., vision2d=..., vision3d=...)`` builds the model from local Hugging
  Face-style backbone folders (a causal LLM, SigLIP, M3D-CLIP) with freshly initialised connectors and
  TG-IS projection: the starting point of stage-1 training.

Nothing here downloads (every load is ``local_files_only``). A saved tensor that maps nowhere, a tensor of
ours that nothing provides, or a shape mismatch is a `ReleaseError` that lists the names; the only tensors
left out on purpose are those in `IGNORED_RELEASE_TENSORS`.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipConfig,
    SiglipVisionConfig,
)
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from med2e3.config import Med2E3Config, ViT3DConfig
from med2e3.data.processor import IMAGE_TOKEN, Med2E3Processor
from med2e3.errors import InputError, Med2E3Error
from med2e3.folders import gguf_kwargs, holds_tokenizer
from med2e3.model import Med2E3ForConditionalGeneration

logger = logging.getLogger(__name__)

PathLike = str | Path
TokenizerSource = PathLike | PreTrainedTokenizerBase | None

# The release's prompt ids hold this negative id where the volume goes; we use a real token instead.
RELEASE_IMAGE3D_TOKEN_ID = -201

RELEASE_FOLDERS: tuple[str, ...] = (
    "llm",
    "vision2d_model",
    "vision2d_connector",
    "vision3d_model",
    "vision3d_connector",
)
ARGS_CONFIG = Path("args") / "config.json"
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# args/config.json values of the published model; anything else is a variant this loader does not implement.
RELEASE_SETTINGS: dict[str, Any] = {
    "exp_id": 4,  # dual 3D/2D encoders with BERT-guided slice scoring
    "vision2d_model_type": "siglip",
    "vision2d_model_select_feature": "cls_patch",  # all SigLIP tokens ("patch" would drop the first one)
    "vision2d_connector_type": "mlp2x_gelu",
    "vision3d_model_type": "m3d",
    "vision3d_model_select_feature": "patch",  # CLS dropped
    "vision3d_connector_type": "spatial_pooling_score15_mlp2x_gelu",
}
# Hard-coded in the release's spatial_pooling_score15 connector: pool 2, tau 5, score dropout 0.1.
RELEASE_FIELDS: dict[str, Any] = {
    "slice_aggregation": "tgis",
    "pool_size": 2,
    "tgis_temperature": 5.0,
    "tgis_score_dropout": 0.1,
    "vision2d_normalize": False,
}

# Saved tensors that are deliberately not loaded: Med-2E3 never runs the modules they belong to.
IGNORED_RELEASE_TENSORS: dict[str, tuple[str, ...]] = {
    # SigLIP's attention-pooling head: Med-2E3 uses the patch tokens, never the pooled output.
    "vision2d_model": ("head.*", "vision_model.head.*"),
    "vision3d_model": (
        # M3D-CLIP's contrastive projections and temperature: used only for CLIP training.
        "mm_vision_proj.*",
        "mm_language_proj.*",
        "logit_scale",
        # MONAI ViT leftovers: a classification head and the cross-attention that some MONAI versions
        # create in every TransformerBlock but never run for self-attention-only ViTs.
        "vision_encoder.classification_head.*",
        "vision_encoder.blocks.*.norm_cross_attn.*",
        "vision_encoder.blocks.*.cross_attn.*",
        # BERT index buffers (arange / zeros), recreated by our model.
        "language_encoder.embeddings.position_ids",
        "language_encoder.embeddings.token_type_ids",
    ),
}
# A full SiglipModel folder (components path): its text tower and contrastive scalars.
SIGLIP_TEXT_TENSORS: tuple[str, ...] = ("text_model.*", "logit_scale", "logit_bias")

# M3D-CLIP's config defaults (its PretrainedConfig), used for fields a saved config.json leaves out.
M3D_CLIP_DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "img_size": [32, 256, 256],
    "patch_size": [4, 16, 16],
    "hidden_size": 768,
    "mlp_dim": 3072,
    "num_layers": 12,
    "num_heads": 12,
    "pos_embed": "perceptron",
    "dropout_rate": 0.0,
    "spatial_dims": 3,
}
BERT_HEAD_DIM = 64  # the BERT family's head width (bert-base: 768 / 12)
DEFAULT_MAX_LENGTH = 768  # the release's llm_max_length
MAX_LISTED = 20
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ReleaseError(Med2E3Error, ValueError):
    """A release or component folder is missing, unsupported or does not match the model."""

    def __init__(self, path: PathLike | None, reason: str):
        self.path = None if path is None else Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path is not None else reason)


# ---- reading files --------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ReleaseError(path, "file is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReleaseError(path, f"cannot read JSON ({err})") from err
    if not isinstance(data, dict):
        raise ReleaseError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin``/``.pt`` state dict, unpickled with ``weights_only=True`` (no code runs)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in ANSI.sub("", str(err)).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unpickler error" in line), lines[0] if lines else "")
        raise ReleaseError(
            path, f"not a plain state dict; torch.load(weights_only=True) refused it: {reason}"
        ) from err
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise ReleaseError(path, f"cannot read the weights ({err})") from err
    if not isinstance(obj, Mapping):
        raise ReleaseError(
            path, f"not a state dict (a mapping of names to tensors): it holds a {type(obj).__name__}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ReleaseError(path, f"not a state dict: entries that are not name -> tensor: {_listing(bad)}")
    return dict(obj)


def _weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise ReleaseError(path, f"cannot read the weights ({err})") from err
    return _torch_state_dict(path)


def find_weights(folder: PathLike) -> Path:
    """The weights file (or shard index) of a model folder, in ``WEIGHT_FILES`` order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleaseError(folder, "no such folder")
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise ReleaseError(folder, f"no weights file (looked for {', '.join(WEIGHT_FILES)})")
    return found


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, or of a folder's weights (single file or sharded index)."""
    path = Path(path)
    if path.is_file():
        return _weights_file(path)
    found = find_weights(path)
    if not found.name.endswith(".index.json"):
        return _weights_file(found)
    weight_map = _read_json(found).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ReleaseError(found, "no 'weight_map' in the shard index")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(_weights_file(found.parent / shard))
    return tensors


# ---- name mapping ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorMap:
    """Names of one saved component in our model: prefix rules (first match wins) and ignored globs."""

    rules: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...] = ()

    def is_ignored(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.ignored)

    def rename(self, name: str) -> str | None:
        for saved, ours in self.rules:
            if name.startswith(saved):
                return ours + name[len(saved) :]
        return None


SIGLIP_RULES = (("vision_model.", "vision2d."), ("", "vision2d."))  # transformers 4.x and 5.x names
M3D_CLIP_RULES = (("vision_encoder.", "vision3d."), ("language_encoder.", "question_encoder."))
RELEASE_TENSOR_MAPS: dict[str, TensorMap] = {
    "llm": TensorMap((("", "language_model."),)),
    "vision2d_model": TensorMap(SIGLIP_RULES, IGNORED_RELEASE_TENSORS["vision2d_model"]),
    "vision2d_connector": TensorMap(
        (("_connector.0.", "projector2d.linear_1."), ("_connector.2.", "projector2d.linear_2."))
    ),
    "vision3d_model": TensorMap(M3D_CLIP_RULES, IGNORED_RELEASE_TENSORS["vision3d_model"]),
    "vision3d_connector": TensorMap(
        (
            ("_connector.0.", "projector3d.mlp.linear_1."),
            ("_connector.2.", "projector3d.mlp.linear_2."),
            ("text_mlp.", "tgis.text_proj."),  # the TG-IS question projection (the release never reloads it)
        )
    ),
}


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


@dataclass
class _Collected:
    """Saved tensors renamed to ours, with where each came from and what failed to map."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def add(self, label: str, saved: Mapping[str, torch.Tensor], tensor_map: TensorMap) -> None:
        for name, tensor in saved.items():
            if tensor_map.is_ignored(name):
                continue
            ours = tensor_map.rename(name)
            where = f"{label}:{name}"
            if ours is None:
                self.unmapped.append(where)
            elif ours in self.tensors:
                self.duplicates.append(f"{where} and {self.origin[ours]} -> {ours}")
            else:
                self.tensors[ours] = tensor
                self.origin[ours] = where

    def check(self, expected: Mapping[str, torch.Size], where: Path | None) -> None:
        """Raise one ReleaseError listing every unmapped, missing, unexpected or mis-shaped tensor."""
        problems = {
            "saved tensors with no mapping": self.unmapped,
            "saved tensors mapped twice": self.duplicates,
            "our tensors that nothing provides": sorted(set(expected) - set(self.tensors)),
            "saved tensors with no place in our model": sorted(
                f"{self.origin[n]} -> {n}" for n in set(self.tensors) - set(expected)
            ),
            "shape mismatches": sorted(
                f"{self.origin[n]} {list(t.shape)} -> {n} {list(expected[n])}"
                for n, t in self.tensors.items()
                if n in expected and t.shape != expected[n]
            ),
        }
        lines = [f"{title} ({len(names)}): {_listing(names)}" for title, names in problems.items() if names]
        if lines:
            raise ReleaseError(where, "the weights do not match the model:\n  " + "\n  ".join(lines))


# ---- configs --------------------------------------------------------------------------------------------
def _llm_config(folder: Path) -> PreTrainedConfig:
    if gguf := gguf_kwargs(folder):
        return AutoConfig.from_pretrained(folder, local_files_only=True, **gguf)
    path = folder / "config.json"
    raw = _read_json(path)
    model_type = raw.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ReleaseError(
            path, f"unsupported LLM type {model_type!r}: not a causal language model known to transformers"
        )
    rope = raw.get("rope_scaling")
    if isinstance(rope, dict) and rope.get("type") == "su":  # Phi-3's first name for LongRoPE
        raw["rope_scaling"] = {**rope, "type": "longrope"}
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def _siglip_config(folder: Path) -> tuple[SiglipVisionConfig, bool]:
    """SigLIP vision config (head off) and whether the folder holds a full SiglipModel."""
    path = folder / "config.json"
    model_type = _read_json(path).get("model_type")
    if model_type not in ("siglip_vision_model", "siglip"):
        raise ReleaseError(path, f"unsupported 2D encoder type {model_type!r}: expected a SigLIP model")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    full = isinstance(config, SiglipConfig)
    vision = config.vision_config if full else config
    vision.vision_use_head = False  # Med-2E3 never uses the pooling head
    return vision, full


def _vit3d_config(folder: Path) -> ViT3DConfig:
    """ViT3DConfig from an M3D-CLIP config.json (its vision fields; missing ones take M3D-CLIP's defaults)."""
    path = folder / "config.json"
    raw = _read_json(path)
    if raw.get("model_type", "m3d_clip") != "m3d_clip":
        raise ReleaseError(path, f"not an M3D-CLIP config (model_type {raw['model_type']!r})")
    f = {key: raw.get(key, default) for key, default in M3D_CLIP_DEFAULTS.items()}
    if f["pos_embed"] != "perceptron" or f["spatial_dims"] != 3:
        raise ReleaseError(
            path,
            f"unsupported ViT (pos_embed={f['pos_embed']!r}, spatial_dims={f['spatial_dims']}): "
            "only M3D-CLIP's 3D 'perceptron' patch embedding is implemented",
        )
    return ViT3DConfig(
        in_channels=f["in_channels"],
        image_size=list(f["img_size"]),
        patch_size=list(f["patch_size"]),
        hidden_size=f["hidden_size"],
        intermediate_size=f["mlp_dim"],
        num_hidden_layers=f["num_layers"],
        num_attention_heads=f["num_heads"],
        qkv_bias=bool(raw.get("qkv_bias", False)),  # M3D-CLIP builds its ViT without a qkv bias
        dropout_rate=float(f["dropout_rate"]),
    )


def _bert_config(m3d_tensors: Mapping[str, torch.Tensor], where: Path) -> BertConfig:
    """M3D-CLIP stores no config for its BERT: read the sizes off the weights, BERT defaults for the rest."""
    prefix = "language_encoder."
    bert = {k[len(prefix) :]: v for k, v in m3d_tensors.items() if k.startswith(prefix)}
    needed = (
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "encoder.layer.0.intermediate.dense.weight",
    )
    absent = [prefix + k for k in needed if k not in bert]
    if absent:
        raise ReleaseError(
            where, f"no BERT language encoder in the M3D-CLIP weights (missing {_listing(absent)})"
        )
    vocab_size, hidden = bert["embeddings.word_embeddings.weight"].shape
    layers = {int(k.split(".")[2]) for k in bert if k.startswith("encoder.layer.")}
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=max(1, hidden // BERT_HEAD_DIM),
        intermediate_size=bert["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=bert["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=bert["embeddings.token_type_embeddings.weight"].shape[0],
    )


def _release_settings(root: Path) -> tuple[dict[str, Any], int]:
    """Med2E3Config fields from args/config.json (checked against the published variant) and llm_max_length."""
    path = root / ARGS_CONFIG
    if not path.is_file() and "exp_id" in _read_json_or_empty(root / "config.json"):
        path = root / "config.json"  # the release also writes the same config at the top
    raw = _read_json(path)
    for key, wanted in RELEASE_SETTINGS.items():
        if key not in raw:
            raise ReleaseError(path, f"no {key!r}; not a Med-2E3 release config")
        if raw[key] != wanted:
            raise ReleaseError(
                path,
                f"unsupported {key}={raw[key]!r}: only the published Med-2E3 model ({key}={wanted!r}) loads",
            )
    fields = {
        **RELEASE_FIELDS,
        "vision3d_feature_layer": int(raw.get("vision3d_model_select_layer", -1)),
        "vision2d_feature_layer": int(raw.get("vision2d_model_select_layer", -1)),
    }
    return fields, int(raw.get("llm_max_length", DEFAULT_MAX_LENGTH))


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


# ---- tokenizers -----------------------------------------------------------------------------------------
def _load_tokenizer(
    source: TokenizerSource, search: Sequence[Path], model_config: PreTrainedConfig | None = None
) -> PreTrainedTokenizerBase | None:
    """``source`` (a tokenizer or its folder), else the first folder in ``search`` holding tokenizer files.

    ``model_config`` stands in for a folder's config.json that transformers cannot read (M3D-CLIP's).
    """
    if isinstance(source, PreTrainedTokenizerBase):
        return source
    if source is not None:
        folder = Path(source)
    else:
        folder = next((f for f in search if holds_tokenizer(f) or gguf_kwargs(f)), None)
        if folder is None:
            return None
    try:
        extra = gguf_kwargs(folder) if model_config is None else {"config": model_config}
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    except Exception as err:  # tokenizer loading fails in many library-specific ways
        raise ReleaseError(folder, f"cannot load the tokenizer ({type(err).__name__}: {err})") from err


def fit_llm_tokenizer(tokenizer: PreTrainedTokenizerBase, text_config: PreTrainedConfig, where: Path) -> None:
    """Make an LLM's tokenizer and config fit each other: ``text_config`` gets a row for every token and for
    the image token (its ``vocab_size`` grows to the next multiple of 64 when it has too few), and the
    end-of-sequence token pads when the tokenizer names no padding token; ReleaseError naming ``where`` (the
    LLM's folder) when it names neither."""
    needed = len(tokenizer) + (IMAGE_TOKEN not in tokenizer.get_vocab())
    if needed > text_config.vocab_size:
        text_config.vocab_size = -(-needed // 64) * 64
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ReleaseError(where, "the tokenizer names neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token


def add_image_token(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, token: str = IMAGE_TOKEN, where: Path | None = None
) -> int:
    """Give ``token`` a special-token id in ``tokenizer`` (if it has none) that the LLM has a row for;
    ReleaseError naming ``where`` (the tokenizer's folder) when there is none."""
    if token not in tokenizer.get_vocab():
        if len(tokenizer) >= vocab_size:
            raise ReleaseError(
                where,
                f"the tokenizer has {len(tokenizer)} tokens and the LLM embedding {vocab_size} rows: "
                f"no free row for the image token {token!r}",
            )
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not 0 <= token_id < vocab_size:
        raise ReleaseError(where, f"{token!r} has id {token_id}, outside the LLM vocabulary of {vocab_size}")
    return token_id


def _image_token_id(
    tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, requested: int | None, where: Path
) -> int:
    if tokenizer is not None:
        token_id = add_image_token(tokenizer, vocab_size, where=where)
        if requested is not None and requested != token_id:
            raise ReleaseError(
                where, f"image_token_id={requested}, but the tokenizer gives {IMAGE_TOKEN!r} id {token_id}"
            )
        return token_id
    if requested is None:
        requested = Med2E3Config.image_token_id  # where Phi-3's tokenizer puts the added token (32011)
        if requested >= vocab_size:
            raise ReleaseError(
                where,
                "no LLM tokenizer found: pass tokenizer= (a local copy of the LLM's tokenizer) or image_token_id=",
            )
        logger.warning(
            "%s: no LLM tokenizer; image_token_id=%d (its id once added to Phi-3's tokenizer)",
            where,
            requested,
        )
    if not 0 <= requested < vocab_size:
        raise ReleaseError(where, f"image_token_id={requested} is outside the LLM vocabulary of {vocab_size}")
    return requested


def _processor(
    config: Med2E3Config,
    tokenizer: PreTrainedTokenizerBase | None,
    question_tokenizer: PreTrainedTokenizerBase | None,
    max_length: int,
    where: Path,
) -> Med2E3Processor | None:
    tgis = config.slice_aggregation == "tgis"
    if tokenizer is None or (tgis and question_tokenizer is None):
        missing = "LLM tokenizer" if tokenizer is None else "question (BERT) tokenizer"
        logger.warning(
            "%s: no %s found; returning no processor (pass tokenizer=/question_tokenizer=)", where, missing
        )
        return None
    question_max_length = 512
    if tgis:
        bert = config.question_encoder_config
        if len(question_tokenizer) > bert.vocab_size:
            raise ReleaseError(
                where,
                f"question tokenizer has {len(question_tokenizer)} tokens, BERT only {bert.vocab_size} rows",
            )
        question_max_length = min(question_max_length, bert.max_position_embeddings)
    processor = Med2E3Processor(
        tokenizer,
        question_tokenizer if tgis else None,
        config.num_image_tokens,
        config.image_token,
        max_length=max_length,
        question_max_length=question_max_length,
    )
    processor.check_config(config)
    return processor


# ---- model assembly -------------------------------------------------------------------------------------
def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    return resolved


def _empty_model(config: Med2E3Config, dtype: torch.dtype) -> Med2E3ForConditionalGeneration:
    """The model with uninitialised weights (every tensor is about to be overwritten)."""
    with no_init_weights():
        return Med2E3ForConditionalGeneration._from_config(config, dtype=dtype)


def _shapes(model: torch.nn.Module, prefixes: tuple[str, ...] = ("",)) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items() if k.startswith(prefixes)}


def _fill_tied(model: PreTrainedModel, collected: _Collected) -> None:
    """Tied weights (e.g. an LLM sharing input and output embeddings) are saved once; use that tensor twice."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target not in collected.tensors and source in collected.tensors:
            collected.tensors[target] = collected.tensors[source]
            collected.origin[target] = collected.origin[source]


def _check_release_layout(root: Path) -> None:
    if not root.is_dir():
        raise ReleaseError(root, "no such folder")
    missing = [f"{name}/" for name in RELEASE_FOLDERS if not (root / name).is_dir()]
    if missing:
        raise ReleaseError(root, f"not a Med-2E3 release folder: missing {', '.join(missing)}")


def load_release(
    path: PathLike,
    dtype: torch.dtype | str | None = None,
    *,
    tokenizer: TokenizerSource = None,
    question_tokenizer: TokenizerSource = None,
    image_token_id: int | None = None,
) -> tuple[Med2E3ForConditionalGeneration, Med2E3Processor | None]:
    """Load a checkpoint in the release layout (e.g. ``Med-2E3-M3D``) with every saved tensor mapped.

    Args:
        path: the release folder.
        dtype: dtype of the returned model (default float32).
        tokenizer: the LLM tokenizer or its folder; default: tokenizer files in ``llm/`` or the folder itself.
            ``<image3d>`` is added to it as a special token.
        question_tokenizer: M3D-CLIP's BERT tokenizer or its folder; default: tokenizer files in
            ``vision3d_model/``.
        image_token_id: the placeholder id when there is no LLM tokenizer (default 32011, Phi-3's).

    Returns:
        the model in eval mode, and its processor (None when a tokenizer is missing).
    """
    root = Path(path)
    _check_release_layout(root)
    fields, max_length = _release_settings(root)
    text_config = _llm_config(root / "llm")
    vision2d_config, siglip_full = _siglip_config(root / "vision2d_model")
    vision3d_config = _vit3d_config(root / "vision3d_model")
    saved = {name: read_state_dict(root / name) for name in RELEASE_FOLDERS}
    llm_tokenizer = _load_tokenizer(tokenizer, [root / "llm", root])
    bert_tokenizer = _load_tokenizer(question_tokenizer, [root / "vision3d_model"], BertConfig())
    config = Med2E3Config(
        text_config=text_config,
        vision2d_config=vision2d_config,
        vision3d_config=vision3d_config,
        question_encoder_config=_bert_config(saved["vision3d_model"], root / "vision3d_model"),
        image_token_id=_image_token_id(llm_tokenizer, text_config.vocab_size, image_token_id, root),
        **fields,
    )
    model = _empty_model(config, _dtype(dtype))
    collected = _Collected()
    for name in RELEASE_FOLDERS:
        tensor_map = RELEASE_TENSOR_MAPS[name]
        if name == "vision2d_model" and siglip_full:
            tensor_map = TensorMap(tensor_map.rules, tensor_map.ignored + SIGLIP_TEXT_TENSORS)
        collected.add(f"{name}/{find_weights(root / name).name}", saved[name], tensor_map)
    _fill_tied(model, collected)
    collected.check(_shapes(model), root)
    model.load_state_dict(collected.tensors, strict=True)
    return model.eval(), _processor(config, llm_tokenizer, bert_tokenizer, max_length, root)


def convert_release(
    src: PathLike,
    dst: PathLike,
    dtype: torch.dtype | str | None = None,
    *,
    tokenizer: TokenizerSource = None,
    question_tokenizer: TokenizerSource = None,
    image_token_id: int | None = None,
) -> Path:
    """Write a release checkpoint as a normal model folder (safetensors + processor files); returns ``dst``."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ReleaseError(dst, "the converted model must go to another folder than the release")
    model, processor = load_release(
        src, dtype, tokenizer=tokenizer, question_tokenizer=question_tokenizer, image_token_id=image_token_id
    )
    model.save_pretrained(dst)
    if processor is not None:
        processor.save_pretrained(dst)
    return dst


def expand_release_placeholder(input_ids: Sequence[int] | torch.Tensor, config: Med2E3Config) -> torch.Tensor:
    """Replay a release-format prompt: its one -201 becomes ``num_image_tokens`` copies of our image token."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    at = (ids == RELEASE_IMAGE3D_TOKEN_ID).nonzero().flatten()
    if len(at) != 1:
        raise InputError(
            f"a release prompt holds the placeholder {RELEASE_IMAGE3D_TOKEN_ID} once, found {len(at)}"
        )
    image = torch.full((config.num_image_tokens,), config.image_token_id, dtype=torch.long)
    return torch.cat([ids[: at[0]], image, ids[at[0] + 1 :]])


# ---- components -----------------------------------------------------------------------------------------
@dataclass
class _Components:
    config: Med2E3Config
    tokenizer: PreTrainedTokenizerBase | None
    question_tokenizer: PreTrainedTokenizerBase | None
    m3d_tensors: dict[str, torch.Tensor]
    siglip_full: bool


def _read_components(
    llm: PathLike,
    vision2d: PathLike | None,
    vision3d: PathLike,
    tokenizer: TokenizerSource,
    question_tokenizer: TokenizerSource,
    overrides: dict[str, Any],
) -> _Components:
    llm, vision3d = Path(llm), Path(vision3d)
    for folder in (llm, vision3d, *([Path(vision2d)] if vision2d is not None else [])):
        if not folder.is_dir():
            raise ReleaseError(folder, "no such folder")
    text_config = _llm_config(llm)
    m3d_tensors = read_state_dict(vision3d)
    llm_tokenizer = _load_tokenizer(tokenizer, [llm])
    if llm_tokenizer is not None:
        fit_llm_tokenizer(llm_tokenizer, text_config, llm)
    fields: dict[str, Any] = {
        "text_config": text_config,
        "vision3d_config": _vit3d_config(vision3d),
        "image_token_id": _image_token_id(
            llm_tokenizer, text_config.vocab_size, overrides.pop("image_token_id", None), llm
        ),
    }
    siglip_full = False
    aggregation = overrides.get("slice_aggregation", Med2E3Config.slice_aggregation)
    if aggregation != "none":
        if vision2d is None:
            raise ReleaseError(None, "the 2D branch needs vision2d= (a local SigLIP folder)")
        fields["vision2d_config"], siglip_full = _siglip_config(Path(vision2d))
    if aggregation == "tgis":
        fields["question_encoder_config"] = _bert_config(m3d_tensors, vision3d)
    config = Med2E3Config(**{**fields, **overrides})
    bert_tokenizer = (
        _load_tokenizer(question_tokenizer, [vision3d], BertConfig())
        if config.slice_aggregation == "tgis"
        else None
    )
    return _Components(config, llm_tokenizer, bert_tokenizer, m3d_tensors, siglip_full)


def config_from_components(
    llm: PathLike,
    vision2d: PathLike | None,
    vision3d: PathLike,
    *,
    tokenizer: TokenizerSource = None,
    **overrides: Any,
) -> Med2E3Config:
    """Med2E3Config for a causal LLM, a SigLIP and an M3D-CLIP folder; ``overrides`` set top-level fields.

    The image token id comes from the LLM tokenizer (``<image3d>`` added; the LLM's vocabulary grows when
    the tokenizer has no free row, `fit_llm_tokenizer`) when there is one, else from ``image_token_id=``
    (default 32011).
    """
    return _read_components(llm, vision2d, vision3d, tokenizer, None, dict(overrides)).config


def read_llm_folder(folder: Path) -> tuple[PreTrainedConfig, PreTrainedTokenizerBase | None]:
    """The config of a causal-LM folder (``save_pretrained`` layout, or one GGUF file) and its tokenizer
    (None when it has none); ReleaseError naming the file that cannot be read."""
    return _llm_config(folder), _load_tokenizer(None, [folder])


def load_pretrained_weights(part: PreTrainedModel, folder: Path) -> None:
    """Copy into ``part`` the weights of the same architecture in ``folder`` (a ``save_pretrained`` folder or
    one GGUF file, dequantised); a pretrained embedding with fewer rows than ``part``'s grows (`fit_llm_tokenizer`),
    its new rows drawn close to the mean of the others. ReleaseError naming the folder when weights are
    missing or of another shape; weights ``part`` has no place for (e.g. a BERT checkpoint's pretraining
    heads) are skipped with a warning naming them."""
    pretrained, info = type(part).from_pretrained(
        folder, dtype=part.dtype, local_files_only=True, output_loading_info=True, **gguf_kwargs(folder)
    )
    problems = [
        f"{key} ({len(info[key])}): {_listing(sorted(map(str, info[key])))}"
        for key in ("missing_keys", "mismatched_keys")
        if info.get(key)
    ]
    if problems:
        raise ReleaseError(folder, "the weights do not match its config:\n  " + "\n  ".join(problems))
    if info.get("unexpected_keys"):
        unused = sorted(map(str, info["unexpected_keys"]))
        logger.warning("%s: %d weights not used: %s", folder, len(unused), _listing(unused))
    rows = part.get_input_embeddings().num_embeddings
    if pretrained.get_input_embeddings().num_embeddings != rows:
        pretrained.resize_token_embeddings(rows)
    part.load_state_dict(pretrained.state_dict())


def _load_encoders(
    model: Med2E3ForConditionalGeneration, parts: _Components, vision2d: Path | None, vision3d: Path
) -> None:
    """Load M3D-CLIP's ViT (and BERT for TG-IS) and SigLIP's vision tower, strictly."""
    aggregation = parts.config.slice_aggregation
    ignored = IGNORED_RELEASE_TENSORS["vision3d_model"] + (
        () if aggregation == "tgis" else ("language_encoder.*",)
    )
    collected = _Collected()
    collected.add(str(find_weights(vision3d)), parts.m3d_tensors, TensorMap(M3D_CLIP_RULES, ignored))
    encoders = ["vision3d", "question_encoder"] if aggregation == "tgis" else ["vision3d"]
    if aggregation != "none":
        siglip_ignored = IGNORED_RELEASE_TENSORS["vision2d_model"] + (
            SIGLIP_TEXT_TENSORS if parts.siglip_full else ()
        )
        collected.add(
            str(find_weights(vision2d)), read_state_dict(vision2d), TensorMap(SIGLIP_RULES, siglip_ignored)
        )
        encoders.append("vision2d")
    collected.check(_shapes(model, tuple(f"{name}." for name in encoders)), None)
    for name in encoders:
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in collected.tensors.items() if k.startswith(prefix)}
        getattr(model, name).load_state_dict(own, strict=True)


@torch.no_grad()
def _init_connectors(model: Med2E3ForConditionalGeneration) -> None:
    """Initialise the connectors and the TG-IS projection as a newly built model would."""
    for name in ("projector3d", "projector2d", "tgis"):
        if hasattr(model, name):
            getattr(model, name).apply(model._init_weights)


def model_from_components(
    llm: PathLike,
    vision2d: PathLike | None,
    vision3d: PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    tokenizer: TokenizerSource = None,
    question_tokenizer: TokenizerSource = None,
    **overrides: Any,
) -> tuple[Med2E3ForConditionalGeneration, Med2E3Processor | None]:
    """Med-2E3 on real backbones, connectors and TG-IS projection freshly initialised (stage-1 start).

    Args:
        llm: a causal-LM folder: ``save_pretrained`` layout (with its tokenizer if available) or one GGUF
            file (dequantised; its tokenizer comes with it). A tokenizer with no free row for the image
            token grows the LLM's vocabulary (`fit_llm_tokenizer`).
        vision2d: a SiglipVisionModel or full SiglipModel folder (None for ``slice_aggregation="none"``).
        vision3d: an M3D-CLIP folder (config.json + weights; its BERT tokenizer if available).
        dtype: model dtype (default float32).
        tokenizer, question_tokenizer: override the tokenizers found in ``llm`` / ``vision3d``.
        overrides: top-level Med2E3Config fields (e.g. ``slice_aggregation="mean"``).
    """
    parts = _read_components(llm, vision2d, vision3d, tokenizer, question_tokenizer, dict(overrides))
    model = _empty_model(parts.config, _dtype(dtype))
    load_pretrained_weights(model.language_model, Path(llm))
    _load_encoders(model, parts, None if vision2d is None else Path(vision2d), Path(vision3d))
    _init_connectors(model)
    processor = _processor(
        parts.config, parts.tokenizer, parts.question_tokenizer, DEFAULT_MAX_LENGTH, Path(llm)
    )
    return model.eval(), processor
