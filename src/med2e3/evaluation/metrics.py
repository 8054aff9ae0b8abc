"""Report-generation / VQA metrics as the Med-2E3 release defines them, computed offline.

* BLEU-1: Hugging Face ``evaluate`` "bleu" with ``max_order=1`` and one reference
  (13a tokenisation, case-sensitive, clipped unigram precision times the brevity
  penalty, no smoothing).
* ROUGE-1: ``rouge_score`` F-measure, no stemming (the ``evaluate`` default).
* METEOR: ``nltk.translate.meteor_score`` on ``nltk.word_tokenize`` tokens, as the
  ``evaluate`` "meteor" metric does; needs offline NLTK data (see ``nltk_setup``).
* BERTScore F1: ``bert_score`` on a local model folder only (published numbers use
  ``roberta-large``, layer 17, no idf, no baseline rescaling).

Each is computed per sample and averaged with a plain mean.  An empty (or
whitespace-only) prediction scores 0 on every metric.  Closed VQA counts an answer
correct when ``"<letter>."`` occurs anywhere in the output.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from med2e3.errors import Med2E3Error
from med2e3.evaluation import nltk_setup

BLEU1, ROUGE1, METEOR, BERTSCORE_F1 = "bleu1", "rouge1", "meteor", "bertscore_f1"
METRIC_NAMES: tuple[str, ...] = (BLEU1, ROUGE1, METEOR, BERTSCORE_F1)
#: bert_score's layer for roberta-large (what ``lang="en"`` selects).
ROBERTA_LARGE_LAYER = 17


class EvaluationInputError(Med2E3Error, ValueError):
    """Predictions/references/labels are malformed (e.g. different lengths)."""


def _require(module: str, pip_name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed for this metric: pip install {pip_name}") from exc


def is_empty(prediction: str) -> bool:
    """True for an empty or whitespace-only prediction (scored 0 everywhere)."""
    return not prediction.strip()


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise EvaluationInputError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise EvaluationInputError("no samples to score")


# --------------------------------------------------------------------------- BLEU-1


@lru_cache(maxsize=1)
def _tokenizer_13a() -> Any:
    return _require("sacrebleu.tokenizers.tokenizer_13a", "sacrebleu").Tokenizer13a()


def tokenize_13a(text: str) -> list[str]:
    """mteval-v13a tokens (the tokenizer of ``evaluate``'s bleu): punctuation split, case kept."""
    return _tokenizer_13a()(text).split()


def bleu1(prediction: str, reference: str) -> float:
    """Sentence BLEU-1: clipped unigram precision x brevity penalty ``exp(1 - r/c)`` when ``c <= r``."""
    hyp, ref = tokenize_13a(prediction), tokenize_13a(reference)
    if not hyp or not ref:
        return 0.0
    matches = sum((Counter(hyp) & Counter(ref)).values())
    precision = matches / len(hyp)
    ratio = len(hyp) / len(ref)
    brevity = 1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio)
    return precision * brevity


# --------------------------------------------------------------------------- ROUGE-1


@lru_cache(maxsize=1)
def _rouge1_scorer() -> Any:
    scorer_mod = _require("rouge_score.rouge_scorer", "rouge-score")
    return scorer_mod.RougeScorer(["rouge1"], use_stemmer=False)


def rouge1_f(prediction: str, reference: str) -> float:
    """ROUGE-1 F-measure (lower-cased alphanumeric tokens, no stemming); 0 for an empty prediction."""
    if is_empty(prediction):
        return 0.0
    return float(_rouge1_scorer().score(reference, prediction)["rouge1"].fmeasure)


# --------------------------------------------------------------------------- METEOR


def _nltk_candidate_dirs(nltk_data: str | Path | None) -> list[Path]:
    dirs = [Path(nltk_data).expanduser()] if nltk_data is not None else []
    default = nltk_setup.default_nltk_data_dir()
    return dirs + ([default] if default not in dirs else [])


def meteor_unavailable_reason(nltk_data: str | Path | None = None) -> str | None:
    """None when METEOR can run offline; otherwise why not and the command that fixes it.

    A complete data folder (``nltk_data``, else the med2e3 default) is put first on
    ``nltk.data.path``; NLTK's own search path (``NLTK_DATA``, ``~/nltk_data``) also counts. When
    neither has the data, it is built into the first folder from Debian's WordNet files
    (`nltk_setup.ensure_nltk_data`). Never downloads anything.
    """
    try:
        nltk = importlib.import_module("nltk")
    except ImportError:
        return "METEOR skipped: nltk is not installed (pip install nltk)"
    candidates = _nltk_candidate_dirs(nltk_data)
    folder = next((f for f in candidates if not nltk_setup.missing_nltk_data(f)), None)
    if folder is None and not _nltk_data_found(nltk):
        try:
            folder = nltk_setup.ensure_nltk_data(candidates[0])
        except (nltk_setup.NltkDataError, OSError) as err:
            return f"METEOR skipped: offline NLTK data (WordNet 3.0, punkt_tab English) cannot be built in {candidates[0]}: {err}"
    if folder is not None and str(folder) not in nltk.data.path:
        nltk.data.path.insert(0, str(folder))
    return None


