"""Behaviour of Med2E3ForConditionalGeneration on the tiny preset (and paper shapes on the meta device)."""

from __future__ import annotations

import pytest
import torch

from med2e3.config import Med2E3Config
from med2e3.data.processor import Med2E3Processor
from med2e3.errors import InputError
from med2e3.model import Med2E3ForConditionalGeneration

QUESTIONS = ["What abnormality is seen in the left kidney?", "Which plane is this image in?"]


def build(aggregation: str = "tgis", seed: int = 0) -> tuple[Med2E3ForConditionalGeneration, Med2E3Processor]:
    torch.manual_seed(seed)
    config = Med2E3Config.from_preset("tiny", slice_aggregation=aggregation)
    return Med2E3ForConditionalGeneration(config).eval(), Med2E3Processor.for_config(config)


def volumes(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 32, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tgis():
    return build("tgis")


# ---- shapes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregation", ["tgis", "mean", "none"])
def test_tiny_shapes_at_every_stage(aggregation):
    model, processor = build(aggregation)
    config = model.config
    batch = processor(QUESTIONS, volumes=volumes(2))
    with torch.no_grad():
        block = model.vision3d.block_output(batch["pixel_values"], -1)
        assert block.shape == (2, 1 + 8 * 4 * 4, 64)  # CLS + 8x4x4 patches
        encoding = model.encode_volume(batch["pixel_values"])
        assert encoding.tokens3d.shape == (2, 4 * 2 * 2, 128)  # pooled 4x2x2 grid, LLM width
        tokens, scores = model.visual_tokens(
            encoding, batch.get("question_input_ids"), batch.get("question_attention_mask")
        )
        out = model(**batch)
    if aggregation == "none":
        assert encoding.slice_tokens is None and scores is None
        assert tokens.shape == (2, 16, 128) and config.num_image_tokens == 16
    else:
        assert encoding.slice_tokens.shape == (2, 32, 16, 128)  # 32 slices x (64/16)^2 patches
        assert tokens.shape == (2, 32, 128) and scores.shape == (2, 32)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], config.text_config.vocab_size)


def test_paper_geometry_on_meta_device():
    config = Med2E3Config.from_preset("paper")
    assert (config.num_3d_tokens, config.num_2d_tokens, config.num_image_tokens) == (256, 256, 512)
    with torch.device("meta"):
        model = Med2E3ForConditionalGeneration(config)
        encoding = model.encode_volume(torch.empty(1, 1, 32, 256, 256))
        question = torch.zeros(1, 12, dtype=torch.long)
        tokens, scores = model.visual_tokens(encoding, question, None)
        logits = model.language_model(inputs_embeds=torch.empty(1, 551, 3072)).logits
    assert model.vision3d.block_output(torch.empty(1, 1, 32, 256, 256, device="meta"), -1).shape == (
        1,
        2049,
        768,
    )
    assert encoding.tokens3d.shape == (1, 256, 3072)
    assert encoding.slice_tokens.shape == (1, 32, 256, 3072)
    assert tokens.shape == (1, 512, 3072) and scores.shape == (1, 32)
    assert logits.shape == (1, 551, 32064)
    llm = sum(p.numel() for p in model.language_model.parameters())
    assert 3.7e9 < llm < 3.9e9  # Phi-3-mini
    assert 2.9e8 < sum(p.numel() for p in model.vision2d.parameters()) < 3.1e8  # SigLIP-large vision tower


