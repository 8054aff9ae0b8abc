"""Turn (volume, question[, answer]) into model inputs: the one source of truth for the chat template.

The LLM prompt follows the release's "phi" template::

    {system} USER: <image3d>\\n{prompt} ASSISTANT: {answer}<|endoftext|>

The placeholder is a real special token of the tokenizer, expanded here to ``num_image_tokens``
copies; the model writes the visual tokens over them. Labels are -100 on the whole prompt. The
TG-IS question (the bare question, no template) is tokenised separately for the question encoder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from med2e3.config import Med2E3Config
from med2e3.data.datasets import ORIENTATIONS
from med2e3.errors import ConfigError, InputError
from med2e3.folders import check_tokenizer_folder

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TOKEN = "<image3d>"
EOS_TOKEN = "<|endoftext|>"
QUESTION_TOKENIZER_DIR = "question_tokenizer"
PROCESSOR_CONFIG = "med2e3_processor.json"
IGNORE_INDEX = -100
DEFAULT_WINDOW = "abdomen"
DEFAULT_ORIENTATION = "axial"
#: A tokenizer folder holds at least one of these (fast tokenizers, SentencePiece, WordPiece, BPE vocab).


BUNDLED_VOCAB_SIZE = 1024
BUNDLED_DIR = "assets/tokenizers"


def _corpus() -> list[str]:
    text = resources.files("med2e3").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def write_bundled_tokenizers(directory: str | Path) -> None:
    """Train the bundled tokenizers on the radiology corpus and save them (``llm/``, ``question/``).

    Training is not bit-reproducible across processes (the trainer breaks ties in hash order), so the
    package ships the files this wrote once: ``python -c "from med2e3.data.processor import *;
    write_bundled_tokenizers('src/med2e3/assets/tokenizers')"``.
    """
    directory = Path(directory)
    build_llm_tokenizer(BUNDLED_VOCAB_SIZE).save_pretrained(directory / "llm")
    build_question_tokenizer(BUNDLED_VOCAB_SIZE).save_pretrained(directory / "question")


def bundled_tokenizers() -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """The shipped (LLM, question) tokenizers for random-init models: no download, always the same ids."""
    root = Path(str(resources.files("med2e3").joinpath(BUNDLED_DIR)))
    return AutoTokenizer.from_pretrained(root / "llm"), AutoTokenizer.from_pretrained(root / "question")


def build_llm_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the bundled radiology corpus (no download).

    Special tokens come first: ``<|endoftext|>`` = 0 (end of text and padding), ``<image3d>`` = 1.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, extra_special_tokens=[IMAGE_TOKEN]
    )


def build_question_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """An uncased WordPiece tokenizer (BERT conventions: [CLS] ... [SEP]) for the TG-IS question encoder."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``folder``; ConfigError naming the folder when it is missing or unreadable."""
    folder = check_tokenizer_folder(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # tokenizer loading fails in many library-specific ways
        raise ConfigError(f"{folder}: cannot load the tokenizer ({type(err).__name__}: {err})") from err


class Med2E3Processor:
    """Tokenises prompts, answers and TG-IS questions; stacks preprocessed volumes.

    Args:
        tokenizer: the LLM tokenizer; must know ``image_token`` as a single token.
        question_tokenizer: the TG-IS question encoder's tokenizer (BERT conventions), or None for
            models without TG-IS.
        num_image_tokens: copies of the placeholder the model expects (``config.num_image_tokens``).
        max_length: longest LLM sequence; answers are truncated to fit, prompts never are.
        window: the CT window volumes are preprocessed with (`med2e3.data.io.WINDOWS`).
        orientation: how volume files are read ("axial" or "acquisition", see `med2e3.data.io`).

    ``window`` and ``orientation`` are what the model was trained with; training writes them here, and
    every path that feeds the model (predictor, CLI, server, evaluation) reads them from the model folder.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        question_tokenizer: PreTrainedTokenizerBase | None,
        num_image_tokens: int,
        image_token: str = IMAGE_TOKEN,
        system_prompt: str = SYSTEM_PROMPT,
        max_length: int = 768,
        question_max_length: int = 512,
        window: str = DEFAULT_WINDOW,
        orientation: str = DEFAULT_ORIENTATION,
    ):
        self.tokenizer = tokenizer
        self.question_tokenizer = question_tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.question_max_length = question_max_length
        self.window = check_window(window)
        self.orientation = check_orientation(orientation)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ConfigError(f"the tokenizer has no {image_token!r} token")
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no padding token")

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def for_config(
        cls,
        config: Med2E3Config,
        question_tokenizer: PreTrainedTokenizerBase | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ) -> Med2E3Processor:
        """The bundled tokenizers with ``config``'s geometry (the tiny preset and other random-init models).

        ``question_tokenizer`` and ``tokenizer`` replace the bundled ones (a pretrained question encoder's and
        LLM's own tokenizers).
        """
        bundled_tokenizer, bundled_question_tokenizer = bundled_tokenizers()
        if tokenizer is None:
            tokenizer = bundled_tokenizer
        which = "given"
        if question_tokenizer is None:
            which, question_tokenizer = "bundled", bundled_question_tokenizer
        if config.slice_aggregation != "tgis":
            question_tokenizer = None
        elif len(question_tokenizer) > config.question_encoder_config.vocab_size:
            raise ConfigError(
                f"the {which} question tokenizer has {len(question_tokenizer)} tokens, more than "
                f"question_encoder_config.vocab_size={config.question_encoder_config.vocab_size}"
            )
        processor = cls(tokenizer, question_tokenizer, config.num_image_tokens, config.image_token, **kwargs)
        processor.check_config(config)
        return processor

    def check_config(self, config: Med2E3Config) -> None:
        """Raise ConfigError if this processor does not fit ``config``.

        Also lowers ``question_max_length`` to the question encoder's positions (folders saved before
        it was bounded say 512 whatever the encoder), so that a long TG-IS question is truncated to
        what the encoder can read instead of failing.
        """
        positions = config.question_encoder_config.max_position_embeddings
        self.question_max_length = min(self.question_max_length, positions)
        if self.image_token_id != config.image_token_id:
            raise ConfigError(
                f"tokenizer id of {self.image_token!r} is {self.image_token_id}, config.image_token_id is "
                f"{config.image_token_id}"
            )
        if self.num_image_tokens != config.num_image_tokens:
            raise ConfigError(
                f"processor expands the placeholder to {self.num_image_tokens} tokens, the model expects "
                f"{config.num_image_tokens}"
            )
        if len(self.tokenizer) > config.text_config.vocab_size:
            raise ConfigError(
                f"tokenizer has {len(self.tokenizer)} tokens, more than text_config.vocab_size="
                f"{config.text_config.vocab_size}"
            )
        if config.slice_aggregation == "tgis" and self.question_tokenizer is None:
            raise ConfigError("slice_aggregation='tgis' needs a question tokenizer")

    def save_pretrained(self, directory: str | Path) -> None:
        """Write both tokenizers and the template settings into ``directory`` (next to the model)."""
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        if self.question_tokenizer is not None:
            self.question_tokenizer.save_pretrained(directory / QUESTION_TOKENIZER_DIR)
        settings = {
            "num_image_tokens": self.num_image_tokens,
            "image_token": self.image_token,
            "system_prompt": self.system_prompt,
            "max_length": self.max_length,
            "question_max_length": self.question_max_length,
            "window": self.window,
            "orientation": self.orientation,
        }
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Med2E3Processor:
        directory = Path(directory)
        settings_path = directory / PROCESSOR_CONFIG
        if not settings_path.is_file():
            raise ConfigError(f"{directory}: no {PROCESSOR_CONFIG}; not a med2e3 model folder")
        settings = json.loads(settings_path.read_text())
        missing = [key for key in ("window", "orientation") if key not in settings]
        if missing:
            logger.warning(
                "%s: written before preprocessing was saved with the model; using window=%r, orientation=%r",
                settings_path,
                settings.get("window", DEFAULT_WINDOW),
                settings.get("orientation", DEFAULT_ORIENTATION),
            )
        question_dir = directory / QUESTION_TOKENIZER_DIR
        question_tokenizer = load_tokenizer(question_dir) if question_dir.is_dir() else None
        return cls(load_tokenizer(directory), question_tokenizer, **settings)

    # ---- text -------------------------------------------------------------------------------------
    def prompt_length(self, text: str) -> int:
        """Tokens of the LLM prompt for the user turn ``text``, image tokens included."""
        return len(self._prompt_ids(text, 0))

    def question_length(self, question: str) -> int | None:
        """Tokens of ``question`` for TG-IS before truncation (with [CLS] / [SEP]); None without TG-IS."""
        if self.question_tokenizer is None:
            return None
        return len(self.question_tokenizer(question, truncation=False)["input_ids"])

    def prompt(self, text: str) -> str:
        """The chat-template prompt for one user turn, ending where the answer starts."""
        return f"{self.system_prompt} USER: {self.image_token}\n{text.strip()} ASSISTANT:"

    def _prompt_ids(self, text: str, row: int) -> list[int]:
        ids = self.tokenizer(self.prompt(text), add_special_tokens=False)["input_ids"]
        n = ids.count(self.image_token_id)
        if n != 1:
            raise InputError(
                f"prompt {row} must contain the image placeholder once, found {n}: {text[:80]!r}"
            )
        at = ids.index(self.image_token_id)
        return ids[:at] + [self.image_token_id] * self.num_image_tokens + ids[at + 1 :]

    def _answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [
            self.tokenizer.eos_token_id
        ]

    def __call__(
        self,
        texts: Sequence[str],
        questions: Sequence[str] | None = None,
        answers: Sequence[str] | None = None,
        volumes: torch.Tensor | Sequence[torch.Tensor] | None = None,
        padding_side: Literal["left", "right"] = "right",
    ) -> BatchFeature:
        """Batch of model inputs.

        Args:
            texts: user turns shown to the LLM (e.g. a closed question with its choices).
            questions: the bare questions for TG-IS; default: ``texts``.
            answers: target answers (training); adds ``labels`` masked on the prompt.
            volumes: preprocessed volumes, each 1 x D x H x W in [0, 1], or one B x 1 x D x H x W tensor.
            padding_side: "right" for training, "left" for batched generation.
        """
        texts = list(texts)
        questions = texts if questions is None else list(questions)
        if len(questions) != len(texts) or (answers is not None and len(answers) != len(texts)):
            raise InputError("texts, questions and answers must have the same length")
        for row, question in enumerate(questions):
            if not question or not question.strip():
                raise InputError(f"question {row} is empty")
        rows = []
        for row, text in enumerate(texts):
            prompt_ids = self._prompt_ids(text, row)
            if len(prompt_ids) > self.max_length:
                raise InputError(
                    f"prompt {row} is {len(prompt_ids)} tokens long, over max_length={self.max_length}"
                )
            answer_ids = [] if answers is None else self._answer_ids(answers[row])
            answer_ids = answer_ids[: self.max_length - len(prompt_ids)]
            rows.append((prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids))
        batch = self._pad(rows, padding_side, with_labels=answers is not None)
        if self.question_tokenizer is not None:
            q = self.question_tokenizer(
                questions,
                padding=True,
                truncation=True,
                max_length=self.question_max_length,
                return_tensors="pt",
            )
            batch["question_input_ids"] = q["input_ids"]
            batch["question_attention_mask"] = q["attention_mask"]
        if volumes is not None:
            batch["pixel_values"] = (
                volumes if isinstance(volumes, torch.Tensor) else torch.stack(list(volumes))
            )
        return BatchFeature(batch)

    def _pad(self, rows: list[tuple[list[int], list[int]]], side: str, with_labels: bool) -> dict:
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            span = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            attention_mask[i, span] = 1
            labels[i, span] = torch.tensor(lab)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels:
            batch["labels"] = labels
        return batch

    def decode(self, token_ids: torch.Tensor | Sequence[int]) -> str:
        """Text of generated tokens, without special tokens."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    def batch_decode(self, token_ids: torch.Tensor) -> list[str]:
        return [self.decode(row) for row in token_ids]


def check_window(window: str) -> str:
    """``window`` if it names a CT window, else ConfigError listing the valid names."""
    from med2e3.data.io import WINDOWS

    if window not in WINDOWS:
        raise ConfigError(f"unknown window {window!r}; valid names: {', '.join(WINDOWS)}")
    return window


def check_orientation(orientation: str) -> str:
    """``orientation`` if valid, else ConfigError listing the valid ones."""
    if orientation not in ORIENTATIONS:
        raise ConfigError(f"unknown orientation {orientation!r}; valid: {', '.join(ORIENTATIONS)}")
    return orientation
