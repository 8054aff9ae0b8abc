"""`med2e3 demo`: the whole pipeline on a laptop CPU with no downloads.

Generates a synthetic CT benchmark of its own, measures the shipped tiny model (`BUNDLED_TINY_MODEL`,
trained on other synthetic volumes) on its held-out questions, fine-tunes it on its training split
(stage 2), measures it again, asks a few questions on held-out volumes and draws the TG-IS figure.
Without a starting point it trains the tiny preset from the stage-0 LLM instead (stage 1 then stage 2).
Every step is resumable: rerunning the command continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from med2e3.data.datasets import Example, closed_choices
from med2e3.data.synth import benchmark_examples, benchmark_source, generate_benchmark
from med2e3.evaluation.metrics import closed_vqa_accuracy
from med2e3.evaluation.reliance import image_reliance, question_dependence
from med2e3.evaluation.runner import attention_mass
from med2e3.folders import BUNDLED_TINY_LLM, BUNDLED_TINY_MODEL, check_unseen
from med2e3.inference import Med2E3Predictor
from med2e3.training.config import config_from_dict
from med2e3.training.trainer import TRAINING_INFO, train
from med2e3.viz import plot_question_scores, plot_slice_scores


@dataclass(frozen=True)
class DemoBudget:
    """Sizes of the demo run; the defaults (a fine-tune of the shipped model) finish in a few minutes on
    2 CPU cores."""

    volumes: int = 400
    pretrain_epochs: float = 1.0  # stage 1, only when training from the stage-0 LLM
    finetune_epochs: float = 1.0
    lr: float = 2e-4  # stage 2
    batch_size: int = 8
    eval_questions: int = 200


#: Both stages from the stage-0 LLM (`run_demo` with ``start=None``): about 10 minutes on 2 CPU cores.
FROM_SCRATCH = DemoBudget(finetune_epochs=3.0, lr=1e-3)


def default_budget(start: str | None) -> DemoBudget:
    """The budget for a fine-tune of ``start``, or `FROM_SCRATCH` when there is none."""
    return DemoBudget() if start else FROM_SCRATCH


#: New tokens for a closed answer (the letter and the choice's text).
CLOSED_TOKENS = 16

#: The relevant-slice loss of the shipped weights' last round (scripts/train_tiny_model.sh), so that the
#: demo's fine-tune keeps TG-IS looking where each question points.
SLICE_LOSS_WEIGHT = 0.5


def _stage(out: Path, data: Path, stage: str, budget: DemoBudget, seed: int, start: str | None) -> Path:
    cap = benchmark_source(data, "caption", "train")
    vqa = benchmark_source(data, "vqa", "train")
    closed = benchmark_source(data, "vqa", "train", form="closed")
    raw: dict[str, Any] = {
        "stage": stage,
        "output_dir": str(out / stage),
        "data": {  # stage 2: closed questions twice; their answer letter is what a small LLM learns last
            "train": [cap] if stage == "pretrain" else [cap, vqa, closed],
            "cache_dir": str(data / ".cache"),
            "augment": False,
        },
        "seed": seed,
        "train_question_encoder": True,  # random BERT: it must learn to tell questions apart
        "batch_size": budget.batch_size,
        "logging_steps": 25,
        "save_steps": 200,
        "save_total_limit": 1,
    }
    if stage == "pretrain":  # the LLM starts from the shipped stage 0 (`med2e3.training.letters`)
        raw.update(
            model={"preset": "tiny", "language_model": BUNDLED_TINY_LLM},
            epochs=budget.pretrain_epochs,
            lr=1e-3,
        )
    else:  # the tiny 3D encoder (random in the preset) learns too; every answer weighs the same
        raw.update(
            model={"init_from": start},
            epochs=budget.finetune_epochs,
            lr=budget.lr,
            train_vision3d=True,
            loss_average="answer",
            slice_loss_weight=SLICE_LOSS_WEIGHT,
        )
    if (out / stage / TRAINING_INFO).is_file():  # train() checks that it was trained with these settings
        print(f"[demo] {stage}: already trained ({out / stage})")
    else:
        print(f"[demo] training stage {'1 (pretrain)' if stage == 'pretrain' else '2 (finetune)'} ...")
    return train(config_from_dict(raw))


def closed_questions(data: Path, n: int) -> list[Example]:
    """The ``n`` held-out closed questions the demo scores, spread over the test split."""
    closed = benchmark_examples(data, "vqa", "test", form="closed")
    step = max(1, len(closed) // n)
    return closed[::step][:n]


def _choice_text(answer: str) -> str:
    """ "B. Left kidney" -> "left kidney" (the chosen option's text)."""
    return answer.split(". ", 1)[-1].strip().lower()


def blind_prior(train: list[Example], examples: list[Example]) -> dict[str, float]:
    """Accuracy per question type (and overall) of answering without the image: of a question's four
    options, the one most often the answer to the same question text in training (to the same question
    type when the text is new; the first listed on a tie)."""
    by_text: dict[str, Counter[str]] = {}
    by_type: dict[str, Counter[str]] = {}
    for ex in train:
        answer = _choice_text(ex.answer or "")
        by_text.setdefault(ex.question, Counter())[answer] += 1
        by_type.setdefault(ex.question_type or "", Counter())[answer] += 1
    hits: dict[str, list[bool]] = {}
    for ex in examples:
        counts = by_text.get(ex.question) or by_type[ex.question_type or ""]
        options = [text.lower() for text in closed_choices(ex.prompt)]
        guess = max(options, key=lambda text: counts[text])  # max keeps the first of equal counts
        hits.setdefault(ex.question_type or "", []).append(guess == _choice_text(ex.answer or ""))
    result = {kind: sum(v) / len(v) for kind, v in hits.items()}
    result["overall"] = sum(sum(v) for v in hits.values()) / len(examples)
    return result


def _evaluate(
    predictor: Med2E3Predictor, examples: list[Example], train: list[Example]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Closed VQA as the release scores it (the letter), the chosen text, and the blind prior;
    TG-IS: how much the scores depend on the question, and their mass on the relevant slices.
    Also returns the answers by id."""
    outputs: dict[str, str] = {}
    scores: dict[str, list[float] | None] = {}
    for (volume, orientation), group in groupby(examples, key=lambda ex: (ex.volume, ex.orientation)):
        batch = list(group)
        predictor.load(volume, orientation)
        answers = predictor.ask_many(
            [ex.question for ex in batch], [ex.prompt for ex in batch], max_new_tokens=CLOSED_TOKENS
        )
        outputs.update({ex.id: a.answer for ex, a in zip(batch, answers, strict=True)})
        scores.update({ex.id: a.slice_scores for ex, a in zip(batch, answers, strict=True)})
    result = closed_vqa_accuracy(
        [outputs[ex.id] for ex in examples],
        [ex.answer_letter for ex in examples],
        [ex.question_type for ex in examples],
    )
    text_hits: dict[str, list[bool]] = {}
    for ex in examples:
        truth = _choice_text(ex.answer or "")
        text_hits.setdefault(ex.question_type or "", []).append(_choice_text(outputs[ex.id]) == truth)
    summary = {
        "n": result.n,
        "overall": result.overall,
        "per_type": result.per_type,
        "text_accuracy": {k: sum(v) / len(v) for k, v in text_hits.items()},
        "blind_prior": blind_prior(train, examples),
        "tgis": _tgis_summary(examples, scores),
    }
    return summary, outputs


def _tgis_summary(examples: list[Example], scores: dict[str, list[float] | None]) -> dict[str, Any] | None:
    """Question dependence of the TG-IS scores and their mass on the relevant slices, per question type."""
    if any(scores[ex.id] is None for ex in examples):
        return None  # no TG-IS in this model
    by_volume: dict[str, list[list[float]]] = {}
    mass: dict[str, list[tuple[float, float]]] = {}
    for ex in examples:
        by_volume.setdefault(str(ex.volume), []).append(scores[ex.id])
        if ex.relevant_slices:
            pair = attention_mass(scores[ex.id], ex.relevant_slices)
            mass.setdefault(ex.question_type or "", []).append(pair)
            mass.setdefault("overall", []).append(pair)
    return {
        "question_dependence": question_dependence(by_volume),
        "relevant_mass": {k: sum(m for m, _ in v) / len(v) for k, v in mass.items()},
        "uniform_mass": {k: sum(u for _, u in v) / len(v) for k, v in mass.items()},
    }


def _measure(predictor: Med2E3Predictor, examples: list[Example], train: list[Example]) -> dict[str, Any]:
    """Closed-VQA accuracy (`_evaluate`) and image reliance of one model on the held-out questions."""
    accuracy, answers = _evaluate(predictor, examples, train)
    print("[demo] image reliance: the same questions with another test volume ...")
    reliance = image_reliance(predictor, examples, CLOSED_TOKENS, answers=answers)
    return {"closed_vqa_accuracy": accuracy, "image_reliance": reliance.to_dict()}


def run_demo(
    out_dir: str | Path = "runs/demo",
    seed: int = 0,
    budget: DemoBudget | None = None,
    start: str | None = BUNDLED_TINY_MODEL,
) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns (and writes to summary.json) what it measured.

    ``start`` is a trained model folder, measured then fine-tuned on the demo's volumes (default: the
    shipped one); ``None`` trains the tiny preset from the stage-0 LLM (both stages; see `FROM_SCRATCH`).
    """
    budget = budget or default_budget(start)
    if start:
        check_unseen(start, seed, "--seed")
    out = Path(out_dir)
    begin = time.time()
    torch.manual_seed(seed)
    data = out / "data"
    print(f"[demo] generating {budget.volumes} synthetic CT volumes in {data} ...")
    generate_benchmark(data, budget.volumes, seed=seed)
    train_closed = benchmark_examples(data, "vqa", "train", form="closed")
    closed = closed_questions(data, budget.eval_questions)
    before = None
    if start:
        print(f"[demo] {start}, before any training here: closed VQA on {len(closed)} held-out questions ...")
        before = {"model": start, **_measure(Med2E3Predictor.from_pretrained(start), closed, train_closed)}
    else:
        start = str(_stage(out, data, "pretrain", budget, seed, None))
    model_dir = _stage(out, data, "finetune", budget, seed, start)

    predictor = Med2E3Predictor.from_pretrained(model_dir)
    print(f"[demo] evaluating closed VQA on {len(closed)} held-out questions ...")
    measured = _measure(predictor, closed, train_closed)

    test_open = benchmark_examples(data, "vqa", "test", form="open")
    asked = []
    for ex in test_open[:40:8]:
        predictor.load(ex.volume)
        answer = predictor.ask(ex.question, max_new_tokens=24)
        asked.append(
            {
                "volume": str(ex.volume),
                "question": ex.question,
                "answer": answer.answer,
                "reference": ex.answer,
            }
        )
    figure = plot_slice_scores(
        predictor.current.pixel_values[0],
        answer.slice_scores,
        out / "tgis.png",
        ex.question,
        answer.answer,
        answer.slice_ranges,
    )
    compared = None
    if answer.slice_scores is not None:  # every question of the last volume, on one figure
        curves = {q.question: predictor.slice_scores(q.question) for q in test_open if q.volume == ex.volume}
        compared = plot_question_scores(curves, out / "tgis_questions.png", answer.slice_ranges)
    summary = {
        "model": str(model_dir),
        "figure": str(figure),
        "figure_questions": None if compared is None else str(compared),
        **measured,
        "start": before,
        "examples": asked,
        "wall_seconds": round(time.time() - begin, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, out)
    return summary


def type_accuracy(accuracy: dict[str, Any], kind: str) -> float:
    """One question type's letter accuracy (or ``"overall"``) from a `closed_vqa_accuracy` summary."""
    return accuracy["overall"] if kind == "overall" else accuracy["per_type"][kind]


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    acc, start = summary["closed_vqa_accuracy"], summary["start"]
    print("\n[demo] done in {:.0f} s".format(summary["wall_seconds"]))
    print(
        f"[demo] held-out closed VQA ({acc['n']} questions). The release's metric is the right letter (chance"
    )
    print("       0.25); 'text': the chosen option's text; 'blind prior': the option most often right for")
    print(
        "       the same question in training, no image"
        + ("; 'before': the starting point:" if start else ":")
    )
    print("         type          " + ("before   " if start else "") + "letter   text    blind prior")
    for kind, value in [*acc["per_type"].items(), ("overall", acc["overall"])]:
        first = f"{type_accuracy(start['closed_vqa_accuracy'], kind):.3f}    " if start else ""
        text = f"{acc['text_accuracy'][kind]:.3f}" if kind in acc["text_accuracy"] else "     "
        print(f"         {kind:<12}  {first}{value:.3f}    {text}   {acc['blind_prior'][kind]:.3f}")
    for name, measured in ([("starting point", start)] if start else []) + [("model", summary)]:
        rel = measured["image_reliance"]
        print(
            f"[demo] image reliance of the {name} (same questions, each with another test volume): letter "
            f"accuracy {rel['accuracy']['overall']:.3f} -> {rel['accuracy_swapped']['overall']:.3f}, "
            f"answer loss {rel['loss']:.3f} -> {rel['loss_swapped']:.3f}"
        )
    tgis = acc["tgis"]
    if tgis:
        dep = tgis["question_dependence"]
        print(
            "[demo] TG-IS: largest score difference between questions on one volume (median) "
            + ("n/a" if dep is None else f"{dep:.2g}")
            + "; mass on the relevant slices (uniform weights):"
        )
        print(
            "         "
            + ", ".join(
                f"{k} {v:.3f} ({tgis['uniform_mass'][k]:.3f})" for k, v in tgis["relevant_mass"].items()
            )
        )
    for ex in summary["examples"][:3]:
        print(f"[demo] Q: {ex['question']}\n       A: {ex['answer']!r}   (reference: {ex['reference']!r})")
    print(f"[demo] model:   {summary['model']}")
    print(f"[demo] figure:  {summary['figure']}")
    if summary.get("figure_questions"):
        print(f"[demo] figure:  {summary['figure_questions']} (TG-IS of each question on one volume)")
    print(f"[demo] summary: {out / 'summary.json'}")
    print(
        f'[demo] try:     med2e3 ask {summary["examples"][0]["volume"]} "Which organ has a lesion?" '
        f"--model {summary['model']} --plot slices.png"
    )
