"""Med2E3Predictor: encode once, ask many; batch mode resumes; the TG-IS figure."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from med2e3 import Med2E3Config, Med2E3ForConditionalGeneration, Med2E3Processor
from med2e3.data.io import VolumeWarning
from med2e3.errors import ConfigError, DatasetError, InputError, VolumeError
from med2e3.inference import BatchResult, Med2E3Predictor, Question, completed_ids, read_batch_input
from med2e3.viz import plot_question_scores, plot_slice_scores

QUESTIONS = ["Which organ has a lesion?", "In which plane is this image?", "What is in the left kidney?"]
LONG_QUESTION = "Is there a lesion in the liver near the portal vein, and how large is it? " * 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = Med2E3Config.from_preset("tiny")
    model = Med2E3ForConditionalGeneration(config)
    with torch.no_grad():  # spread the TG-IS scores so that comparisons are not all ~1/32
        model.tgis.text_proj.weight.normal_(std=2.0)
        model.projector2d.linear_2.weight.normal_(std=1.0)
    model.save_pretrained(d)
    Med2E3Processor.for_config(config).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def predictor(model_dir) -> Med2E3Predictor:
    return Med2E3Predictor.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 0.3, size=(1, 40, 72, 72)).astype(np.float32)
    vol[0, 5:35, 10:60, 10:60] += 0.4
    path = tmp_path_factory.mktemp("vol") / "scan.npy"
    np.save(path, vol)
    return path


def test_cached_and_uncached_paths_agree(predictor, volume_path):
    loaded = predictor.load(volume_path)
    cached = predictor.ask(QUESTIONS[0], max_new_tokens=8)
    batch = predictor.processor([QUESTIONS[0]], volumes=loaded.pixel_values, padding_side="left")
    with torch.no_grad():
        uncached = predictor.model.generate(
            **batch,
            max_new_tokens=8,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=0,
        )
    text = predictor.processor.decode(uncached.sequences[0, batch["input_ids"].shape[1] :])
    assert cached.answer == text
    torch.testing.assert_close(torch.tensor(cached.slice_scores), uncached.slice_scores[0])
    assert len(cached.slice_scores) == 32 and abs(sum(cached.slice_scores) - 1) < 1e-5


def test_ask_many_equals_repeated_ask(predictor, volume_path):
    predictor.load(volume_path)
    many = predictor.ask_many(QUESTIONS, max_new_tokens=8)
    single = [predictor.ask(q, max_new_tokens=8) for q in QUESTIONS]
    assert [a.answer for a in many] == [a.answer for a in single]
    for a, b in zip(many, single, strict=True):
        np.testing.assert_allclose(a.slice_scores, b.slice_scores, rtol=1e-5, atol=1e-7)
    assert many[0].slice_scores != many[1].slice_scores  # the question matters


def _scan(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.uniform(0, 0.3, size=(1, 40, 72, 72)).astype(np.float32)
    vol[0, 5 + seed : 30 + seed, 10:60, 10 + 4 * seed : 50 + 4 * seed] += 0.5
    return vol


def test_ask_batch_over_different_volumes_equals_one_at_a_time(predictor):
    """One generation for questions about three volumes, with their own answer lengths and streams: the
    same greedy answers (fp32, CPU) and TG-IS scores as asking each volume alone."""
    volumes = [predictor.load(_scan(seed)) for seed in range(3)]
    asked = [(0, QUESTIONS[0], 8), (1, QUESTIONS[0], 3), (2, QUESTIONS[1], 8), (0, QUESTIONS[2], 5)]
    streamed: list[list[str]] = [[] for _ in asked]
    batch = [
        Question(volumes[v], q, max_new_tokens=n, on_text=streamed[i].append)
        for i, (v, q, n) in enumerate(asked)
    ]
    together = predictor.ask_batch(batch)
    alone = []
    for v, q, n in asked:
        predictor.current = volumes[v]
        alone.append(predictor.ask(q, max_new_tokens=n))
    assert [a.answer for a in together] == [a.answer for a in alone]
    assert ["".join(pieces) for pieces in streamed] == [a.answer for a in alone]
    assert len(together[1].answer.split()) <= 3 < len(together[0].answer.split())  # each row's own length
    for a, b, (v, _, _) in zip(together, alone, asked, strict=True):
        np.testing.assert_allclose(a.slice_scores, b.slice_scores, rtol=1e-5, atol=1e-7)
        assert a.slice_ranges == volumes[v].slice_ranges
    assert together[0].slice_scores != together[1].slice_scores  # the volume matters


def test_static_cache_option_gives_the_same_answers(predictor, volume_path, monkeypatch):
    fast = Med2E3Predictor(predictor.model, predictor.processor, compile=True)
    seen: list[dict] = []
    generate = fast.model.generate
    monkeypatch.setattr(fast.model, "generate", lambda **kw: seen.append(kw) or generate(**kw))
    fast.load(volume_path)
    predictor.load(volume_path)
    got = fast.ask_many(QUESTIONS, max_new_tokens=8)
    assert seen[0]["cache_implementation"] == "static"
    assert seen[0]["max_cache_len"] % 256 == 0
    assert seen[0]["max_cache_len"] >= seen[0]["input_ids"].shape[1] + 8
    assert [a.answer for a in got] == [a.answer for a in predictor.ask_many(QUESTIONS, max_new_tokens=8)]
    streamed = "".join(fast.stream(QUESTIONS[1], max_new_tokens=8)).strip()
    assert streamed == got[1].answer


def test_slice_ranges_map_to_the_original_volume(predictor, volume_path):
    loaded = predictor.load(volume_path)
    ranges = predictor.ask(QUESTIONS[0], max_new_tokens=2).slice_ranges
    assert len(ranges) == 32 and ranges == loaded.slice_ranges
    assert ranges[0][0] == 0 and ranges[-1][1] == 40  # the whole 40-slice depth has foreground
    assert all(a[0] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_stream_yields_the_greedy_answer(predictor, volume_path):
    predictor.load(volume_path)
    pieces = list(predictor.stream(QUESTIONS[1], max_new_tokens=8))
    assert "".join(pieces).strip() == predictor.ask(QUESTIONS[1], max_new_tokens=8).answer


def test_bad_input(predictor, tmp_path, volume_path):
    with pytest.raises(VolumeError, match="missing.nii.gz"):
        predictor.load(tmp_path / "missing.nii.gz")
    predictor.load(volume_path)
    with pytest.raises(InputError, match="empty"):
        predictor.ask("   ")
    with pytest.raises(InputError, match="limit"):
        predictor.ask("why " * 1000)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="not a med2e3 model"):
        Med2E3Predictor.from_pretrained(tmp_path)


def test_batch_mode_resumes_without_losing_lines(predictor, volume_path, tmp_path):
    rows_file = tmp_path / "q.jsonl"
    rows_file.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "volume": str(volume_path), "question": q}) + "\n"
            for i, q in enumerate(QUESTIONS)
        )
    )
    rows = read_batch_input(rows_file)
    out = tmp_path / "answers.jsonl"
    assert predictor.run_batch(rows[:2], out, max_new_tokens=4, progress=False) == BatchResult(2, 0, 0)
    with out.open("a") as f:  # a crash mid-line
        f.write('{"id": "q2", "answ')
    assert completed_ids(out) == {"q0", "q1"}
    assert predictor.run_batch(rows, out, max_new_tokens=4, progress=False) == BatchResult(1, 0, 2)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["q0", "q1", "q2"]
    assert all(len(r["slice_scores"]) == 32 for r in lines)
    assert predictor.run_batch(rows, out, max_new_tokens=4, progress=False) == BatchResult(0, 0, 3)
    (tmp_path / "bad.jsonl").write_text('{"volume": "x.npy"}\n')
    with pytest.raises(DatasetError, match="row 1"):
        read_batch_input(tmp_path / "bad.jsonl")


def test_batch_records_a_bad_volume_and_goes_on(predictor, volume_path, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a NIfTI file")
    rows = [
        {"id": "a", "volume": str(volume_path), "question": QUESTIONS[0]},
        {"id": "b", "volume": str(broken), "question": QUESTIONS[0]},
        {"id": "c", "volume": str(volume_path), "question": "   "},  # unusable question, same chunk as "a"
        {"id": "d", "volume": str(volume_path), "question": QUESTIONS[1]},
    ]
    out = tmp_path / "answers.jsonl"
    assert predictor.run_batch(rows, out, max_new_tokens=3, progress=False) == BatchResult(2, 2, 0)
    lines = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"a", "b", "c", "d"}
    assert "broken.nii.gz" in lines["b"]["error"] and "answer" not in lines["b"]
    assert "empty" in lines["c"]["error"] and lines["c"]["question"] == "   "
    alone = predictor.ask(QUESTIONS[0], max_new_tokens=3).answer
    assert lines["a"]["answer"] == alone  # the unusable question in its chunk did not spoil it
    # a rerun tries the failed rows again, replacing their lines instead of adding to them
    assert predictor.run_batch(rows, out, max_new_tokens=3, progress=False) == BatchResult(0, 2, 2)
    shutil.copy(volume_path, broken.with_name("fixed.npy"))
    rows[1]["volume"] = str(broken.with_name("fixed.npy"))
    assert predictor.run_batch(rows, out, max_new_tokens=3, progress=False) == BatchResult(1, 1, 2)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == ["a", "b", "c", "d"]
    assert completed_ids(out) == {"a", "b", "d"}


def test_batch_without_ids_resumes_by_volume_and_question(predictor, volume_path, tmp_path):
    table = tmp_path / "q.csv"
    table.write_text(f"volume,question\n{volume_path},{QUESTIONS[0]}\n{volume_path},{QUESTIONS[1]}\n")
    out = tmp_path / "answers.jsonl"
    assert predictor.run_batch(read_batch_input(table), out, max_new_tokens=3, progress=False).answered == 2
    first = out.read_text()
    # a row inserted at the top: only it is answered, each question once
    table.write_text(f"volume,question\n{volume_path},{QUESTIONS[2]}\n" + table.read_text().split("\n", 1)[1])
    result = predictor.run_batch(read_batch_input(table), out, max_new_tokens=3, progress=False)
    assert result == BatchResult(1, 0, 2)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert out.read_text().startswith(first)
    assert sorted(r["question"] for r in lines) == sorted(QUESTIONS)
    assert len({r["id"] for r in lines}) == 3
    table.write_text(table.read_text() + f"{volume_path},{QUESTIONS[0]}\n")
    with pytest.raises(DatasetError, match="row 4.*same volume and question as row 2"):
        read_batch_input(table)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"volume,question\nscan.npy,Is the liver \xe9nlarged?\n",
            r"not UTF-8 text \(byte 0xe9 at offset 38\)",
        ),
        (b"", "no rows"),
        (b"volume,question\n", "no rows"),
        (b"volume,question,id\na.npy,q,1\nb.npy,r,1\n", "row 2.*also the id of row 1"),
    ],
)
def test_batch_input_problems_name_the_file(tmp_path, content, message):
    table = tmp_path / "rows.csv"
    table.write_bytes(content)
    with pytest.raises(DatasetError, match=f"rows.csv.*{message}"):
        read_batch_input(table)


def test_batch_input_accepts_a_byte_order_mark(tmp_path):
    table = tmp_path / "rows.csv"
    table.write_bytes("\ufeffvolume,question\nscan.npy,Is the liver enlarged?\n".encode())
    assert read_batch_input(table)[0]["question"] == "Is the liver enlarged?"


def test_figure_is_a_sensible_png(predictor, volume_path, tmp_path):
    loaded = predictor.load(volume_path)
    answer = predictor.ask(QUESTIONS[0], max_new_tokens=4)
    path = plot_slice_scores(
        loaded.pixel_values[0],
        answer.slice_scores,
        tmp_path / "fig.png",
        answer.question,
        answer.answer,
        answer.slice_ranges,
    )
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert 600 <= img.width <= 2000 and 400 <= img.height <= 1400
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # not a blank image
    with pytest.raises(ValueError, match="scores"):
        plot_slice_scores(loaded.pixel_values[0], answer.slice_scores[:10], tmp_path / "x.png")

    curves = {q: predictor.slice_scores(q) for q in QUESTIONS[:2]}
    path = plot_question_scores(curves, tmp_path / "questions.png", answer.slice_ranges)
    with Image.open(path) as img:
        assert img.format == "PNG" and np.asarray(img.convert("L")).std() > 10
    with pytest.raises(ValueError, match="differ in length"):
        plot_question_scores({"a": [0.5, 0.5], "b": [1.0]}, tmp_path / "y.png")


def test_stream_raises_a_generation_error_instead_of_hanging(predictor, volume_path, monkeypatch):
    predictor.load(volume_path)

    def broken(**kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(predictor.model, "generate", broken)
    with pytest.raises(RuntimeError, match="generation failed"):
        list(predictor.stream(QUESTIONS[0], max_new_tokens=4, timeout=30))


def test_completed_ids_never_drops_a_users_line(tmp_path):
    out = tmp_path / "answers.jsonl"
    good = [json.dumps({"id": f"q{i}", "answer": "x"}) for i in range(2)]
    out.write_text(f"{good[0]}\n[1, 2]\n{good[1]}\n")
    before = out.read_bytes()
    with pytest.raises(DatasetError, match=r"answers.jsonl \(row 2\)"):
        completed_ids(out)
    assert out.read_bytes() == before
    out.write_text(f"{good[0]}\n{good[1]}")  # a complete last line without its newline: appends go after it
    assert completed_ids(out) == {"q0", "q1"}
    assert out.read_text() == f"{good[0]}\n{good[1]}\n"


def _drain(stream):
    """The pieces a `stream_answer` generator yields, and the `Answer` it returns."""
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            return pieces, stop.value


def test_long_question_is_truncated_for_tgis_and_says_so(predictor, volume_path):
    predictor.load(volume_path)
    positions = predictor.model.config.question_encoder_config.max_position_embeddings
    length = predictor.processor.question_length(LONG_QUESTION)
    assert length > positions == 128
    answer = predictor.ask(LONG_QUESTION, max_new_tokens=4)
    assert len(answer.slice_scores) == 32
    assert answer.notes == [
        f"TG-IS read only the first 128 of the question's {length} tokens (its question encoder's limit); "
        "the language model read the whole question"
    ]
    assert answer.to_dict()["notes"] == answer.notes
    assert predictor.ask(QUESTIONS[0], max_new_tokens=2).notes == []
    _, streamed = _drain(predictor.stream_answer(LONG_QUESTION, max_new_tokens=4))
    assert streamed.notes == answer.notes and streamed.answer == answer.answer


def test_a_prompt_too_long_for_the_llm_is_refused(predictor, volume_path):
    predictor.load(volume_path)
    question = "".join(chr(0x4E00 + (i * 37) % 2000) for i in range(1500))  # rare characters: many tokens
    with pytest.raises(
        InputError, match=r"too long for the language model: its prompt is \d+ tokens, the limit is 768"
    ):
        predictor.ask(question)


@pytest.mark.parametrize("bias", [False, True], ids=["model", "space-first"])
def test_stream_pieces_and_answer_equal_ask(predictor, volume_path, monkeypatch, bias):
    if bias:  # answers start with a space-prefixed token, as a trained model's do
        liver = predictor.processor.tokenizer(" liver", add_special_tokens=False)["input_ids"]
        monkeypatch.setattr(predictor.model.generation_config, "sequence_bias", {(liver[0],): 100.0})
    predictor.load(volume_path)
    for question in QUESTIONS:
        asked = predictor.ask(question, max_new_tokens=8)
        pieces = list(predictor.stream(question, max_new_tokens=8))
        _, streamed = _drain(predictor.stream_answer(question, max_new_tokens=8))
        assert "".join(pieces) == streamed.answer == asked.answer
        if bias:
            assert asked.answer == "liver " * 7 + "liver"
        np.testing.assert_allclose(streamed.slice_scores, asked.slice_scores, atol=1e-6)


def test_a_volume_too_small_to_be_a_scan_is_refused(predictor, tmp_path):
    np.save(
        path := tmp_path / "tiny.npy", np.random.default_rng(0).uniform(0, 1, (2, 2, 2)).astype(np.float32)
    )
    with pytest.raises(VolumeError, match=r"tiny.npy: 2x2x2 voxels is too small to be a scan"):
        predictor.load(path)
    with pytest.raises(VolumeError, match="too small"):
        predictor.load(np.zeros((40, 3, 3), np.float32))  # a line of voxels
    assert predictor.load(np.zeros((3, 40, 40), np.float32)).volume.shape == (3, 40, 40)  # a slab is fine


def _mri(tmp_path: Path) -> Path:
    """An MRI-like NIfTI: background 0, tissue up to ~8000 (the MNI152 template's range)."""
    data = np.zeros((48, 48, 40), np.float32)
    data[8:40, 8:40, 5:35] = np.random.default_rng(0).uniform(2000, 8000, (32, 32, 30))
    nib.save(nib.Nifti1Image(data, np.eye(4)), path := tmp_path / "t1.nii.gz")
    return path


def test_mri_with_a_ct_window_warns_once(model_dir, tmp_path):
    mri = _mri(tmp_path)
    predictor = Med2E3Predictor.from_pretrained(model_dir, device="cpu")
    with pytest.warns(
        VolumeWarning, match=r"t1.nii.gz: intensities in \[0, 8\d+\] do not look like CT.*--window minmax"
    ):
        predictor.load(mri)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor.load(mri)  # once is enough
        Med2E3Predictor.from_pretrained(model_dir, device="cpu", window="minmax").load(mri)
        ct = np.full((40, 48, 48), -1000.0, np.float32)
        ct[5:35, 8:40, 8:40] = 40.0
        nib.save(nib.Nifti1Image(ct, np.eye(4)), tmp_path / "ct.nii.gz")
        Med2E3Predictor.from_pretrained(model_dir, device="cpu").load(tmp_path / "ct.nii.gz")
