"""Med2E3Predictor: load a model once, encode a volume once, ask it many questions.

The 3D tokens and the per-slice 2D tokens do not depend on the question, so `load` computes them
once; each question then runs only the question encoder, TG-IS and the LLM.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import queue
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from threading import Thread
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from med2e3.data.datasets import REPORT_INSTRUCTIONS
from med2e3.data.io import (
    MAX_VOLUME_BYTES,
    BadSlices,
    Orientation,
    Volume,
    VolumeWarning,
    check_scan_size,
    ct_window_problem,
    from_array,
    load_volume,
)
from med2e3.data.processor import Med2E3Processor, check_orientation, check_window
from med2e3.data.transforms import prepare_volume, source_slice_ranges
from med2e3.errors import DatasetError, InputError, Med2E3Error
from med2e3.files import write_atomic
from med2e3.folders import check_model_folder
from med2e3.graphs import GraphedCall, pad_questions, question_buckets
from med2e3.model import Med2E3ForConditionalGeneration, VolumeEncoding

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 2000
STATIC_CACHE_STEP = 256  # with compile=True, static KV caches come in multiples of this length


def static_cache_length(tokens: int) -> int:
    """The static KV cache length of a ``compile=True`` generation of ``tokens`` (prompt + answer)."""
    return -(-tokens // STATIC_CACHE_STEP) * STATIC_CACHE_STEP


@dataclass
class Answer:
    """One answer with the TG-IS slice weights that produced it."""

    question: str
    answer: str
    slice_scores: list[float] | None  # one weight per model slice (sum 1); None for slice_aggregation="none"
    slice_ranges: list[tuple[int, int]]  # [start, stop) slices of the original volume behind each model slice
    notes: list[str] = field(default_factory=list)  # how the question was read, e.g. truncated for TG-IS

    def top_slices(self, k: int = 4) -> list[int]:
        """Model-slice indices with the highest scores, best first."""
        if self.slice_scores is None:
            return []
        return [int(i) for i in np.argsort(self.slice_scores)[::-1][:k]]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["slice_ranges"] = [list(r) for r in self.slice_ranges]
        d["top_slices"] = self.top_slices()
        return d


@dataclass
class LoadedVolume:
    """A volume as read, as the model sees it, and its cached encoding."""

    volume: Volume
    pixel_values: torch.Tensor  # 1 x 1 x D x H x W in [0, 1]
    encoding: VolumeEncoding
    slice_ranges: list[tuple[int, int]]


@dataclass
class Question:
    """One question for `Med2E3Predictor.ask_batch`: about ``volume``, shown to the LLM as ``prompt`` if given."""

    volume: LoadedVolume
    text: str
    prompt: str | None = None
    max_new_tokens: int = 64
    on_text: Callable[[str], None] | None = None  # gets the answer piece by piece as it is generated


class _AnswerLengths(StoppingCriteria):
    """Stop each row of a batch after its own number of new tokens (later tokens of the row are padding)."""

    def __init__(self, prompt_tokens: int, limits: Sequence[int], device: torch.device):
        self.prompt_tokens = prompt_tokens
        self.limits = torch.tensor(limits, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return input_ids.shape[1] - self.prompt_tokens >= self.limits  # B


class _TextPieces(TextStreamer):
    """One row's streamed text, cut as `Med2E3Processor.decode` cuts the whole answer: no leading space,
    trailing spaces held back until more text follows, so the pieces add up to the answer."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.text = self.held = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        piece = self.held + (text if self.text else text.lstrip())
        core = piece.rstrip()
        self.held = piece[len(core) :]
        if core:
            self.text += core
            self.on_text(core)


