"""Evaluate a model on a dataset: answer its examples (resumably), then score the answers against them.

* :func:`predict_examples` answers dataset :class:`~med2e3.data.datasets.Example` items through
  :meth:`Med2E3Predictor.run_batch` (a JSONL, resumable), reading each volume with its example's
  orientation.
* :func:`evaluate` matches the predictions to the examples **by id** and scores them per task: closed
  VQA accuracy (per question type and overall), open VQA and report generation (BLEU-1, ROUGE-1,
  METEOR, optional BERTScore), and TG-IS attention quality (mass of the slice scores on the relevant
  slices, next to what uniform weights give).
* ``med2e3 eval`` (`med2e3.cli.evaluation`) runs both from the command line.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from med2e3.data.datasets import (
    QUESTION_TYPES,
    DatasetSource,
    Example,
    format_of,
    read_dataset,
)
from med2e3.errors import DatasetError
from med2e3.evaluation.metrics import METRIC_NAMES, closed_vqa_accuracy, score_texts
from med2e3.evaluation.reliance import ImageReliance, question_dependence
from med2e3.files import write_atomic

#: Tokens generated per task unless told otherwise (closed answers are a letter and a choice).
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"vqa_closed": 8, "vqa_open": 32, "caption": 128, "report": 128}
REPORT_TASKS: tuple[str, ...] = ("caption", "report")
OVERALL = "overall"


# ---------------------------------------------------------------------------------------- predict


def predict_examples(
    predictor: Any,
    examples: Iterable[Example],
    out_jsonl: str | Path,
    max_new_tokens: int | Mapping[str, int] | None = None,
    progress: bool = True,
) -> int:
    """Answer ``examples`` into ``out_jsonl`` with ``predictor.run_batch``; return how many were answered now.

    TG-IS reads ``example.question``; the LLM sees ``example.prompt`` (e.g. with the choices). Volumes are
    read with each example's orientation. ``max_new_tokens`` is one number or one per task (defaults:
    :data:`DEFAULT_MAX_NEW_TOKENS`). Ids already in ``out_jsonl`` are skipped (resume).
    """
    examples = list(examples)
    _check_unique_ids(examples, "examples")
    budgets = _token_budgets(max_new_tokens)
    groups: dict[int, list[dict[str, str]]] = defaultdict(list)
    for ex in examples:
        groups[budgets[ex.task]].append(
            {"id": ex.id, "volume": str(ex.volume), "question": ex.question, "prompt": ex.prompt}
            | {"orientation": ex.orientation}
        )
    answered = failed = 0
    for tokens, rows in sorted(groups.items()):
        result = predictor.run_batch(rows, out_jsonl, max_new_tokens=tokens, progress=progress)
        answered += result.answered
        failed += result.failed
    if failed:
        raise DatasetError(
            out_jsonl, f"{failed} examples failed; their errors are in the file (a rerun retries them)"
        )
    return answered


def _token_budgets(max_new_tokens: int | Mapping[str, int] | None) -> dict[str, int]:
    if isinstance(max_new_tokens, int):
        return dict.fromkeys(DEFAULT_MAX_NEW_TOKENS, max_new_tokens)
    return {**DEFAULT_MAX_NEW_TOKENS, **(max_new_tokens or {})}


def _check_unique_ids(examples: Sequence[Example], what: str) -> None:
    seen: set[str] = set()
    for n, ex in enumerate(examples, start=1):
        if ex.id in seen:
            raise DatasetError(None, f"duplicate id {ex.id!r} in the {what}", row=n)
        seen.add(ex.id)


# ---------------------------------------------------------------------------------------- read


def read_predictions(path: str | Path) -> dict[str, dict[str, Any]]:
    """Prediction rows of a ``run_batch`` JSONL by id; a broken line, a missing field or a repeated id raises."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "predictions file not found")
    rows: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise DatasetError(
                    path, f"not valid JSON ({err.msg}, column {err.colno})", row=line_no
                ) from None
            if isinstance(row, dict) and "error" in row:
                raise DatasetError(path, f"id {row.get('id')!r} failed: {row['error']}", row=line_no)
            if not isinstance(row, dict) or not isinstance(row.get("id"), str) or "answer" not in row:
                raise DatasetError(path, "each line needs a string 'id' and an 'answer'", row=line_no)
            if row["id"] in rows:
                raise DatasetError(path, f"id {row['id']!r} appears twice", row=line_no)
            if not isinstance(row["answer"], str):
                raise DatasetError(path, "'answer' must be a string", row=line_no)
            rows[row["id"]] = row
    return rows


