"""The tiny preset's recipe parts: the stage-0 language model, answer-mean loss, a trainable 3D encoder."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from med2e3.config import Med2E3Config
from med2e3.data.processor import IGNORE_INDEX, Med2E3Processor
from med2e3.errors import ConfigError, DatasetError
from med2e3.folders import BUNDLED_TINY_LLM, check_llm_folder, named_folder
from med2e3.model import Med2E3ForConditionalGeneration
from med2e3.training import train
from med2e3.training.config import config_from_dict
from med2e3.training.letters import LookupDataset, benchmark_choices, lookup_accuracy, lookup_example
from med2e3.training.trainer import answer_mean_loss, build_model, relevant_slice_loss

TINY_TEXT = Med2E3Config.from_preset("tiny").text_config.to_dict()


@pytest.fixture(scope="module")
def choice_lists() -> list[list[str]]:
    return benchmark_choices(volumes=20)


def fields(tmp_path, data, **extra) -> dict:
    return {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "run"),
        "data": {"train": [{"format": "conversations", "path": str(data)}], "cache_dir": str(tmp_path / "c")},
        "batch_size": 4,
        "save_steps": 1000,
        **extra,
    }


def test_answer_mean_loss_weighs_answers_not_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 1:2] = torch.tensor([3])  # a one-token answer
    labels[1, 1:6] = torch.tensor([1, 2, 3, 4, 5])  # a five-token answer
    token = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=IGNORE_INDEX
    )
    per_answer = torch.stack([token[0, :1].mean(), token[1, :5].mean()])
    got = answer_mean_loss(SimpleNamespace(logits=logits), labels)
    assert torch.allclose(got, per_answer.mean())
    assert not torch.allclose(got, token.sum() / 6)  # the release's token mean differs here


def test_lookup_examples_name_their_answer(choice_lists):
    assert all(len(options) == 4 for options in choice_lists)
    rng = random.Random(3)
    for _ in range(50):
        text, answer = lookup_example(rng, choice_lists)
        letter, option = answer.split(". ", 1)
        assert f"{letter}. {option}" in text.split(" Choices: ")[1] and option in text.split(" Choices: ")[0]
    processor = Med2E3Processor.for_config(Med2E3Config.from_preset("tiny"))
    item = LookupDataset(processor, choice_lists, 4, seed=1)[2]
    assert item == LookupDataset(processor, choice_lists, 4, seed=1)[2]  # a function of (seed, index)
    answer_at = [i for i, y in enumerate(item["labels"]) if y != IGNORE_INDEX]
    assert (
        processor.tokenizer.decode([item["input_ids"][i] for i in answer_at])
        .strip()
        .startswith(item["letter"])
    )
    assert processor.image_token_id not in item["input_ids"]


def test_the_bundled_llm_fits_the_tiny_preset_and_picks_letters(choice_lists):
    folder = named_folder(BUNDLED_TINY_LLM)
    check_llm_folder(folder, TINY_TEXT)
    record = json.loads((folder / "letters_run.json").read_text())
    processor = Med2E3Processor.for_config(Med2E3Config.from_preset("tiny"))
    llm = AutoModelForCausalLM.from_pretrained(folder)
    measured = lookup_accuracy(llm, processor, choice_lists, n=128)
    random_llm = AutoModelForCausalLM.from_config(Med2E3Config.from_preset("tiny").text_config)
    assert measured > 0.8 and record["lookup_accuracy"] > 0.8
    assert lookup_accuracy(random_llm, processor, choice_lists, n=128) < 0.5


def test_language_model_replaces_the_preset_llm(tmp_path, tiny_dataset):
    torch.manual_seed(5)
    llm = AutoModelForCausalLM.from_config(Med2E3Config.from_preset("tiny").text_config)
    llm.save_pretrained(tmp_path / "llm")
    config = config_from_dict(
        fields(tmp_path, tiny_dataset, model={"preset": "tiny", "language_model": str(tmp_path / "llm")})
    )
    model, _ = build_model(config)
    for name, value in llm.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[name], value), name


def test_a_language_model_that_does_not_fit_is_refused_before_training(tmp_path, tiny_dataset):
    wide = Med2E3Config.from_preset("tiny").text_config
    wide.hidden_size = 64
    AutoModelForCausalLM.from_config(wide).save_pretrained(tmp_path / "wide")
    config = config_from_dict(
        fields(tmp_path, tiny_dataset, model={"preset": "tiny", "language_model": str(tmp_path / "wide")})
    )
    with pytest.raises(ConfigError, match=r"wide/config.json: .*hidden_size 64 \(preset: 128\)"):
        train(config)
    AutoModelForCausalLM.from_config(Med2E3Config.from_preset("tiny").text_config).save_pretrained(
        tmp_path / "cut"
    )
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cut = config_from_dict(
        fields(tmp_path, tiny_dataset, model={"preset": "tiny", "language_model": str(tmp_path / "cut")})
    )
    with pytest.raises(ConfigError, match="cut/model.safetensors: truncated or corrupt"):
        train(cut)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="use it with model.preset only"):
        config_from_dict(fields(tmp_path, tiny_dataset, model={"init_from": "x", "language_model": "y"}))


def test_answer_loss_and_a_trainable_3d_encoder_train(tmp_path, tiny_dataset):
    config = config_from_dict(
        fields(
            tmp_path,
            tiny_dataset,
            max_steps=3,
            lr=1e-3,
            loss_average="answer",
            train_vision3d=True,
            model={"preset": "tiny", "language_model": BUNDLED_TINY_LLM},
        )
    )
    torch.manual_seed(0)
    before = Med2E3ForConditionalGeneration(Med2E3Config.from_preset("tiny")).state_dict()
    after = load_file(train(config) / "model.safetensors")
    changed = {n.split(".")[0] for n, v in after.items() if not torch.equal(v, before[n])}
    assert {"vision3d", "projector3d", "projector2d", "tgis"} <= changed
    bundled = load_file(named_folder(BUNDLED_TINY_LLM) / "model.safetensors")
    for name, value in bundled.items():  # loaded, then frozen in stage 1
        assert torch.equal(after[f"language_model.{name}"], value), name


def test_relevant_slice_loss_rewards_mass_on_the_listed_slices():
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    relevant = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    got = relevant_slice_loss(scores, relevant)
    assert torch.allclose(got, -(torch.tensor(0.7).log() + torch.tensor(0.5).log()) / 2)  # row 3: all slices
    none = torch.zeros_like(relevant)
    assert relevant_slice_loss(scores.requires_grad_(), none).item() == 0.0


def _with_relevant_slices(path, slices) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**row, "relevant_slices": slices}) + "\n" for row in rows))


def _relevant_mass(model_dir, data, slices) -> float:
    from med2e3.inference import Med2E3Predictor

    predictor = Med2E3Predictor.from_pretrained(model_dir)
    predictor.load(data.parent / "vol0.npy")
    scores = predictor.slice_scores("Where is the bright lesion?")
    return sum(scores[i] for i in slices)


def test_the_slice_loss_moves_tgis_towards_the_relevant_slices(tmp_path, tiny_dataset):
    slices = list(range(10, 20))  # the bright block's slices
    _with_relevant_slices(tiny_dataset, slices)
    masses = {}
    for weight in (0.0, 5.0):
        config = config_from_dict(
            fields(
                tmp_path / str(weight),
                tiny_dataset,
                max_steps=20,
                lr=1e-2,
                slice_loss_weight=weight,
                model={"preset": "tiny"},
            )
        )
        torch.manual_seed(0)
        masses[weight] = _relevant_mass(train(config), tiny_dataset, slices)
    uniform = len(slices) / 32
    assert masses[5.0] > masses[0.0] + 0.05 and masses[5.0] > uniform + 0.05, masses


def test_the_slice_loss_needs_listed_slices_in_range(tmp_path, tiny_dataset):
    config = config_from_dict(fields(tmp_path, tiny_dataset, max_steps=1, slice_loss_weight=1.0))
    with pytest.raises(ConfigError, match="no example of data.train lists relevant slices"):
        train(config)
    _with_relevant_slices(tiny_dataset, [3, 32])
    with pytest.raises(DatasetError, match="relevant slice 32 is outside the model's 32 slices"):
        train(config)
    assert not (tmp_path / "run").exists()
    mean = config_from_dict(
        fields(tmp_path, tiny_dataset, slice_loss_weight=1.0, model={"slice_aggregation": "mean"})
    )
    with pytest.raises(
        ConfigError, match="slice_loss_weight trains TG-IS, but the model's slice_aggregation is 'mean'"
    ):
        train(mean)
    with pytest.raises(ConfigError, match="slice_loss_weight must be at least 0"):
        config_from_dict(fields(tmp_path, tiny_dataset, slice_loss_weight=-1))


def test_reinit_question_encoder_restarts_only_the_tgis_question_path(tmp_path, tiny_dataset, tiny_model_dir):
    raw = fields(tmp_path, tiny_dataset, stage="finetune", model={"init_from": str(tiny_model_dir)})
    kept, _ = build_model(config_from_dict(raw))
    raw["model"]["reinit_question_encoder"] = True
    fresh, _ = build_model(config_from_dict(raw))
    again, _ = build_model(config_from_dict(raw))
    old, new, same = kept.state_dict(), fresh.state_dict(), again.state_dict()
    changed = {n for n in old if not torch.equal(old[n], new[n])}
    assert changed and all(n.startswith(("question_encoder.", "tgis.text_proj.")) for n in changed)
    assert (
        "tgis.text_proj.weight" in changed and "question_encoder.embeddings.word_embeddings.weight" in changed
    )
    assert all(torch.equal(new[n], same[n]) for n in new)  # seeded
    raw.update(stage="pretrain", model={"preset": "tiny", "reinit_question_encoder": True})
    with pytest.raises(ConfigError, match="applies to model.init_from"):
        config_from_dict(raw)
