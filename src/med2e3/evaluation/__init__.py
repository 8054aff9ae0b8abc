"""Evaluation: report-generation / VQA metrics as the Med-2E3 release computes them (offline).

Names are re-exported lazily so that ``python -m med2e3.evaluation.nltk_setup`` runs cleanly.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "METRIC_NAMES": "metrics",
    "ClosedVQAMetrics": "metrics",
    "EvaluationInputError": "metrics",
    "TextMetrics": "metrics",
    "bertscore_f1": "metrics",
    "bleu1": "metrics",
    "closed_vqa_accuracy": "metrics",
    "closed_vqa_correct": "metrics",
    "meteor": "metrics",
    "meteor_unavailable_reason": "metrics",
    "rouge1_f": "metrics",
    "score_texts": "metrics",
    "NltkDataError": "nltk_setup",
    "default_nltk_data_dir": "nltk_setup",
    "setup_nltk_data": "nltk_setup",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