def _nltk_data_found(nltk: Any) -> bool:
    try:
        nltk.data.find((nltk_setup.WORDNET_SUBDIR / "lexnames").as_posix())
        nltk.data.find(f"{nltk_setup.PUNKT_SUBDIR.as_posix()}/")
    except LookupError:
        return False
    return True


def meteor(prediction: str, reference: str, *, nltk_data: str | Path | None = None) -> float:
    """NLTK METEOR (alpha 0.9, beta 3, gamma 0.5) on ``word_tokenize`` tokens; 0 for an empty prediction.

    Raises ``nltk_setup.NltkDataError`` when the offline data is missing.
    """
    if is_empty(prediction):
        return 0.0
    reason = meteor_unavailable_reason(nltk_data)
    if reason is not None:
        raise nltk_setup.NltkDataError(reason)
    return _meteor_tokens(prediction, reference)


def _meteor_tokens(prediction: str, reference: str) -> float:
    from nltk import word_tokenize
    from nltk.translate.meteor_score import single_meteor_score

    return float(single_meteor_score(word_tokenize(reference), word_tokenize(prediction)))


# --------------------------------------------------------------------------- BERTScore


def _bertscore_layer(model_dir: Path) -> int:
    bs_utils = _require("bert_score.utils", "bert-score")
    known = bs_utils.model2layers.get(model_dir.name)
    if known is not None:
        return int(known)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    is_roberta_large = (
        config.get("model_type") == "roberta"
        and config.get("num_hidden_layers") == 24
        and config.get("hidden_size") == 1024
    )
    return ROBERTA_LARGE_LAYER if is_roberta_large else int(config["num_hidden_layers"])


def _restore_prefix_space(scorer: Any, folder: Path) -> None:
    """Make RoBERTa/GPT-2 tokenisation match bert_score's intent (a leading space on the first word).

    bert_score passes ``add_prefix_space=True`` per call; transformers 5 ignores that
    keyword, so the tokenizer is reloaded with the option set at construction.
    """
    bs_utils = _require("bert_score.utils", "bert-score")
    tokenizer = scorer._tokenizer
    if not isinstance(tokenizer, bs_utils.GPT2Tokenizer | bs_utils.RobertaTokenizer):
        return
    first = tokenizer.convert_ids_to_tokens(bs_utils.sent_encode(tokenizer, "a b"))[1]
    if not first.startswith("\u0120"):
        transformers = _require("transformers", "transformers")
        scorer._tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(folder), use_fast=False, add_prefix_space=True
        )


def bertscore_f1(
    predictions: Sequence[str],
    references: Sequence[str],
    model_dir: str | Path,
    *,
    num_layers: int | None = None,
    batch_size: int = 32,
    device: str | None = None,
) -> list[float]:
    """Per-sample BERTScore F1 with the model in a local folder (no idf, no rescaling).

    ``num_layers`` defaults to bert_score's choice for the folder name, 17 for a
    roberta-large config, else the model's last layer.  Empty predictions score 0.
    """
    return _bertscore(predictions, references, model_dir, num_layers, batch_size, device)[0]


def _bertscore(
    predictions: Sequence[str],
    references: Sequence[str],
    model_dir: str | Path,
    num_layers: int | None,
    batch_size: int,
    device: str | None,
) -> tuple[list[float], int]:
    _check_pairs(predictions, references)
    folder = Path(model_dir).expanduser()
    if not (folder / "config.json").is_file():
        # Checked first: a missing folder must never reach from_pretrained (a hub download).
        raise EvaluationInputError(f"BERTScore model folder has no config.json: {folder}")
    bert_score = _require("bert_score", "bert-score")
    layer = num_layers if num_layers is not None else _bertscore_layer(folder)
    keep = [i for i, pred in enumerate(predictions) if not is_empty(pred)]
    scores = [0.0] * len(predictions)
    if keep:
        scorer = bert_score.BERTScorer(
            model_type=str(folder), num_layers=layer, batch_size=batch_size, device=device, idf=False
        )
        _restore_prefix_space(scorer, folder)
        _, _, f1 = scorer.score(
            [predictions[i] for i in keep], [references[i] for i in keep], batch_size=batch_size
        )
        for i, value in zip(keep, f1.tolist(), strict=True):
            scores[i] = float(value)
    return scores, layer


# --------------------------------------------------------------------------- aggregation


