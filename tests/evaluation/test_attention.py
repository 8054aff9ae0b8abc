"""TG-IS attention quality: mass of the slice scores on the relevant slices, next to uniform weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from med2e3.data.datasets import Example
from med2e3.errors import DatasetError
from med2e3.evaluation.runner import attention_mass, evaluate

S = 32


def peaked(at: list[int], mass: float) -> list[float]:
    """Scores with ``mass`` spread evenly over ``at`` and the rest evenly over the other slices."""
    rest = (1.0 - mass) / (S - len(at))
    return [mass / len(at) if j in at else rest for j in range(S)]


def example(i: int, qtype: str, relevant: tuple[int, ...] | None) -> Example:
    return Example(
        id=f"q{i}",
        volume=Path("/data/v.nii.gz"),
        task="vqa_open",
        question=f"q{i}?",
        prompt=f"q{i}?",
        answer="Cyst",
        question_type=qtype,
        relevant_slices=relevant,
    )


def write(path: Path, rows: list[tuple[str, list[float] | None]]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": i, "answer": "Cyst", "slice_scores": s}) + "\n" for i, s in rows)
    )
    return path


def test_attention_mass_hand_made():
    mass, uniform = attention_mass(peaked([3, 4], 0.5), [4, 3, 3])  # repeated index counted once
    assert mass == pytest.approx(0.5) and uniform == pytest.approx(2 / 32)
    assert attention_mass([1 / S] * S, range(8)) == pytest.approx((0.25, 0.25))  # uniform scores = uniform


def test_attention_per_type_vs_uniform(tmp_path):
    examples = [
        example(0, "Abnormality", (10,)),  # 0.8 on 1 slice
        example(1, "Abnormality", (20, 21)),  # 0.2 on 2 slices
        example(2, "Location", (5, 6, 7, 8)),  # uniform scores
        example(3, "Plane", None),  # no label: left out
    ]
    rows = [
        ("q0", peaked([10], 0.8)),
        ("q1", peaked([20, 21], 0.2)),
        ("q2", [1 / S] * S),
        ("q3", peaked([0], 0.9)),
    ]
    report = evaluate(write(tmp_path / "p.jsonl", rows), examples)
    att = report.attention
    assert att.counts == {"Abnormality": 2, "Location": 1, "overall": 3}
    assert att.mass["Abnormality"] == pytest.approx(0.5)
    assert att.uniform["Abnormality"] == pytest.approx((1 / 32 + 2 / 32) / 2)
    assert att.mass["Location"] == pytest.approx(att.uniform["Location"]) == pytest.approx(4 / 32)
    assert att.mass["overall"] == pytest.approx((0.8 + 0.2 + 4 / 32) / 3)
    sample = next(s for s in report.samples if s["id"] == "q0")
    assert sample["attention_mass"] == pytest.approx(0.8) and sample["uniform_mass"] == pytest.approx(1 / 32)
    md = report.to_markdown()
    assert "| Abnormality | 2 | 0.5000 | 0.0469 | 10.67 |" in md and "| Location | 1 |" in md


def test_no_slice_scores_is_reported_not_crashed(tmp_path):
    examples = [example(0, "Organ", (1, 2))]
    report = evaluate(write(tmp_path / "p.jsonl", [("q0", None)]), examples)
    assert report.attention is None and "slice_aggregation='none'" in report.attention_note
    assert "slice_aggregation='none'" in report.to_markdown()


def test_relevant_slice_outside_the_scores_raises(tmp_path):
    examples = [example(0, "Organ", (40,))]
    with pytest.raises(DatasetError, match="relevant slice 40 is outside the 32 slice scores"):
        evaluate(write(tmp_path / "p.jsonl", [("q0", [1 / S] * S)]), examples)
