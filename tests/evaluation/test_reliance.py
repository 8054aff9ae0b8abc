"""Image reliance (own vs swapped volume) and TG-IS question dependence."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from med2e3.data.datasets import Example
from med2e3.errors import DatasetError
from med2e3.evaluation.reliance import image_reliance, question_dependence, swapped_volumes
from med2e3.inference import Med2E3Predictor

VOLUMES = [Path(f"/data/vol{i}.nii.gz") for i in range(4)]


def _letter(volume: Path) -> str:
    return "ABCD"[VOLUMES.index(volume)]


def _examples() -> list[Example]:
    return [
        Example(
            id=f"{v.stem}-{q}",
            volume=v,
            task="vqa_closed",
            prompt=f"Question {q}? Choices: A. a B. b C. c D. d",
            question=f"Question {q}?",
            answer=f"{_letter(v)}. {_letter(v).lower()}",
            answer_letter=_letter(v),
            question_type="Plane",
            orientation="acquisition",  # not the predictor's default: each volume is read as its example says
        )
        for v in VOLUMES
        for q in range(3)
    ]


class FakePredictor:
    """Answers from the loaded volume (``reads=True``) or always "A" (a model that ignores the scan)."""

    def __init__(self, reads: bool):
        self.reads = reads
        self.orientation = "axial"
        self.volume: Path | None = None

    def load(self, volume: Path, orientation: str | None = None) -> None:
        assert orientation == "acquisition"  # each example's, not the predictor's default
        self.volume = volume

    def _said(self) -> str:
        return _letter(self.volume) if self.reads else "A"

    def ask_many(self, questions, prompts=None, max_new_tokens=8):
        return [SimpleNamespace(answer=f"{self._said()}. x") for _ in questions]

    def answer_loss(self, questions, answers, prompts=None):
        return [0.1 if a.startswith(self._said()) else 2.0 for a in answers]


def test_swapped_volumes_is_a_fixed_derangement():
    mapping = swapped_volumes(reversed(VOLUMES))
    assert set(mapping) == set(VOLUMES) and set(mapping.values()) == set(VOLUMES)
    assert all(src != dst for src, dst in mapping.items())
    assert mapping == swapped_volumes(VOLUMES)  # independent of the order given
    with pytest.raises(DatasetError, match="two different volumes"):
        swapped_volumes([VOLUMES[0], VOLUMES[0]])


def test_a_model_that_reads_the_scan_loses_accuracy_when_it_is_swapped():
    result = image_reliance(FakePredictor(reads=True), _examples())
    assert result.n == result.n_closed == 12
    assert result.accuracy == {"overall": 1.0, "Plane": 1.0}
    assert result.accuracy_swapped == {"overall": 0.0, "Plane": 0.0}
    assert result.loss == pytest.approx(0.1) and result.loss_swapped == pytest.approx(2.0)
    assert result.to_dict()["accuracy_drop"] == 1.0
    assert "| closed VQA: overall | 100.0 | 0.0 |" in result.to_markdown()


def test_a_model_that_ignores_the_scan_scores_the_same_both_ways():
    result = image_reliance(FakePredictor(reads=False), _examples())
    assert result.accuracy == result.accuracy_swapped == {"overall": 0.25, "Plane": 0.25}
    assert result.loss == result.loss_swapped


def test_own_answers_already_generated_are_scored_not_generated_again():
    predictor = FakePredictor(reads=True)
    asked: list[Path] = []
    answer = predictor.ask_many
    predictor.ask_many = lambda *args, **kwargs: asked.append(predictor.volume) or answer(*args, **kwargs)
    examples = _examples()
    given = {ex.id: "B. b" for ex in examples}  # not what this predictor would say with its own volume
    result = image_reliance(predictor, examples, answers=given)
    assert len(asked) == len(VOLUMES)  # one batch per volume: the swapped answers only
    assert result.accuracy["overall"] == pytest.approx(0.25)  # the given answers were scored
    assert result.accuracy_swapped["overall"] == 0.0 and result.loss == pytest.approx(0.1)
    with pytest.raises(DatasetError, match="no own-volume answer given for 'vol0.nii-0'"):
        image_reliance(predictor, examples, answers={})


def test_question_dependence_is_the_median_of_the_per_volume_spread():
    scores = {
        "v1": [[0.5, 0.5], [0.7, 0.3]],  # spread 0.2
        "v2": [[0.5, 0.5], [0.5, 0.5], [0.6, 0.4]],  # spread 0.1
        "v3": [[0.9, 0.1], [0.1, 0.9]],  # spread 0.8
        "v4": [[1.0, 0.0]],  # one question: left out
    }
    assert question_dependence(scores) == pytest.approx(0.2)
    assert question_dependence({"v": [[0.5, 0.5]]}) is None


def test_answer_loss_is_the_training_loss_of_each_example(tiny_model_dir):
    predictor = Med2E3Predictor.from_pretrained(tiny_model_dir, device="cpu")
    volume = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (1, 32, 64, 64)).astype(np.float32))
    loaded = predictor.load(volume)
    questions = ["Which organ has a lesion?", "In which plane is this image?"]
    answers = ["Left kidney", "B. Axial plane of the abdomen"]
    losses = predictor.answer_loss(questions, answers)
    for question, answer, loss in zip(questions, answers, losses, strict=True):
        batch = predictor.processor([question], answers=[answer], volumes=loaded.pixel_values)
        with torch.no_grad():
            expected = predictor.model(**batch).loss.item()
        assert loss == pytest.approx(expected, rel=1e-4)