@dataclass
class TextMetrics:
    """Per-sample scores, their plain means, and the metrics that were not computed (with why)."""

    n: int
    means: dict[str, float]
    per_sample: list[dict[str, float]]
    not_computed: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "n": self.n,
            "means": dict(self.means),
            "not_computed": dict(self.not_computed),
            "notes": dict(self.notes),
            "per_sample": [dict(s) for s in self.per_sample],
        }


def score_texts(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    nltk_data: str | Path | None = None,
    bertscore_model: str | Path | None = None,
    bertscore_num_layers: int | None = None,
    bertscore_device: str | None = None,
) -> TextMetrics:
    """Score (prediction, reference) pairs with BLEU-1, ROUGE-1, METEOR, BERTScore F1 and average them.

    METEOR is skipped (with the setup command in ``not_computed``) when the offline
    NLTK data is missing; BERTScore is "not computed" unless ``bertscore_model``
    names a local folder.
    """
    _check_pairs(predictions, references)
    columns: dict[str, list[float]] = {
        BLEU1: [bleu1(p, r) for p, r in zip(predictions, references, strict=True)],
        ROUGE1: [rouge1_f(p, r) for p, r in zip(predictions, references, strict=True)],
    }
    not_computed: dict[str, str] = {}
    notes: dict[str, str] = {}

    reason = meteor_unavailable_reason(nltk_data)
    if reason is None:
        columns[METEOR] = [
            0.0 if is_empty(p) else _meteor_tokens(p, r) for p, r in zip(predictions, references, strict=True)
        ]
    else:
        not_computed[METEOR] = reason

    if bertscore_model is None:
        not_computed[BERTSCORE_F1] = (
            "not computed: pass a local model folder (published numbers use roberta-large, layer 17)"
        )
    elif importlib.util.find_spec("bert_score") is None:
        not_computed[BERTSCORE_F1] = "not computed: bert_score is not installed (pip install bert-score)"
    else:
        scores, layer = _bertscore(
            predictions, references, bertscore_model, bertscore_num_layers, 32, bertscore_device
        )
        columns[BERTSCORE_F1] = scores
        notes[BERTSCORE_F1] = (
            f"model={bertscore_model}, layer={layer}, idf=False, rescale_with_baseline=False"
        )

    per_sample = [{name: values[i] for name, values in columns.items()} for i in range(len(predictions))]
    means = {name: statistics.fmean(values) for name, values in columns.items()}
    return TextMetrics(
        n=len(predictions), means=means, per_sample=per_sample, not_computed=not_computed, notes=notes
    )


# --------------------------------------------------------------------------- closed VQA


def closed_vqa_correct(output: str, answer_letter: str) -> bool:
    """The release's rule: correct iff ``"<letter>."`` occurs in the output (case-sensitive substring).

    ``answer_letter`` may be given as ``"B"`` or ``"B."``.  Being a plain substring
    test, ``"BA."`` counts as containing ``"A."``.
    """
    letter = answer_letter.strip().rstrip(".").strip()
    if not letter:
        raise EvaluationInputError("empty answer letter")
    return f"{letter}." in output


@dataclass
class ClosedVQAMetrics:
    """Closed-VQA accuracy: over all questions, per question type, and the unweighted mean of types."""

    n: int
    overall: float
    per_type: dict[str, float]
    counts: dict[str, int]
    mean_of_types: float
    correct: list[bool]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-question list)."""
        return {
            "n": self.n,
            "overall": self.overall,
            "per_type": dict(self.per_type),
            "counts": dict(self.counts),
            "mean_of_types": self.mean_of_types,
        }


def closed_vqa_accuracy(
    outputs: Sequence[str],
    answer_letters: Sequence[str],
    question_types: Sequence[str] | None = None,
) -> ClosedVQAMetrics:
    """Accuracy of closed (multiple-choice) VQA outputs, overall and per question type.

    Without ``question_types`` every question has type ``"all"``.
    """
    types = list(question_types) if question_types is not None else ["all"] * len(outputs)
    if not (len(outputs) == len(answer_letters) == len(types)):
        raise EvaluationInputError(
            f"{len(outputs)} outputs, {len(answer_letters)} answer letters, {len(types)} question types"
        )
    if not outputs:
        raise EvaluationInputError("no questions to score")
    correct = [closed_vqa_correct(o, a) for o, a in zip(outputs, answer_letters, strict=True)]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for qtype, ok in zip(types, correct, strict=True):
        by_type[qtype].append(ok)
    per_type = {qtype: sum(oks) / len(oks) for qtype, oks in by_type.items()}
    return ClosedVQAMetrics(
        n=len(correct),
        overall=sum(correct) / len(correct),
        per_type=per_type,
        counts={qtype: len(oks) for qtype, oks in by_type.items()},
        mean_of_types=statistics.fmean(per_type.values()),
        correct=correct,
    )
