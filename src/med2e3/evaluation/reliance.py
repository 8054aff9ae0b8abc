"""Does the model read the scan? Image reliance and TG-IS question dependence.

* :func:`image_reliance` answers the same questions twice: once with their own volume, once with
  another volume of the same set (a fixed derangement, :func:`swapped_volumes`). A model that reads
  the scan loses closed-VQA accuracy and gains answer loss when its volume is swapped; a model that
  answers from priors does not.
* :func:`question_dependence` measures whether TG-IS scores depend on the question: for each volume,
  the largest difference between the slice scores of two of its questions; the median over volumes.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from med2e3.data.datasets import Example
from med2e3.errors import DatasetError
from med2e3.evaluation.metrics import closed_vqa_accuracy


def swapped_volumes(volumes: Iterable[Path]) -> dict[Path, Path]:
    """A fixed derangement: the sorted distinct volumes, each mapped to the next one (the last to the first)."""
    distinct = sorted(set(volumes), key=str)
    if len(distinct) < 2:
        raise DatasetError(None, "image reliance needs questions about at least two different volumes")
    return {v: distinct[(i + 1) % len(distinct)] for i, v in enumerate(distinct)}


@dataclass
class ImageReliance:
    """Closed-VQA accuracy and mean answer loss with each question's own volume and with a swapped one."""

    n: int
    n_closed: int
    accuracy: dict[str, float]  # overall and per question type, own volume
    accuracy_swapped: dict[str, float]
    loss: float  # mean per-question loss (NLL per answer token) of the reference answers
    loss_swapped: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "n_closed": self.n_closed,
            "accuracy": dict(self.accuracy),
            "accuracy_swapped": dict(self.accuracy_swapped),
            "accuracy_drop": self.accuracy.get("overall", 0.0) - self.accuracy_swapped.get("overall", 0.0),
            "loss": self.loss,
            "loss_swapped": self.loss_swapped,
        }

    def to_markdown(self) -> str:
        lines = [
            "| image reliance | own volume | swapped volume |",
            "|---|---|---|",
            f"| mean answer loss ({self.n} questions) | {self.loss:.4f} | {self.loss_swapped:.4f} |",
        ]
        for key in self.accuracy:
            lines.append(
                f"| closed VQA: {key} | {100 * self.accuracy[key]:.1f} | {100 * self.accuracy_swapped[key]:.1f} |"
            )
        return "\n".join(lines)


def _answer(
    predictor: Any,
    examples: Sequence[Example],
    volumes: dict[Path, Path],
    max_new_tokens: int,
    generate: bool,
) -> tuple[dict[str, str], dict[str, float]]:
    """(closed answers by id, answer losses by id) with every example's volume replaced by ``volumes``;
    the closed questions are answered only if ``generate``."""
    by_volume: dict[Path, list[Example]] = defaultdict(list)
    for ex in examples:
        by_volume[volumes[ex.volume]].append(ex)
    answers: dict[str, str] = {}
    losses: dict[str, float] = {}
    for volume, group in by_volume.items():
        predictor.load(volume, group[0].orientation)
        questions, prompts = [ex.question for ex in group], [ex.prompt for ex in group]
        loss = predictor.answer_loss(questions, [ex.answer or "" for ex in group], prompts)
        losses.update({ex.id: value for ex, value in zip(group, loss, strict=True)})
        closed = [ex for ex in group if ex.task == "vqa_closed"] if generate else []
        if closed:
            got = predictor.ask_many(
                [ex.question for ex in closed], [ex.prompt for ex in closed], max_new_tokens=max_new_tokens
            )
            answers.update({ex.id: a.answer for ex, a in zip(closed, got, strict=True)})
    return answers, losses


def closed_accuracy(examples: Sequence[Example], answers: Mapping[str, str]) -> dict[str, float]:
    """Closed-VQA accuracy of ``answers`` (by id) on the closed ``examples``, overall and per question type
    (the release's rule); empty without closed examples."""
    closed = [ex for ex in examples if ex.task == "vqa_closed"]
    if not closed:
        return {}
    metrics = closed_vqa_accuracy(
        [answers[ex.id] for ex in closed],
        [ex.answer_letter or "" for ex in closed],
        [ex.question_type or "all" for ex in closed],
    )
    return {"overall": metrics.overall, **metrics.per_type}


def image_reliance(
    predictor: Any,
    examples: Iterable[Example],
    max_new_tokens: int = 8,
    answers: Mapping[str, str] | None = None,
) -> ImageReliance:
    """Answer ``examples`` with their own and with swapped volumes (see module doc).

    ``predictor`` is a :class:`~med2e3.inference.Med2E3Predictor`; every example needs a reference answer.
    Closed questions are also answered (greedy, ``max_new_tokens``) and scored with the release's rule.
    ``answers``: this predictor's closed answers with their own volumes, by id, when already generated
    (then only the swapped volumes are answered again).
    """
    examples = list(examples)
    missing = [ex.id for ex in examples if not ex.answer]
    if missing:
        raise DatasetError(None, f"image reliance needs reference answers; {missing[0]!r} has none")
    if answers is not None:
        unanswered = [ex.id for ex in examples if ex.task == "vqa_closed" and ex.id not in answers]
        if unanswered:
            raise DatasetError(None, f"image reliance: no own-volume answer given for {unanswered[0]!r}")
    own = {ex.volume: ex.volume for ex in examples}
    generated, losses = _answer(predictor, examples, own, max_new_tokens, generate=answers is None)
    answers = generated if answers is None else answers
    answers_swapped, losses_swapped = _answer(predictor, examples, swapped_volumes(own), max_new_tokens, True)
    return ImageReliance(
        n=len(examples),
        n_closed=sum(ex.task == "vqa_closed" for ex in examples),
        accuracy=closed_accuracy(examples, answers),
        accuracy_swapped=closed_accuracy(examples, answers_swapped),
        loss=statistics.fmean(losses.values()),
        loss_swapped=statistics.fmean(losses_swapped.values()),
    )


def question_dependence(scores_by_volume: dict[Any, list[Sequence[float]]]) -> float | None:
    """Median over volumes of the largest difference between the slice scores of two of its questions.

    ``scores_by_volume`` maps a volume to the TG-IS scores of the questions asked about it; volumes with
    fewer than two questions are left out. None when no volume has two.
    """
    spreads = []
    for rows in scores_by_volume.values():
        if len(rows) < 2:
            continue
        spread = max(max(col) - min(col) for col in zip(*rows, strict=True))
        spreads.append(spread)
    return statistics.median(spreads) if spreads else None
