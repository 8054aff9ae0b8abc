"""Static shapes and CUDA graphs for the first token: question-length buckets and `GraphedCall`.

At batch 1 on a GPU the encoders and TG-IS are bound by the host (Python and kernel launches), not by the
GPU (docs/performance.md). A CUDA graph records every kernel of a call once and replays them with one
launch, which needs the same shapes on every call: the volume encoders have them (a fixed number of
slices of a fixed size), and the BERT question encoder gets them by padding each question to one of a
few lengths (`question_bucket`). Padding is masked out, so it does not change the pooled question.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

SMALLEST_QUESTION_BUCKET = 16  # questions are padded to 16, 32, 64, ... tokens, up to the limit

Tensors = tuple[torch.Tensor | None, ...]


def question_buckets(limit: int) -> tuple[int, ...]:
    """The lengths questions are padded to: powers of two from 16, then ``limit`` (the longest question)."""
    buckets = []
    length = SMALLEST_QUESTION_BUCKET
    while length < limit:
        buckets.append(length)
        length *= 2
    return (*buckets, limit)


def question_bucket(length: int, limit: int) -> int:
    """The smallest bucket of `question_buckets` that holds ``length`` tokens (``limit`` at most)."""
    return next((b for b in question_buckets(limit) if b >= length), limit)


def pad_questions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, limit: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad B x L question tokens (and their mask, with zeros) to `question_bucket` of L."""
    length = input_ids.shape[1]
    extra = question_bucket(length, limit) - length
    if extra <= 0:
        return input_ids, attention_mask
    return (
        torch.nn.functional.pad(input_ids, (0, extra), value=pad_token_id),
        torch.nn.functional.pad(attention_mask, (0, extra), value=0),
    )


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensors  # static input buffers: each call copies its arguments here
    outputs: Tensors  # static outputs, overwritten by every replay


class GraphedCall:
    """``fn(*tensors) -> tuple of tensors`` replayed from a CUDA graph, one graph per shape of the arguments.

    The first call with new shapes runs ``fn`` a few times on a side stream (warm-up), then records it.
    Every call copies its arguments into the graph's input buffers, replays, and returns copies of the
    outputs (a later replay overwrites the graph's own). ``fn`` must not synchronise with the host (no
    ``.item()``, no data-dependent shapes); if recording fails, the shapes are run without a graph from
    then on, with one warning, and the reason is kept in ``failures``. Arguments may be None (passed as
    None, part of the shape key). On a CPU tensor ``fn`` is called as it is.
    """

    def __init__(self, fn: Callable[..., Tensors], name: str, warmup: int = 2):
        self.fn = fn
        self.name = name
        self.warmup = warmup
        self.graphs: dict[tuple, _Graph | None] = {}  # None: recording failed, run eagerly
        self.failures: dict[str, str] = {}

    @staticmethod
    def key(args: Tensors) -> tuple:
        return tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args)

    def __call__(self, *args: torch.Tensor | None) -> Tensors:
        device = next((a.device for a in args if a is not None), None)
        if device is None or device.type != "cuda":
            return self.fn(*args)
        key = self.key(args)
        if key not in self.graphs:
            self.graphs[key] = self._record(key, args)
        entry = self.graphs[key]
        if entry is None:
            return self.fn(*args)
        for static, a in zip(entry.inputs, args, strict=True):
            if static is not None:
                static.copy_(a)
        entry.graph.replay()
        return tuple(None if o is None else o.clone() for o in entry.outputs)

    @torch.no_grad()
    def _record(self, key: tuple, args: Tensors) -> _Graph | None:
        inputs = tuple(None if a is None else a.clone() for a in args)
        try:
            side = torch.cuda.Stream(device=next(a.device for a in inputs if a is not None))
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.fn(*inputs)
        except Exception as err:  # noqa: BLE001 - the call still works, without a graph
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            self.failures[str(key)] = reason
            logger.warning(
                "%s: no CUDA graph for shapes %s, running without one (%s)", self.name, key, reason
            )
            torch.cuda.synchronize()
            return None
        return _Graph(graph, inputs, tuple(outputs))

    @property
    def recorded(self) -> int:
        """How many shapes replay from a graph."""
        return sum(g is not None for g in self.graphs.values())
