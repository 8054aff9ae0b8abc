"""Would better slice weights help a trained model? Closed VQA with the slice weights replaced at inference.

Every model with a 2D branch (``tgis`` or ``mean``) answers the held-out closed questions of an ablation
folder's benchmark four times, its weights over the 32 slices being: its own (TG-IS scores, or uniform for
``mean``), uniform, an oracle (uniform over the question's relevant slices, zero elsewhere; a question
whose relevant slices are none or all keeps uniform), and zero (the 2D tokens become zero vectors: what the
answers owe to the 2D branch at all). If the oracle does not beat the model's own weights, finding the
right slices is not what limits the answers. Each question is answered alone (greedy). Run from
the repository root, after ``med2e3 ablation``::

    python -m benchmarks.slice_weights runs/ablation-starters --questions 200

Prints one JSON record per model, then a Markdown table (mean ± sample std over seeds per variant).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import groupby, product
from pathlib import Path
from typing import Any

import torch

from med2e3.data.datasets import Example
from med2e3.evaluation.ablation import (
    SETTINGS_RECORD,
    AblationSettings,
    benchmark_dir,
    eval_examples,
    run_folders,
)
from med2e3.evaluation.reliance import closed_accuracy
from med2e3.model.tgis import aggregate_slices

MODES = ("own", "uniform", "oracle", "zero")
ROWS = ("overall", "Abnormality", "Location")


def mode_weights(mode: str, example: Example, slices: int) -> torch.Tensor | None:
    """1 x S weights of ``mode`` for ``example``: None (the model's own), uniform, the oracle (uniform over
    the relevant slices; uniform over all when they are none or all), or zero."""
    if mode == "own":
        return None
    if mode == "zero":
        return torch.zeros(1, slices)
    relevant = sorted(set(example.relevant_slices or ()))
    if mode == "uniform" or not relevant or len(relevant) == slices:
        return torch.full((1, slices), 1.0 / slices)
    weights = torch.zeros(1, slices)
    weights[0, relevant] = 1.0 / len(relevant)
    return weights


@contextmanager
def forced_weights(model: Any, weights: Callable[[], torch.Tensor | None]) -> Iterator[None]:
    """While inside, ``model`` aggregates its slice tokens with ``weights()`` (1 x S) when that is not None.

    It replaces the instance's ``visual_tokens``: a predictor that runs it as a CUDA graph would not see it,
    hence the CPU predictor in `main`."""
    original = model.visual_tokens

    def visual_tokens(encoding: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens, scores = original(encoding, *args, **kwargs)
        forced = weights()
        if forced is None or scores is None:
            return tokens, scores
        v3, v2 = encoding.tokens3d, encoding.slice_tokens
        forced = forced.to(v2.device, v2.dtype).expand(v2.shape[0], -1)
        return torch.cat([v3, aggregate_slices(forced, v2)], dim=1), forced

    model.visual_tokens = visual_tokens
    try:
        yield
    finally:
        del model.visual_tokens  # the class's method again


def answer_with_weights(predictor: Any, examples: Sequence[Example], max_new_tokens: int) -> dict[str, dict]:
    """Closed-VQA accuracy (overall and per type) for each of `MODES`."""
    slices = predictor.model.config.vision3d_config.image_size[0]
    forced: list[torch.Tensor | None] = [None]
    answers: dict[str, dict[str, str]] = {mode: {} for mode in MODES}
    with forced_weights(predictor.model, lambda: forced[0]):
        for (volume, orientation), group in groupby(examples, key=lambda ex: (ex.volume, ex.orientation)):
            predictor.load(volume, orientation)
            for ex, mode in product(group, MODES):
                forced[0] = mode_weights(mode, ex, slices)
                got = predictor.ask_many([ex.question], [ex.prompt], max_new_tokens=max_new_tokens)[0]
                answers[mode][ex.id] = got.answer
    return {mode: closed_accuracy(examples, answers[mode]) for mode in MODES}


def models(out: Path, variants: Sequence[str] = ("tgis", "mean")) -> list[tuple[str, int, Path]]:
    """(variant, seed, final model folder) of every finished run of ``variants`` in an ablation folder."""
    return [
        (variant, seed, run / "finetune")
        for variant, seed, run in run_folders(out)
        if variant in variants and (run / "finetune" / "config.json").is_file()
    ]


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per (`ROWS` entry, weights), one column per variant (mean ± std over seeds)."""
    variants = sorted({r["variant"] for r in records}, reverse=True)  # tgis, mean
    lines = [
        "| closed VQA, % | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for row in ROWS:
        for mode in MODES:
            cells = []
            for variant in variants:
                values = [100 * r[mode][row] for r in records if r["variant"] == variant and row in r[mode]]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.1f} ± {std:.1f}" if values else "n/a")
            lines.append(f"| {row}, {mode} weights | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a med2e3 ablation folder")
    parser.add_argument("--questions", type=int, default=200, help="held-out closed questions (default 200)")
    parser.add_argument(
        "--max-new-tokens", type=int, help="default: the ablation's closed_tokens (ablation_settings.json)"
    )
    parser.add_argument("--variants", nargs="+", choices=("tgis", "mean"), default=["tgis", "mean"])
    args = parser.parse_args(argv)

    from med2e3.inference import Med2E3Predictor

    torch.set_num_threads(1)
    settings = AblationSettings(closed_eval=args.questions, open_eval=0, report_eval=0)
    recorded = args.out / SETTINGS_RECORD
    if recorded.is_file():
        settings.closed_tokens = json.loads(recorded.read_text()).get("closed_tokens", settings.closed_tokens)
    tokens = args.max_new_tokens or settings.closed_tokens
    examples = eval_examples(benchmark_dir(args.out), settings)["closed"]
    records = []
    for variant, seed, folder in models(args.out, args.variants):
        predictor = Med2E3Predictor.from_pretrained(folder, device="cpu")
        record = {"variant": variant, "seed": seed, "questions": len(examples)}
        record.update(answer_with_weights(predictor, examples, tokens))
        print(json.dumps(record), flush=True)
        records.append(record)
    if not records:
        raise SystemExit(f"{args.out}: no finished tgis or mean runs under runs/")
    print(table(records))


if __name__ == "__main__":
    main()
