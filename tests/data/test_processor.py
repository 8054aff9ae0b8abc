"""Med2E3Processor: chat template, placeholder expansion, label masking, padding, persistence."""

from __future__ import annotations

import pytest
import torch

from med2e3.config import Med2E3Config
from med2e3.data.processor import IGNORE_INDEX, SYSTEM_PROMPT, Med2E3Processor
from med2e3.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def processor() -> Med2E3Processor:
    return Med2E3Processor.for_config(Med2E3Config.from_preset("tiny"))


def test_prompt_follows_the_release_template(processor):
    assert processor.prompt("  Which organ?  ") == f"{SYSTEM_PROMPT} USER: <image3d>\nWhich organ? ASSISTANT:"


def test_token_and_label_layout(processor):
    batch = processor(["Which organ has a lesion?"], answers=["The left kidney."])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    tok = processor.tokenizer
    image = (ids == processor.image_token_id).nonzero().flatten()
    assert len(image) == processor.num_image_tokens == 32
    assert torch.equal(image, torch.arange(image[0], image[0] + 32))  # one contiguous block
    prompt_len = (
        len(tok(processor.prompt("Which organ has a lesion?"), add_special_tokens=False)["input_ids"]) + 31
    )
    assert (labels[:prompt_len] == IGNORE_INDEX).all()
    answer = labels[prompt_len:]
    assert (answer != IGNORE_INDEX).all() and answer[-1] == tok.eos_token_id
    assert tok.decode(answer[:-1]).strip() == "The left kidney."
    assert torch.equal(ids[prompt_len:], answer)
    assert processor.question_tokenizer.decode(batch["question_input_ids"][0], skip_special_tokens=True) == (
        "which organ has a lesion?"
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_sides(processor, side):
    batch = processor(
        ["Short?", "A much longer question about the liver and the spleen?"],
        answers=["a", "b"],
        padding_side=side,
    )
    mask = batch["attention_mask"]
    assert mask[1].all() and not mask[0].all()
    pad_at = 0 if side == "left" else -1
    assert mask[0, pad_at] == 0 and batch["labels"][0, pad_at] == IGNORE_INDEX
    assert batch["input_ids"][0, pad_at] == processor.tokenizer.pad_token_id


def test_answers_are_truncated_prompts_are_not(processor):
    processor = Med2E3Processor(
        processor.tokenizer, processor.question_tokenizer, processor.num_image_tokens, max_length=120
    )
    batch = processor(["Report?"], answers=["word " * 500])
    assert batch["input_ids"].shape[1] == 120
    with pytest.raises(InputError, match="over max_length"):
        processor(["very long question " * 100])


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = Med2E3Processor.from_pretrained(tmp_path)
    a = processor(["Where?"], answers=["Here."])
    b = loaded(["Where?"], answers=["Here."])
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="not a med2e3 model folder"):
        Med2E3Processor.from_pretrained(tmp_path / "question_tokenizer")


def test_processor_must_fit_the_config(processor):
    other = Med2E3Config.from_preset("tiny", slice_aggregation="none")
    with pytest.raises(ConfigError, match="expands the placeholder to 32 tokens"):
        processor.check_config(other)


def test_question_length_is_bounded_by_the_question_encoder(tmp_path):
    config = Med2E3Config.from_preset("tiny")
    saved = Med2E3Processor.for_config(config)
    assert saved.question_max_length == config.question_encoder_config.max_position_embeddings == 128
    saved.question_max_length = 512  # what folders saved before the bound say
    saved.save_pretrained(tmp_path)
    loaded = Med2E3Processor.from_pretrained(tmp_path)
    loaded.check_config(config)
    assert loaded.question_max_length == 128
    long = "where is the lesion " * 60
    assert loaded.question_length(long) > 128
    assert loaded([long])["question_input_ids"].shape[1] == 128