def _match(
    predictions: Mapping[str, dict[str, Any]],
    examples: Sequence[Example],
    path: Path,
    left_out: Collection[str] = (),
) -> None:
    """Raise unless predictions and examples have exactly the same ids (names a few of each difference).

    ``left_out``: ids of the dataset that are not evaluated (beyond ``--limit``), named as such.
    """
    want = {ex.id for ex in examples}
    missing = [ex.id for ex in examples if ex.id not in predictions]
    extra = [pid for pid in predictions if pid not in want]
    beyond = [pid for pid in extra if pid in left_out]
    unknown = [pid for pid in extra if pid not in left_out]
    problems = []
    if missing:
        problems.append(f"{len(missing)} example id(s) have no prediction: {_few(missing)}")
    if beyond:
        problems.append(
            f"{len(beyond)} prediction id(s) are in the dataset but beyond the first {len(examples)} "
            f"examples (--limit): {_few(beyond)}"
        )
    if unknown:
        problems.append(f"{len(unknown)} prediction id(s) are not in the dataset: {_few(unknown)}")
    if problems:
        raise DatasetError(path, "; ".join(problems))


def _few(ids: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f" (+{len(ids) - n} more)" if len(ids) > n else "")


def _check_example(ex: Example, row: int) -> None:
    if ex.answer is None:
        raise DatasetError(None, f"example {ex.id!r} has no reference answer", row=row)
    if ex.question_type is not None and ex.question_type not in QUESTION_TYPES:
        raise DatasetError(
            None,
            f"example {ex.id!r}: unknown question type {ex.question_type!r} (known: {list(QUESTION_TYPES)})",
            row=row,
        )
    if ex.task == "vqa_closed" and not ex.answer_letter:
        raise DatasetError(None, f"closed question {ex.id!r} has no answer letter", row=row)


# ---------------------------------------------------------------------------------------- report


@dataclass
class TextSection:
    """Text metrics of one task: means overall and per question type, and what was not computed."""

    n: int
    means: dict[str, float]
    per_type: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    not_computed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "means": self.means,
            "per_type": self.per_type,
            "counts": self.counts,
            "not_computed": self.not_computed,
        }


@dataclass
class AttentionSection:
    """TG-IS attention: mean mass of the slice scores on the relevant slices vs. uniform weights, per type."""

    mass: dict[str, float]
    uniform: dict[str, float]
    counts: dict[str, int]
    question_dependence: float | None = None  # median over volumes of the largest score gap between questions

    def to_dict(self) -> dict[str, Any]:
        return {
            "mass": self.mass,
            "uniform": self.uniform,
            "counts": self.counts,
            "question_dependence": self.question_dependence,
        }


@dataclass
class EvalReport:
    """Everything :func:`evaluate` measured; ``samples`` holds one dict of scores per example."""

    n: int
    closed: dict[str, Any] | None
    open: TextSection | None
    report: TextSection | None
    attention: AttentionSection | None
    attention_note: str | None
    samples: list[dict[str, Any]]
    image_reliance: ImageReliance | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "closed_vqa": self.closed,
            "open_vqa": None if self.open is None else self.open.to_dict(),
            "report_generation": None if self.report is None else self.report.to_dict(),
            "attention": None if self.attention is None else self.attention.to_dict(),
            "attention_note": self.attention_note,
            "image_reliance": None if self.image_reliance is None else self.image_reliance.to_dict(),
            "samples": self.samples,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        """Tables: closed VQA per type, open VQA and report metrics, TG-IS attention per type."""
        parts = [f"# Evaluation ({self.n} examples)\n"]
        if self.closed is not None:
            parts.append(_closed_markdown(self.closed))
        for title, section in (("Open VQA", self.open), ("Report generation", self.report)):
            if section is not None:
                parts.append(_text_markdown(title, section))
        if self.attention is not None:
            parts.append(_attention_markdown(self.attention))
        elif self.attention_note:
            parts.append(f"## TG-IS attention\n\n{self.attention_note}\n")
        if self.image_reliance is not None:
            parts.append(f"## Image reliance\n\n{self.image_reliance.to_markdown()}\n")
        return "\n".join(parts)

    def write(self, json_path: str | Path | None = None, markdown_path: str | Path | None = None) -> None:
        """Write the JSON and/or Markdown atomically."""
        if json_path is not None:
            write_atomic(json_path, self.to_json())
        if markdown_path is not None:
            write_atomic(markdown_path, self.to_markdown())