# ---- TG-IS ----------------------------------------------------------------------------------------------
def test_tgis_scores_match_the_equation(tgis):
    model, processor = tgis
    batch = processor(QUESTIONS, volumes=volumes(2))
    with torch.no_grad():
        enc = model.encode_volume(batch["pixel_values"])
        tokens, scores = model.visual_tokens(
            enc, batch["question_input_ids"], batch["question_attention_mask"]
        )
        # independent recomputation from the intermediate tensors (reference, section 3)
        pooled = model.question_encoder(
            input_ids=batch["question_input_ids"], attention_mask=batch["question_attention_mask"]
        ).pooler_output
        t = pooled @ model.tgis.text_proj.weight.T + model.tgis.text_proj.bias
        v3 = enc.tokens3d.reshape(2, 4, 4, -1)  # 4 depth groups x 4 in-plane tokens
        expected = torch.empty(2, 32)
        for b in range(2):
            for j in range(32):
                tokens_j = torch.cat([v3[b, j // 8], enc.slice_tokens[b, j]], dim=0)  # 4 + 16 tokens
                expected[b, j] = tokens_j.mean(0) @ t[b] / 5.0
        expected = expected.softmax(-1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2))
    aggregated = sum(expected[:, j, None, None] * enc.slice_tokens[:, j] for j in range(32))
    torch.testing.assert_close(tokens, torch.cat([enc.tokens3d, aggregated], dim=1), rtol=1e-5, atol=1e-5)


def test_tgis_score_dropout_only_in_training(tgis):
    model, processor = tgis
    batch = processor(QUESTIONS[:1], volumes=volumes(1))
    model.train()
    try:
        torch.manual_seed(0)
        out = model(**batch)
    finally:
        model.eval()
    kept = out.slice_scores[out.slice_scores > 0]
    assert (out.slice_scores == 0).any()  # p=0.1 over 32 slices: some dropped with this seed
    assert kept.sum() > 0
    with torch.no_grad():
        assert torch.allclose(model(**batch).slice_scores.sum(), torch.tensor(1.0))


def test_mean_gives_uniform_scores():
    model, processor = build("mean")
    with torch.no_grad():
        out = model(**processor(QUESTIONS, volumes=volumes(2)))
    assert torch.equal(out.slice_scores, torch.full((2, 32), 1 / 32))


def test_none_has_no_2d_branch():
    model, processor = build("none")
    assert not hasattr(model, "vision2d") and not hasattr(model, "tgis")
    assert processor.question_tokenizer is None
    batch = processor(QUESTIONS, volumes=volumes(2))
    assert int((batch["input_ids"][0] == model.config.image_token_id).sum()) == model.config.num_3d_tokens
    with torch.no_grad():
        assert model(**batch).slice_scores is None


def test_scores_depend_on_question_and_on_volume():
    model, processor = build("tgis")
    with torch.no_grad():  # random init (std 0.02) leaves the scores ~uniform; widen the projection
        model.tgis.text_proj.weight.normal_(std=2.0)
        model.projector2d.linear_2.weight.normal_(std=1.0)
        model.projector3d.mlp.linear_2.weight.normal_(std=1.0)
    vol = volumes(1)
    with torch.no_grad():
        a = model(**processor(QUESTIONS[:1], volumes=vol)).slice_scores
        b = model(**processor(QUESTIONS[1:], volumes=vol)).slice_scores
        c = model(**processor(QUESTIONS[:1], volumes=volumes(1, seed=7))).slice_scores
        again = model(**processor(QUESTIONS[:1], volumes=vol)).slice_scores
    assert torch.equal(a, again)
    assert (a - b).abs().max() > 1e-4  # a random BERT pooler varies little between questions
    assert (a - c).abs().max() > 1e-3


# ---- padding, generation, persistence -------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_single_runs(tgis, side):
    model, processor = tgis
    texts = [
        "Is there a lesion?",
        "Describe every organ in this scan and any abnormality you can see in them.",
    ]
    vols = volumes(2)
    with torch.no_grad():
        batch = processor(texts, volumes=vols, padding_side=side)
        assert batch["attention_mask"].sum(1).tolist()[0] < batch["input_ids"].shape[1]
        logits = model(**batch).logits
        for i in range(2):
            single = model(**processor(texts[i : i + 1], volumes=vols[i : i + 1])).logits[0]
            mask = batch["attention_mask"][i].bool()
            torch.testing.assert_close(logits[i][mask], single, rtol=1e-4, atol=1e-4)


def test_greedy_generate_with_and_without_cache_agree(tgis):
    model, processor = tgis
    batch = processor(QUESTIONS, volumes=volumes(2), padding_side="left")
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.sequences.shape[1] > batch["input_ids"].shape[1]
    assert cached.slice_scores.shape == (2, 32)
    torch.testing.assert_close(cached.slice_scores, model(**batch).slice_scores)
    assert not (cached.sequences[:, batch["input_ids"].shape[1] :] == model.config.image_token_id).any()


def test_generate_from_cached_encoding_equals_pixel_path(tgis):
    model, processor = tgis
    batch = processor(QUESTIONS, volumes=volumes(1).expand(2, -1, -1, -1, -1), padding_side="left")
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        direct = model.generate(**batch, **kwargs)
        encoding = model.encode_volume(batch.pop("pixel_values")[:1]).expand(2)
        cached = model.generate(**batch, volume_encoding=encoding, **kwargs)
    assert torch.equal(direct.sequences, cached.sequences)
    torch.testing.assert_close(direct.slice_scores, cached.slice_scores)


@pytest.mark.parametrize("aggregation", ["tgis", "none"])
def test_save_and_load_round_trip(tmp_path, aggregation):
    model, processor = build(aggregation)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = Med2E3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded_processor = Med2E3Processor.from_pretrained(tmp_path)
    assert loaded.config.num_image_tokens == model.config.num_image_tokens
    batch = processor(QUESTIONS, volumes=volumes(2))
    batch2 = loaded_processor(QUESTIONS, volumes=volumes(2))
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, loaded(**batch2).logits, rtol=0, atol=0)


# ---- training stages ------------------------------------------------------------------------------------
def test_stage_freezing_and_gradient_to_question_projection():
    model, processor = build("tgis")
    pretrain = model.set_training_stage("pretrain")
    assert pretrain and all(n.split(".")[0] in {"projector3d", "projector2d", "tgis"} for n in pretrain)
    assert "tgis.text_proj.weight" in pretrain
    batch = processor(QUESTIONS, answers=["A cyst.", "Axial."], volumes=volumes(2))
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["tgis.text_proj.weight"] is not None and grads["tgis.text_proj.weight"].abs().sum() > 0
    assert all(grads[n] is None for n in grads if n not in pretrain)

    finetune = set(model.set_training_stage("finetune"))
    tops = {n.split(".")[0] for n in finetune}
    assert tops == {"projector3d", "projector2d", "tgis", "vision2d", "language_model"}
    assert not any(n.startswith(("vision3d", "question_encoder")) for n in finetune)
    assert not any("post_layernorm" in n for n in finetune)  # unused: features are SigLIP hidden_states
    no_2d = {n.split(".")[0] for n in model.set_training_stage("finetune", train_vision2d=False)}
    assert "vision2d" not in no_2d
    with_question = model.set_training_stage("pretrain", train_question_encoder=True)
    assert {n.split(".")[0] for n in with_question} == {
        "projector3d",
        "projector2d",
        "tgis",
        "question_encoder",
    }
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("question_encoder.pooler")}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    with pytest.raises(ValueError, match="unknown training stage"):
        model.set_training_stage("stage3")


