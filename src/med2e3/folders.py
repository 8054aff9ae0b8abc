"""What a med2e3 model folder must hold, checked before anything is loaded (one-line errors, light imports)."""

from __future__ import annotations

import json
from pathlib import Path

from med2e3.errors import ConfigError

MODEL_TYPE = "med2e3"
#: How configs and commands name folders shipped with the package: ``bundled:NAME`` is ``assets/NAME``.
BUNDLED = "bundled:"
#: The stage-0 language model (`med2e3.training.letters`).
BUNDLED_TINY_LLM = "bundled:tiny_llm"
#: The demo's starting point: the tiny preset trained on its own synthetic volumes (scripts/train_tiny_model.sh).
BUNDLED_TINY_MODEL = "bundled:tiny_model"
#: Files any one of which makes a folder hold a tokenizer (fast, SentencePiece, WordPiece, BPE vocabularies).
TOKENIZER_VOCAB_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


def check_tokenizer_folder(folder: str | Path) -> Path:
    """Raise ConfigError naming ``folder`` unless it holds tokenizer files."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise ConfigError(f"{folder}: no tokenizer files (none of {', '.join(TOKENIZER_VOCAB_FILES)})")
    return folder


def check_model_folder(path: str | Path, role: str = "model folder") -> Path:
    """Raise ConfigError unless ``path`` holds a complete med2e3 model: its config, readable weights and
    tokenizer files. ``role`` names the folder in the message (e.g. ``model.init_from``)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: {role} does not exist")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"{path}: not a med2e3 model folder (no config.json)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ConfigError(f"{config}: not valid JSON") from None
    if model_type != MODEL_TYPE:
        raise ConfigError(f"{path}: not a med2e3 model (config.json says model_type={model_type!r})")
    _check_folder_weights(path, "was its training run finished?")
    check_tokenizer_folder(path)
    return path


def _check_folder_weights(path: Path, hint: str) -> None:
    """Raise ConfigError unless ``path`` has safetensors weights, each with a readable header."""
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"{path}: no weights (*.safetensors); {hint}")
    for file in weights:
        _check_weights(file)


def _check_weights(file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, "np"):  # reads the header and checks it against the file's size
            pass
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{file}: truncated or corrupt weights file ({err})") from None


#: Fields of a language model's config that must equal the preset's for its weights to fit.
_LLM_SHAPE_FIELDS: tuple[str, ...] = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


def check_llm_folder(path: str | Path, expected: dict, role: str = "model.language_model") -> Path:
    """Raise ConfigError unless ``path`` holds a causal LM (config + readable weights) shaped like
    ``expected`` (a text config as a dict); the message names the file and the fields that differ."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: {role} does not exist")
    config = path / "config.json"
    try:
        found = json.loads(config.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not a language model folder (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{config}: not valid JSON") from None
    differ = [
        f"{key} {found.get(key)!r} (preset: {expected.get(key)!r})"
        for key in _LLM_SHAPE_FIELDS
        if found.get(key) != expected.get(key)
    ]
    if differ:
        raise ConfigError(f"{config}: {role} does not fit the preset's LLM: {', '.join(differ)}")
    _check_folder_weights(path, f"for {role}")
    return path


def bundled_folder(value: str | Path) -> Path:
    """The folder ``value`` names: ``bundled:NAME`` is the package's ``assets/NAME``, anything else a path."""
    text = str(value)
    if not text.startswith(BUNDLED):
        return Path(value)
    from importlib import resources

    assets = Path(str(resources.files("med2e3").joinpath("assets")))
    shipped = {p.name: p for p in assets.iterdir() if (p / "config.json").is_file()}
    name = text.removeprefix(BUNDLED)
    if name not in shipped:
        names = ", ".join(BUNDLED + n for n in sorted(shipped))
        raise ConfigError(f"{value}: no such bundled folder (the package ships {names})")
    return shipped[name]
