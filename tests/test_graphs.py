"""Question-length buckets and the compile=True path on CPU: same question features, scores and answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from med2e3 import Med2E3Config, Med2E3ForConditionalGeneration, Med2E3Processor
from med2e3.graphs import GraphedCall, pad_questions, question_bucket, question_buckets
from med2e3.inference import Med2E3Predictor

QUESTIONS = ["Which organ has a lesion?", "Is there any abnormality in the liver near the portal vein?"]


@pytest.fixture(scope="module")
def predictor() -> Med2E3Predictor:
    torch.manual_seed(0)
    config = Med2E3Config.from_preset("tiny")
    model = Med2E3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # spread the TG-IS scores and the question features, so differences show
        model.tgis.text_proj.weight.normal_(std=2.0)
        model.projector2d.linear_2.weight.normal_(std=1.0)
    processor = Med2E3Processor.for_config(config)
    processor.check_config(config)
    return Med2E3Predictor(model, processor)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 0.3, size=(1, 40, 72, 72)).astype(np.float32)
    vol[0, 5:35, 10:60, 10:60] += 0.4
    return vol


def test_buckets():
    assert question_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert question_buckets(128) == (16, 32, 64, 128)
    assert question_buckets(100) == (16, 32, 64, 100)
    assert [question_bucket(n, 128) for n in (1, 16, 17, 33, 65, 128)] == [16, 16, 32, 64, 128, 128]


def test_padding_keeps_tokens_and_masks_the_rest():
    ids = torch.tensor([[101, 7, 8, 102], [101, 9, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    padded, padded_mask = pad_questions(ids, mask, 128, pad_token_id=0)
    assert padded.shape == padded_mask.shape == (2, 16)
    assert torch.equal(padded[:, :4], ids) and torch.equal(padded_mask[:, :4], mask)
    assert not padded[:, 4:].any() and not padded_mask[:, 4:].any()
    same = pad_questions(padded, padded_mask, 128, 0)
    assert same[0] is padded  # already a bucket: untouched


@torch.no_grad()
def test_bucketing_keeps_pooled_question_and_scores(predictor, volume):
    """The BERT pooler output and TG-IS scores with padding to the bucket equal those without (fp32)."""
    model = predictor.model
    loaded = predictor.load(volume)
    batch = predictor.processor(QUESTIONS, padding_side="left")
    ids, mask = batch["question_input_ids"], batch["question_attention_mask"]
    padded, padded_mask = pad_questions(ids, mask, predictor.question_limit, 0)
    assert padded.shape[1] > ids.shape[1]  # the test pads something
    plain = model.encode_question(ids, mask)
    bucketed = model.encode_question(padded, padded_mask)
    torch.testing.assert_close(bucketed, plain, rtol=1e-5, atol=1e-6)
    # the mask is what keeps it equal: unmasked padding changes the pooled question
    assert not torch.allclose(model.encode_question(padded, torch.ones_like(padded)), plain, atol=1e-4)
    encoding = loaded.encoding.expand(len(QUESTIONS))
    tokens, scores = model.visual_tokens(encoding, ids, mask)
    tokens_b, scores_b = predictor.visual_tokens(encoding, ids, mask)  # pads to the bucket
    torch.testing.assert_close(scores_b, scores, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tokens_b, tokens, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_bucketed_predictor_answers_as_the_unpadded_model(predictor, volume):
    """Greedy answers and scores of the predictor (questions padded to buckets) equal a plain `generate`
    with the volume and unpadded questions (fp32)."""
    loaded = predictor.load(volume)
    answers = predictor.ask_many(QUESTIONS, max_new_tokens=8)
    batch = predictor.processor(QUESTIONS, padding_side="left")
    assert batch["question_input_ids"].shape[1] not in question_buckets(predictor.question_limit)
    out = predictor.model.generate(
        **batch,
        volume_encoding=loaded.encoding.expand(len(QUESTIONS)),
        max_new_tokens=8,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=0,
    )
    prompt = batch["input_ids"].shape[1]
    assert [a.answer for a in answers] == [predictor.processor.decode(s[prompt:]) for s in out.sequences]
    torch.testing.assert_close(torch.tensor([a.slice_scores for a in answers]), out.slice_scores)
    assert answers[0].slice_scores != answers[1].slice_scores


def test_compile_option_on_cpu_gives_the_default_answers(predictor, volume):
    """compile=True on CPU records no graphs and answers exactly as compile=False."""
    fast = Med2E3Predictor(predictor.model, predictor.processor, compile=True)
    assert not isinstance(fast._encoder, GraphedCall) and not isinstance(fast._visual, GraphedCall)
    fast.warm()  # runs eagerly on CPU
    a = fast.load(volume)
    b = predictor.load(volume)
    assert torch.equal(a.encoding.tokens3d, b.encoding.tokens3d)
    got = fast.ask_many(QUESTIONS, max_new_tokens=8)
    want = predictor.ask_many(QUESTIONS, max_new_tokens=8)
    assert [x.answer for x in got] == [x.answer for x in want]
    assert [x.slice_scores for x in got] == [x.slice_scores for x in want]
    assert fast.slice_scores(QUESTIONS[1]) == predictor.slice_scores(QUESTIONS[1])


def test_graphed_call_on_cpu_tensors_calls_through():
    calls = []
    graphed = GraphedCall(lambda x, y: calls.append(1) or (x + 1, None), "add")
    out = graphed(torch.ones(2), None)
    assert torch.equal(out[0], torch.full((2,), 2.0)) and out[1] is None
    assert calls == [1] and graphed.graphs == {} and graphed.recorded == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_call_replays_new_inputs_on_cuda():
    weight = torch.randn(8, 8, device="cuda")
    graphed = GraphedCall(lambda x: (torch.tanh(x @ weight), x.sum(dim=1)), "mlp")
    for _ in range(3):
        x = torch.randn(4, 8, device="cuda")
        got = graphed(x)
        torch.testing.assert_close(got[0], torch.tanh(x @ weight))
        torch.testing.assert_close(got[1], x.sum(dim=1))
    assert graphed.recorded == 1 and not graphed.failures
    first = graphed(torch.zeros(4, 8, device="cuda"))[0]
    graphed(torch.ones(4, 8, device="cuda"))
    assert not first.any()  # outputs are copies: a later replay does not overwrite them