# ---- bad input ------------------------------------------------------------------------------------------
def test_bad_volumes_are_rejected_before_compute(tgis):
    model, processor = tgis
    batch = processor(QUESTIONS[:1], volumes=volumes(1))
    cases = {
        "shape": torch.rand(1, 1, 16, 64, 64),
        "floating-point": (volumes(1) * 255).to(torch.uint8),
        "NaN": volumes(1).index_put((torch.tensor([0]),) * 5, torch.tensor(float("nan"))),
        r"\[0, 1\]": volumes(1) * 1000 - 500,
    }
    for message, bad in cases.items():
        with pytest.raises(InputError, match=message):
            model(**{**batch, "pixel_values": bad})


def test_bad_prompts_are_rejected(tgis):
    model, processor = tgis
    with pytest.raises(InputError, match="placeholder once, found 2"):
        processor(["Compare <image3d> with this"], volumes=volumes(1))
    with pytest.raises(InputError, match="empty"):
        processor(["   "], volumes=volumes(1))
    batch = processor(QUESTIONS[:1], volumes=volumes(1))
    no_image = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, 5)
    with pytest.raises(InputError, match="no image placeholder"):
        model(**{**batch, "input_ids": no_image})
    doubled = torch.cat([batch["input_ids"], batch["input_ids"]], dim=1)
    with pytest.raises(InputError, match="2 image placeholders"):
        model(**{**batch, "input_ids": doubled, "attention_mask": torch.ones_like(doubled)})
    with pytest.raises(InputError, match="no volume"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(InputError, match="one volume per prompt"):
        model(**{**batch, "pixel_values": volumes(2)})


def test_one_entry_point_turns_any_volume_input_into_visual_tokens(tgis):
    model, processor = tgis
    batch = processor(QUESTIONS, volumes=volumes(2), padding_side="left")
    q = {k: batch[k] for k in ("question_input_ids", "question_attention_mask")}
    with torch.no_grad():
        encoding = model.encode_volume(batch["pixel_values"])
        from_pixels = model.get_image_features(batch["pixel_values"], **q)
        from_cache = model.get_image_features(volume_encoding=encoding, **q)
        expected = model.visual_tokens(encoding, *q.values())
        for got in (from_pixels, from_cache):
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        full = model(**batch)
        embeds = model(**{k: v for k, v in batch.items() if k != "pixel_values"}, image_embeds=expected[0])
    assert torch.allclose(full.logits, embeds.logits, atol=1e-6)


def test_conflicting_volume_inputs_are_refused(tgis):
    model, processor = tgis
    batch = processor(QUESTIONS, volumes=volumes(2), padding_side="left")
    with torch.no_grad():
        encoding = model.encode_volume(batch["pixel_values"])
        embeds, _ = model.get_image_features(
            volume_encoding=encoding, question_input_ids=batch["question_input_ids"]
        )
        with pytest.raises(InputError, match="exactly one of pixel_values or volume_encoding"):
            model.get_image_features(batch["pixel_values"], encoding)
        with pytest.raises(InputError, match="exactly one of pixel_values or volume_encoding"):
            model(**batch, volume_encoding=encoding)
        with pytest.raises(InputError, match="image_embeds together with pixel_values"):
            model(**batch, image_embeds=embeds)
        with pytest.raises(InputError, match="image_embeds together with volume_encoding"):
            model.generate(
                input_ids=batch["input_ids"], volume_encoding=encoding, image_embeds=embeds, max_new_tokens=1
            )
        inputs_embeds = model.get_input_embeddings()(batch["input_ids"])
        with pytest.raises(InputError, match="image_embeds need input_ids"):
            model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"], image_embeds=embeds)