def _type_order(types: Iterable[str]) -> list[str]:
    types = list(types)
    known = [t for t in QUESTION_TYPES if t in types]
    return known + sorted(t for t in types if t not in QUESTION_TYPES)


def _closed_markdown(closed: dict[str, Any]) -> str:
    lines = ["## Closed VQA (accuracy)\n", "| question type | n | accuracy |", "|---|---|---|"]
    for qtype in _type_order(closed["per_type"]):
        lines.append(f"| {qtype} | {closed['counts'][qtype]} | {closed['per_type'][qtype]:.4f} |")
    lines.append(f"| **overall** | {closed['n']} | {closed['overall']:.4f} |")
    lines.append(f"| mean of types | | {closed['mean_of_types']:.4f} |")
    return "\n".join(lines) + "\n"


def _text_markdown(title: str, section: TextSection) -> str:
    names = [m for m in METRIC_NAMES if m in section.means]
    lines = [
        f"## {title}\n",
        "| question type | n | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for qtype in _type_order(section.per_type):
        values = " | ".join(f"{section.per_type[qtype][m]:.4f}" for m in names)
        lines.append(f"| {qtype} | {section.counts[qtype]} | {values} |")
    values = " | ".join(f"{section.means[m]:.4f}" for m in names)
    lines.append(f"| **overall** | {section.n} | {values} |")
    notes = [f"- {name}: {why}" for name, why in section.not_computed.items()]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _attention_markdown(att: AttentionSection) -> str:
    lines = [
        "## TG-IS attention on the relevant slices\n",
        "| question type | n | mass on relevant slices | uniform weights | ratio |",
        "|---|---|---|---|---|",
    ]
    for qtype in [*_type_order(k for k in att.mass if k != OVERALL), OVERALL]:
        if qtype in att.mass:
            ratio = att.mass[qtype] / att.uniform[qtype] if att.uniform[qtype] else float("nan")
            label = "**overall**" if qtype == OVERALL else qtype
            lines.append(
                f"| {label} | {att.counts[qtype]} | {att.mass[qtype]:.4f} | {att.uniform[qtype]:.4f} | {ratio:.2f} |"
            )
    if att.question_dependence is not None:
        lines.append(
            f"\nQuestion dependence: the slice scores of two questions on one volume differ by at most "
            f"{att.question_dependence:.3g} (median over volumes)."
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- evaluate


def evaluate(
    predictions_jsonl: str | Path,
    examples: Iterable[Example],
    *,
    nltk_data: str | Path | None = None,
    bertscore_model: str | Path | None = None,
    left_out: Collection[str] = (),
) -> EvalReport:
    """Score the predictions in ``predictions_jsonl`` against ``examples``, matched by id.

    Raises :class:`~med2e3.errors.DatasetError` when the ids differ (both sides named; ids in
    ``left_out``, the dataset's examples not evaluated, are named as such), a line is broken, or an
    example is unusable (no answer, unknown question type, closed without a letter).
    """
    path = Path(predictions_jsonl)
    examples = list(examples)
    if not examples:
        raise DatasetError(None, "no examples to evaluate")
    _check_unique_ids(examples, "examples")
    for n, ex in enumerate(examples, start=1):
        _check_example(ex, n)
    predictions = read_predictions(path)
    _match(predictions, examples, path, left_out)
    samples = [_sample(ex, predictions[ex.id]) for ex in examples]
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_task["report" if ex.task in REPORT_TASKS else ex.task].append(i)
    closed = _closed(examples, samples, by_task.get("vqa_closed", []))
    text_kwargs = {"nltk_data": nltk_data, "bertscore_model": bertscore_model}
    open_section = _text(examples, samples, by_task.get("vqa_open", []), **text_kwargs)
    report = _text(examples, samples, by_task.get("report", []), **text_kwargs)
    attention, note = _attention(examples, samples)
    return EvalReport(len(examples), closed, open_section, report, attention, note, samples)


def _sample(ex: Example, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": ex.id,
        "task": ex.task,
        "question_type": ex.question_type,
        "prediction": row["answer"],
        "reference": ex.answer,
        "slice_scores": row.get("slice_scores"),
    }


def _closed(
    examples: Sequence[Example], samples: list[dict[str, Any]], idx: list[int]
) -> dict[str, Any] | None:
    if not idx:
        return None
    metrics = closed_vqa_accuracy(
        [samples[i]["prediction"] for i in idx],
        [examples[i].answer_letter or "" for i in idx],
        [examples[i].question_type or "all" for i in idx],
    )
    for i, ok in zip(idx, metrics.correct, strict=True):
        samples[i]["correct"] = ok
    return metrics.to_dict()


def _text(
    examples: Sequence[Example], samples: list[dict[str, Any]], idx: list[int], **kwargs: Any
) -> TextSection | None:
    if not idx:
        return None
    scored = score_texts(
        [samples[i]["prediction"] for i in idx], [examples[i].answer or "" for i in idx], **kwargs
    )
    by_type: dict[str, list[dict[str, float]]] = defaultdict(list)
    for i, scores in zip(idx, scored.per_sample, strict=True):
        samples[i].update(scores)
        if examples[i].question_type is not None:
            by_type[examples[i].question_type].append(scores)
    per_type = {
        t: {m: statistics.fmean(s[m] for s in rows) for m in scored.means} for t, rows in by_type.items()
    }
    counts = {t: len(rows) for t, rows in by_type.items()}
    return TextSection(scored.n, dict(scored.means), per_type, counts, dict(scored.not_computed))


def attention_mass(scores: Sequence[float], relevant: Iterable[int]) -> tuple[float, float]:
    """(sum of ``scores`` over the relevant slice indices, the same sum for uniform weights 1/S)."""
    indices = sorted(set(relevant))
    if indices and indices[-1] >= len(scores):
        raise DatasetError(None, f"relevant slice {indices[-1]} is outside the {len(scores)} slice scores")
    return float(sum(scores[i] for i in indices)), len(indices) / len(scores)


def _attention(
    examples: Sequence[Example], samples: list[dict[str, Any]]
) -> tuple[AttentionSection | None, str | None]:
    labelled = [i for i, ex in enumerate(examples) if ex.relevant_slices]
    if not labelled:
        return None, "no example lists relevant slices"
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    by_volume: dict[str, list[Sequence[float]]] = defaultdict(list)
    scored = 0
    for i in labelled:
        scores = samples[i].get("slice_scores")
        if scores is None:
            continue
        scored += 1
        by_volume[str(examples[i].volume)].append(scores)
        mass, uniform = attention_mass(scores, examples[i].relevant_slices or ())
        samples[i]["attention_mass"], samples[i]["uniform_mass"] = mass, uniform
        groups[examples[i].question_type or "untyped"].append((mass, uniform))
        groups[OVERALL].append((mass, uniform))
    if not scored:
        return None, "the predictions carry no slice scores (a model with slice_aggregation='none')"
    return (
        AttentionSection(
            mass={k: statistics.fmean(m for m, _ in v) for k, v in groups.items()},
            uniform={k: statistics.fmean(u for _, u in v) for k, v in groups.items()},
            counts={k: len(v) for k, v in groups.items()},
            question_dependence=question_dependence(by_volume),
        ),
        None,
    )


# ---------------------------------------------------------------------------------------- datasets


def load_dataset(
    path: str | Path,
    *,
    format: str | None = None,
    split: str = "test",
    form: str = "both",
    orientation: str = "axial",
    data_root: str | Path | None = None,
    volume_dir: str | Path | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Examples of a dataset file in any registered format (default: the one its name implies, see
    `med2e3.data.datasets.format_of`); ``split`` is M3D-Cap's, ``form`` M3D-VQA's, ``volume_dir`` CT-RATE's.

    ``limit``: the first N examples only (at least 1).
    """
    source = DatasetSource(
        format=format or format_of(path),  # type: ignore[arg-type]
        path=str(path),
        split=split,
        form=form,  # type: ignore[arg-type]
        volume_dir=None if volume_dir is None else str(volume_dir),
        data_root=None if data_root is None else str(data_root),
        orientation=orientation,  # type: ignore[arg-type]
        limit=limit,
    )
    return read_dataset(source)
