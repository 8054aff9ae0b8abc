"""What a med2e3 model folder must hold, checked before anything is loaded (one-line errors, light imports)."""

from __future__ import annotations

import json
from pathlib import Path

from med2e3.errors import ConfigError

MODEL_TYPE = "med2e3"
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
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"{path}: no weights (*.safetensors); was its training run finished?")
    for file in weights:
        _check_weights(file)
    check_tokenizer_folder(path)
    return path


def _check_weights(file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, "np"):  # reads the header and checks it against the file's size
            pass
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{file}: truncated or corrupt weights file ({err})") from None