class _RowStreamer(BaseStreamer):
    """Hands each row of a batched generation to its own `_TextPieces` (rows without a callback are skipped)."""

    def __init__(self, tokenizer: Any, callbacks: Sequence[Callable[[str], None] | None]):
        self.rows = [None if fn is None else _TextPieces(tokenizer, fn) for fn in callbacks]

    def put(self, value: torch.Tensor) -> None:  # B x L prompt, then B new tokens per step
        for row, tokens in zip(self.rows, value.reshape(len(self.rows), -1), strict=True):
            if row is not None:
                row.put(tokens)

    def end(self) -> None:
        for row in self.rows:
            if row is not None:
                row.end()


def _override(name: str, given: str | None, trained: str) -> str:
    """``given`` when set (saying so if the model was trained with another value), else ``trained``."""
    if given is None or given == trained:
        return trained
    logger.warning("%s=%r overrides the model's %s=%r (what it was trained with)", name, given, name, trained)
    return given


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No per-tensor "Loading weights" bar: loading a small model is instant, and CLI errors stay one line."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class Med2E3Predictor:
    """Ask questions about a volume; every answer carries its TG-IS slice scores.

    Example::

        predictor = Med2E3Predictor.from_pretrained("runs/demo/finetune")
        predictor.load("scan.nii.gz")
        print(predictor.ask("Which organ has a lesion?").answer)
    """

    def __init__(
        self,
        model: Med2E3ForConditionalGeneration,
        processor: Med2E3Processor,
        window: str | None = None,
        orientation: Orientation | None = None,
        compile: bool = False,
        max_volume_bytes: int | None = None,
        bad_slices: BadSlices = "raise",
    ):
        """``window`` and ``orientation`` default to what the model was trained with (its processor);
        a different value given here is used, with a one-line notice.

        ``compile``: on CUDA, (1) the volume encoders and TG-IS (question encoder + slice scores) replay
        from CUDA graphs (`GraphedCall`), recorded here for one volume and every question-length bucket
        (no compiler involved; not yet timed on a GPU) and on first use for each further number of
        questions per call; and (2) decode
        with a static KV cache, which transformers compiles (`torch.compile`, CUDA graphs). Each new
        number of questions per call compiles the decode once (25-70 s for the paper preset on an H200),
        then each token is about 7x faster (docs/performance.md): worth it for a server or a long batch
        job, not for one question. On CPU nothing is compiled or recorded: the same code runs eagerly
        (with a static KV cache), and gives the same answers as ``compile=False``.

        Questions are always padded to a few fixed lengths for TG-IS (`med2e3.graphs.question_bucket`;
        the padding is masked, so the pooled question does not change).

        ``max_volume_bytes`` (default `MAX_VOLUME_BYTES`) and ``bad_slices`` are passed to
        `load_volume`. A volume whose intensities plainly are not CT numbers while ``window`` is a CT
        window gets one `VolumeWarning` (the first time only)."""
        self.model = model.eval()
        self.processor = processor
        self.window = _override("window", check_window(window) if window else None, processor.window)
        self.orientation = _override(
            "orientation", check_orientation(orientation) if orientation else None, processor.orientation
        )
        self.compile = compile
        self.max_volume_bytes = MAX_VOLUME_BYTES if max_volume_bytes is None else max_volume_bytes
        self.bad_slices = bad_slices
        self.current: LoadedVolume | None = None
        self._warned_window = False
        graphs = compile and self.device.type == "cuda"
        self._encoder = GraphedCall(self._encoders, "encode_volume") if graphs else self._encoders
        self._visual = GraphedCall(self._visual_tokens, "visual_tokens") if graphs else self._visual_tokens
        if graphs:
            self.warm()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> Med2E3Predictor:
        """Load a model folder; ``device`` defaults to CUDA when available, ``dtype`` to bf16 there, fp32 on CPU."""
        path = check_model_folder(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        with _quiet_loading():
            model = Med2E3ForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
            processor = Med2E3Processor.from_pretrained(path)
        processor.check_config(model.config)
        return cls(model, processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- the model's parts, as (graphed) functions of tensors --------------------------------------
    def _encoders(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(tokens3d[, slice_tokens]) of checked pixel values: `encode_volume` without its check."""
        return self.model.encode_volume(pixel_values, check=False).to_tuple()

    def _visual_tokens(
        self,
        tokens3d: torch.Tensor,
        slice_tokens: torch.Tensor | None,
        question_input_ids: torch.Tensor | None,
        question_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoding = VolumeEncoding(tokens3d=tokens3d, slice_tokens=slice_tokens)
        return self.model.visual_tokens(encoding, question_input_ids, question_attention_mask)

    @property
    def question_limit(self) -> int:
        """The longest TG-IS question in tokens (the processor's limit, within the encoder's positions)."""
        limit = self.processor.question_max_length
        if self.model.config.slice_aggregation == "tgis":
            limit = min(limit, self.model.config.question_encoder_config.max_position_embeddings)
        return limit

    def visual_tokens(
        self,
        encoding: VolumeEncoding,
        question_input_ids: torch.Tensor | None,
        question_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`Med2E3ForConditionalGeneration.visual_tokens` with the questions padded to their length bucket
        (and replayed from a CUDA graph with ``compile=True`` on CUDA)."""
        if question_input_ids is not None:
            question_input_ids, question_attention_mask = pad_questions(
                question_input_ids,
                question_attention_mask,
                self.question_limit,
                self.processor.question_tokenizer.pad_token_id,
            )
        return self._visual(
            encoding.tokens3d, encoding.slice_tokens, question_input_ids, question_attention_mask
        )

    @torch.no_grad()
    def warm(self) -> None:
        """Run (and with ``compile=True`` on CUDA, record) the encoders on one volume and TG-IS on one
        question of each length bucket, so that the first real volume and question meet ready graphs."""
        config = self.model.config
        volume = torch.zeros(1, *config.volume_shape, device=self.device, dtype=self.model.dtype)
        encoding = VolumeEncoding(*self._encoder(volume))
        if config.slice_aggregation != "tgis":
            self.visual_tokens(encoding, None, None)
            return
        for length in question_buckets(self.question_limit):
            ids = torch.zeros(1, length, dtype=torch.long, device=self.device)
            self.visual_tokens(encoding, ids, torch.ones_like(ids))

    # ---- volumes ----------------------------------------------------------------------------------
    def read(
        self, volume: str | Path | np.ndarray | torch.Tensor | Volume, orientation: Orientation | None = None
    ) -> Volume:
        """A path (read with `load_volume`, in ``orientation``, default the predictor's), an array or a
        `Volume`, checked to be big enough to be a scan."""
        if isinstance(volume, (str, Path)):
            orientation = check_orientation(orientation) if orientation else self.orientation
            volume = load_volume(volume, orientation, self.max_volume_bytes, self.bad_slices)
        elif not isinstance(volume, Volume):
            volume = from_array(volume)
        return check_scan_size(volume)

    @torch.no_grad()
    def load(
        self, volume: str | Path | np.ndarray | torch.Tensor | Volume, orientation: Orientation | None = None
    ) -> LoadedVolume:
        """Read (a file in ``orientation``, default the predictor's), preprocess and encode a volume (once);
        later questions reuse the encoding."""
        return self._encode(*self._prepare(volume, orientation))

    def _prepare(
        self, volume: Any, orientation: Orientation | None = None
    ) -> tuple[Volume, torch.Tensor, list[tuple[int, int]]]:
        """The CPU part of `load`: read and preprocess (batch mode runs it ahead, in a worker thread)."""
        vol = self.read(volume, orientation)
        self._warn_window(vol)
        size = tuple(self.model.config.vision3d_config.image_size)
        pixel_values = prepare_volume(vol, size, window=self.window)[None]
        return vol, pixel_values, source_slice_ranges(vol, self.model.config.num_slices, window=self.window)

    def _warn_window(self, volume: Volume) -> None:
        """Warn (once) when the CT window does not suit the volume's intensities (e.g. an MRI)."""
        problem = None if self._warned_window else ct_window_problem(volume, self.window)
        if problem is not None:
            self._warned_window = True
            warnings.warn(problem, VolumeWarning, stacklevel=3)

    @torch.no_grad()
    def _encode(self, vol: Volume, pixel_values: torch.Tensor, ranges: list[tuple[int, int]]) -> LoadedVolume:
        pixel_values = pixel_values.to(self.device)
        volume = pixel_values.to(self.model.dtype)
        self.model.check_pixel_values(volume)
        encoding = VolumeEncoding(*self._encoder(volume))
        self.current = LoadedVolume(vol, pixel_values, encoding, ranges)
        return self.current

    def _loaded(self) -> LoadedVolume:
        if self.current is None:
            raise InputError("no volume loaded: call load(path) first")
        return self.current

    # ---- questions --------------------------------------------------------------------------------
    def _inputs(
        self, questions: Sequence[str], prompts: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        for i, q in enumerate(questions):
            self.check_question(q, None if prompts is None else prompts[i])
        batch = self.processor(list(prompts or questions), questions=list(questions), padding_side="left")
        return {k: v.to(self.device) for k, v in batch.items()}

    def check_question(self, question: str, prompt: str | None = None) -> None:
        """Raise InputError unless ``question`` (shown to the LLM as ``prompt``, if given) can be asked.

        It must not be empty, be at most `MAX_QUESTION_CHARS` long, and its prompt must fit the LLM's
        ``max_length``. A question longer than the TG-IS encoder reads is fine: it is truncated there,
        and the answer's ``notes`` say so.
        """
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise InputError(
                f"the question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}"
            )
        length, limit = self.processor.prompt_length(prompt or question), self.processor.max_length
        if length > limit:
            raise InputError(
                f"the question is too long for the language model: its prompt is {length} tokens, the limit "
                f"is {limit}"
            )

    def _notes(self, question: str) -> list[str]:
        """What an answer's reader should know about how ``question`` was read."""
        length, limit = self.processor.question_length(question), self.processor.question_max_length
        if length is None or length <= limit:
            return []
        return [
            f"TG-IS read only the first {limit} of the question's {length} tokens (its question encoder's "
            "limit); the language model read the whole question"
        ]

    def _generation_kwargs(
        self, prompt_tokens: int, max_new_tokens: int, do_sample: bool, **sampling: Any
    ) -> dict[str, Any]:
        tok = self.processor.tokenizer
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "return_dict_in_generate": True,
        }
        if self.compile:  # cache lengths in steps of STATIC_CACHE_STEP, so most calls reuse one graph
            kwargs["cache_implementation"] = "static"
            kwargs["max_cache_len"] = static_cache_length(prompt_tokens + max_new_tokens)
        if do_sample:
            kwargs.update(sampling)
        return kwargs

    @torch.no_grad()
    def ask_batch(
        self, questions: Sequence[Question], do_sample: bool = False, **sampling: Any
    ) -> list[Answer]:
        """Answer questions about any loaded volumes (the same or different ones) in one batched generation.

        Each question has its own volume, answer length and optional ``on_text`` callback, which gets the
        answer's text piece by piece as it is generated (the pieces add up to the answer). Raises
        InputError for the first question that cannot be asked: check each with `check_question` first
        to keep a bad one out of a batch.
        """
        inputs = self._inputs([q.text for q in questions], [q.prompt or q.text for q in questions])
        prompt_tokens = inputs["input_ids"].shape[1]
        limits = [q.max_new_tokens for q in questions]
        callbacks = [q.on_text for q in questions]
        image_embeds, slice_scores = self.visual_tokens(
            VolumeEncoding.cat([q.volume.encoding for q in questions]),
            inputs.pop("question_input_ids", None),
            inputs.pop("question_attention_mask", None),
        )
        out = self.model.generate(
            **inputs,
            image_embeds=image_embeds,
            slice_scores=slice_scores,
            stopping_criteria=StoppingCriteriaList([_AnswerLengths(prompt_tokens, limits, self.device)]),
            streamer=_RowStreamer(self.processor.tokenizer, callbacks) if any(callbacks) else None,
            **self._generation_kwargs(prompt_tokens, max(limits), do_sample, **sampling),
        )
        new_tokens = out.sequences[:, prompt_tokens:]  # B x max(limits)
        scores = None if out.slice_scores is None else out.slice_scores.float().cpu().tolist()
        return [
            Answer(
                q.text,
                self.processor.decode(new_tokens[i, : q.max_new_tokens]),
                None if scores is None else scores[i],
                q.volume.slice_ranges,
                self._notes(q.text),
            )
            for i, q in enumerate(questions)
        ]

    def ask_many(
        self,
        questions: Sequence[str],
        prompts: Sequence[str] | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        **sampling: Any,
    ) -> list[Answer]:
        """Answer several questions about the loaded volume in one batched generation (`ask_batch`).

        ``prompts`` are the texts shown to the LLM when they differ from the bare questions that
        TG-IS reads (e.g. a closed question followed by its choices).
        """
        loaded = self._loaded()
        batch = [
            Question(loaded, q, None if prompts is None else prompts[i], max_new_tokens)
            for i, q in enumerate(questions)
        ]
        return self.ask_batch(batch, do_sample, **sampling)

    def ask(self, question: str, prompt: str | None = None, **generation: Any) -> Answer:
        """Answer one question about the loaded volume (greedy unless ``do_sample=True``)."""
        return self.ask_many([question], None if prompt is None else [prompt], **generation)[0]

    def report(self, **generation: Any) -> Answer:
        """Write a findings report for the loaded volume."""
        generation.setdefault("max_new_tokens", 256)
        return self.ask(REPORT_INSTRUCTIONS[0], **generation)

    def stream(self, question: str, max_new_tokens: int = 64, timeout: float = 120.0) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated (greedy); the pieces add up to `ask`'s text.

        An error inside generation is raised here, not left hanging; ``timeout`` bounds the wait for
        each piece.
        """
        yield from self.stream_answer(question, max_new_tokens, timeout)

    def stream_answer(
        self, question: str, max_new_tokens: int = 64, timeout: float = 120.0
    ) -> Generator[str, None, Answer]:
        """`stream`, whose generator then returns the whole `Answer` (as `ask` gives it) when exhausted."""
        pieces: queue.Queue[str | None] = queue.Queue()
        asked = Question(self._loaded(), question, max_new_tokens=max_new_tokens, on_text=pieces.put)
        answers: list[Answer] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                answers.extend(self.ask_batch([asked]))
            except BaseException as err:  # handed to the consumer below
                failure.append(err)
            finally:
                pieces.put(None)

        thread = Thread(target=run, daemon=True)
        thread.start()
        while (piece := pieces.get(timeout=timeout)) is not None:
            yield piece
        thread.join()
        if failure:
            raise failure[0]
        return answers[0]

    @torch.no_grad()
    def answer_loss(
        self, questions: Sequence[str], answers: Sequence[str], prompts: Sequence[str] | None = None
    ) -> list[float]:
        """Per question: mean negative log-likelihood of the tokens of its reference ``answers`` (the
        training loss of that one example) given the loaded volume."""
        loaded = self._loaded()
        for i, q in enumerate(questions):  # the same checks as for asking
            self.check_question(q, None if prompts is None else prompts[i])
        batch = self.processor(
            list(prompts or questions), questions=list(questions), answers=list(answers), padding_side="right"
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.pop("labels")[:, 1:]
        logits = self.model(**batch, volume_encoding=loaded.encoding.expand(len(questions))).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        counts = (labels != -100).sum(dim=1).clamp(min=1)
        return (nll.sum(dim=1) / counts).cpu().tolist()

    def slice_scores(self, question: str) -> list[float] | None:
        """TG-IS scores of ``question`` on the loaded volume, without generating an answer."""
        loaded = self._loaded()
        inputs = self._inputs([question])
        with torch.no_grad():
            _, scores = self.visual_tokens(
                loaded.encoding, inputs.get("question_input_ids"), inputs.get("question_attention_mask")
            )
        return None if scores is None else scores[0].float().cpu().tolist()

    # ---- batch mode -------------------------------------------------------------------------------
    def run_batch(
        self,
        rows: Sequence[dict[str, str]],
        out_path: str | Path,
        max_new_tokens: int = 64,
        progress: bool = True,
        chunk_size: int = 16,
        processes: PartialState | None = None,
    ) -> BatchResult:
        """Answer (volume, question) rows into a JSONL, one line per row, resuming an interrupted run.

        Rows need ``id``, ``volume`` and ``question`` (optional: ``prompt``, and ``orientation`` to read that
        row's volume file in, default the predictor's; `read_batch_input` gives such rows); rows are grouped
        by volume so each volume is encoded once, its questions are answered
        ``chunk_size`` at a time in one batched generation, and the next volume is read and preprocessed
        while the current one is answered. A row whose volume or question is unusable gets a line with its
        ``error`` instead of an answer, and the run goes on. Answered lines already in ``out_path`` are kept
        and their ids skipped; failed ones are tried again.

        ``processes``: the processes of a ``torchrun`` / ``accelerate launch`` run sharing this batch
        (Accelerate's `PartialState`; every process calls this with the same rows). Each answers whole
        volumes, a share balanced by rows (`shard_by_volume`), into its own part file beside ``out_path``
        (`part_path`); at the end the main process merges the parts into ``out_path`` (`merge_parts`), and
        every process returns the totals. A process that finishes early waits for the others for up to the
        process group's timeout. Part files left by a run that died are merged first, so whatever it
        answered is kept, with any number of processes, and nothing is answered twice.
        """
        out_path = Path(out_path)
        rank, world = (processes.process_index, processes.num_processes) if processes else (0, 1)
        if rank == 0:
            merge_parts(out_path)
            completed_ids(out_path)  # tidies the file once, so that the other processes only read it
        _wait_for_everyone(processes)
        done = completed_ids(out_path)
        todo = [r for r in rows if r["id"] not in done]
        result = BatchResult(answered=0, failed=0, already_done=len(rows) - len(todo))
        target = out_path if world == 1 else part_path(out_path, rank, world)
        mine = shard_by_volume(todo, world)[rank]
        desc = "answering" if world == 1 else f"answering (process {rank} of {world})"
        with tqdm(total=len(mine), disable=not progress or rank != 0, desc=desc, unit="q") as bar:
            for records in self._answer_into(target, mine, max_new_tokens, chunk_size):
                result.count(records)
                bar.update(len(records))
        if world == 1:
            return result
        _wait_for_everyone(processes)
        if rank == 0:
            merge_parts(out_path)
        return BatchResult.total(gather_object([result]))  # also waits for the merge

    def _answer_into(
        self, out_path: Path, rows: list[dict[str, str]], max_new_tokens: int, chunk_size: int
    ) -> Iterator[list[dict[str, Any]]]:
        """Answer ``rows`` volume by volume, appending each chunk's lines to ``out_path``; yield each chunk."""
        by_volume: dict[tuple[str, str | None], list[dict[str, str]]] = {}
        for row in rows:
            by_volume.setdefault((row["volume"], row.get("orientation")), []).append(row)
        volumes = list(by_volume)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("a", encoding="utf-8") as out, ThreadPoolExecutor(max_workers=1) as reader:
            ahead = reader.submit(self._prepare, *volumes[0]) if volumes else None
            for i, (volume, orientation) in enumerate(volumes):
                pending = ahead
                ahead = reader.submit(self._prepare, *volumes[i + 1]) if i + 1 < len(volumes) else None
                group = by_volume[volume, orientation]
                try:
                    self._encode(*pending.result())
                except Med2E3Error as err:
                    chunks = [[_failure(row, volume, err) for row in group]]
                else:
                    chunks = (
                        self._answer_rows(group[start : start + chunk_size], volume, max_new_tokens)
                        for start in range(0, len(group), chunk_size)
                    )
                for records in chunks:
                    _append_lines(out, records)
                    yield records

    def _answer_rows(
        self, rows: list[dict[str, str]], volume: str, max_new_tokens: int
    ) -> list[dict[str, Any]]:
        """Output records of ``rows`` about the loaded volume; a question that fails is recorded with its error."""
        try:
            answers = self.ask_many(
                [r["question"] for r in rows],
                [r.get("prompt") or r["question"] for r in rows],
                max_new_tokens=max_new_tokens,
            )
        except Med2E3Error as err:
            if len(rows) == 1:
                return [_failure(rows[0], volume, err)]
            return [record for row in rows for record in self._answer_rows([row], volume, max_new_tokens)]
        return [{"id": r["id"], "volume": volume, **a.to_dict()} for r, a in zip(rows, answers, strict=True)]


@dataclass
class BatchResult:
    """What one `Med2E3Predictor.run_batch` call did, in rows."""

    answered: int  # answered now
    failed: int  # recorded now with an error instead of an answer
    already_done: int  # answered by an earlier run

    def count(self, records: Sequence[dict[str, Any]]) -> None:
        failed = sum("error" in r for r in records)
        self.failed += failed
        self.answered += len(records) - failed

    @classmethod
    def total(cls, shares: Sequence[BatchResult]) -> BatchResult:
        """The result of a multi-process run from its processes' results (each saw the same earlier rows)."""
        return cls(sum(r.answered for r in shares), sum(r.failed for r in shares), shares[0].already_done)


def _wait_for_everyone(processes: PartialState | None) -> None:
    if processes is not None:
        processes.wait_for_everyone()


def _failure(row: dict[str, str], volume: str, err: Exception) -> dict[str, Any]:
    return {"id": row["id"], "volume": volume, "question": row["question"], "error": str(err)}


def _append_lines(out: Any, records: Sequence[dict[str, Any]]) -> None:
    """Append one JSON line per record and flush them to disk (a crash loses at most a torn last line)."""
    out.write("".join(json.dumps(r) + "\n" for r in records))
    out.flush()
    os.fsync(out.fileno())


def shard_by_volume(rows: Sequence[dict[str, str]], n: int) -> list[list[dict[str, str]]]:
    """Split ``rows`` into ``n`` shares of whole volumes, balanced by row count, the same in every process.

    Volumes with more rows are placed first, each in the share with the fewest rows so far (the lowest
    index on a tie); within a share rows keep their input order.
    """
    by_volume: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_volume.setdefault(row["volume"], []).append(i)
    shares: list[list[int]] = [[] for _ in range(n)]
    for indices in sorted(by_volume.values(), key=len, reverse=True):  # stable: ties keep input order
        min(shares, key=len).extend(indices)
    return [[rows[i] for i in sorted(share)] for share in shares]


def part_path(out_path: Path, rank: int, world: int) -> Path:
    """The file process ``rank`` of ``world`` appends its answers to, beside the output."""
    return out_path.with_name(f"{out_path.name}.part-{rank}-of-{world}")


def _part_files(out_path: Path) -> list[Path]:
    return sorted(out_path.parent.glob(glob.escape(out_path.name) + ".part-*-of-*"))


def merge_parts(out_path: Path) -> None:
    """Move the lines of the part files of a multi-process run into ``out_path``, each id once.

    An answered line wins over an error line for the same id; among lines of one kind the last wins
    (``out_path`` first, then the parts), at the place its id first appeared. A torn last line of a part
    (its process died mid-write) is dropped: that row is answered again. ``out_path`` is replaced in one
    step and only then are the parts removed, so a crash at any point loses no line, and merging again
    gives the same file.
    """
    parts = _part_files(out_path)
    if not parts:
        return
    lines: dict[str, tuple[bytes, bool]] = {}  # id -> (line, answered)
    for path in [out_path, *parts]:
        for raw, row in _answer_lines(path):
            answered = "error" not in row
            if answered or not lines.get(row["id"], (b"", False))[1]:
                lines[row["id"]] = (raw, answered)
    write_atomic(out_path, b"".join(raw for raw, _ in lines.values()))
    for path in parts:
        path.unlink()


def completed_ids(path: Path) -> set[str]:
    """Ids already answered in a batch output.

    Only what an interrupted write leaves, a last line with no newline that does not parse, is cut off;
    any other line that is not a JSON object with a string ``id`` raises DatasetError naming the file
    and line, and the file is left as it is. The lines of rows that failed (they have an ``error``) are
    removed, so that those rows are tried again. A last line without its newline gets one, so appends
    stay on lines of their own. The file is rewritten atomically when anything changes.
    """
    if not path.is_file():
        return set()
    kept = [(raw, row) for raw, row in _answer_lines(path) if "error" not in row]
    data = b"".join(raw for raw, _ in kept)
    if data != path.read_bytes():
        write_atomic(path, data)
    return {row["id"] for _, row in kept}


def _answer_lines(path: Path) -> list[tuple[bytes, dict[str, Any]]]:
    """The lines of a batch output (each ending with a newline) with their rows; none when there is no file.

    A torn last line (no newline, not JSON) is left out; any other line that is not an answer line, except
    a blank one, raises DatasetError naming the file and line.
    """
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines(keepends=True)
    parsed: list[tuple[bytes, dict[str, Any]]] = []
    for number, raw in enumerate(lines, start=1):
        row = _answer_line(raw)
        if row is None and number == len(lines) and not raw.endswith(b"\n"):  # torn by a crash mid-write
            break
        if row is None and raw.strip():
            raise DatasetError(
                path, "not an answer line (a JSON object with a string 'id'); fix or remove it", row=number
            )
        if row is not None:
            parsed.append((raw if raw.endswith(b"\n") else raw + b"\n", row))
    return parsed


def _answer_line(raw: bytes) -> dict[str, Any] | None:
    """One output line as a dict, None when it is not a JSON object with a string ``id``."""
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("id"), str) else None


def content_id(volume: str, question: str) -> str:
    """The id of a batch row that has none: from its volume (as written) and question, not its position."""
    return hashlib.sha256(f"{volume}\n{question}".encode()).hexdigest()[:16]


def _read_rows(path: Path) -> list[Any]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        byte = err.object[err.start]
        raise DatasetError(path, f"not UTF-8 text (byte 0x{byte:02x} at offset {err.start})") from None
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DatasetError(path, f"not valid JSON ({err.msg})", row=n) from None
    return rows


def read_batch_input(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV (columns volume, question[, id, prompt, orientation]) or JSONL (same keys); volumes relative
    to the file.

    A row without an id gets `content_id` of its volume and question, so that resuming does not depend
    on the order of the rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "no such file")
    raw_rows = _read_rows(path)
    if not raw_rows:
        raise DatasetError(path, "no rows (expected columns volume, question[, id, prompt, orientation])")
    rows: list[dict[str, str]] = []
    first_row: dict[str, int] = {}
    for n, raw in enumerate(raw_rows, start=1):
        if not isinstance(raw, dict) or not raw.get("volume") or not raw.get("question"):
            raise DatasetError(path, "each row needs 'volume' and 'question'", row=n)
        row_id = str(raw.get("id") or content_id(raw["volume"], raw["question"]))
        if row_id in first_row:
            reason = (
                f"id {row_id!r} is also the id of row {first_row[row_id]}"
                if raw.get("id")
                else f"same volume and question as row {first_row[row_id]}; add an id column to tell them apart"
            )
            raise DatasetError(path, reason, row=n)
        first_row[row_id] = n
        volume = Path(raw["volume"])
        volume = volume if volume.is_absolute() else path.parent / volume
        rows.append({**raw, "volume": str(volume), "id": row_id})
    return rows
