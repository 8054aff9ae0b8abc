"""Training data: examples from dataset files -> preprocessed volumes (cached on disk) -> padded batches."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from med2e3.data.datasets import DatasetSource, Example, OnError, read_dataset
from med2e3.data.io import load_volume
from med2e3.data.processor import Med2E3Processor
from med2e3.data.transforms import augment, build_augmentation, prepare_volume
from med2e3.errors import DatasetError
from med2e3.files import atomic_path


def load_examples(sources: Sequence[DatasetSource], on_error: OnError = "raise") -> list[Example]:
    """All examples of ``sources`` (read fully, so broken datasets fail before training starts)."""
    examples: list[Example] = []
    for source in sources:
        examples.extend(read_dataset(source, on_error))
    missing = [ex for ex in examples if ex.answer is None]
    if missing:
        raise DatasetError(missing[0].volume, f"example {missing[0].id!r} has no answer to train on")
    return examples


class VolumeCache:
    """Eval-preprocessed volumes stored as float16 tensors, keyed by file, geometry and window."""

    def __init__(self, directory: str | Path | None, size: tuple[int, int, int], window: str):
        self.directory = None if directory is None else Path(directory)
        self.size = size
        self.window = window
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _key(self, path: Path, orientation: str) -> str:
        stat = path.stat()
        ident = f"{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{orientation}|{self.size}|{self.window}"
        return hashlib.sha1(ident.encode()).hexdigest()

    def get(self, path: Path, orientation: str) -> torch.Tensor:
        """The volume at ``path`` as (1, D, H, W) float32 in [0, 1]."""
        if self.directory is None:
            return self._prepare(path, orientation)
        file = self.directory / f"{self._key(path, orientation)}.pt"
        if file.is_file():
            return torch.load(file, weights_only=True).float()
        tensor = self._prepare(path, orientation).half()
        with atomic_path(file) as tmp:  # a reader never sees half a file
            torch.save(tensor, tmp)
        return tensor.float()  # the same values a later, cached read gives

    def _prepare(self, path: Path, orientation: str) -> torch.Tensor:
        return prepare_volume(load_volume(path, orientation=orientation), self.size, window=self.window)


class VolumeTextDataset(Dataset):
    """Examples as (volume, prompt, question, answer); augmentation is seeded by (seed, epoch, index)."""

    def __init__(
        self,
        examples: Sequence[Example],
        cache: VolumeCache,
        augment: bool = False,
        seed: int = 0,
    ):
        self.examples = list(examples)
        self.cache = cache
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._augmentation = build_augmentation() if augment else None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples[index]
        volume = self.cache.get(ex.volume, ex.orientation)
        if self.augment:
            seed = (self.seed * 1_000_003 + self.epoch * 7_919 + index) % 2**31
            volume = augment(volume, seed, self._augmentation)
        return {
            "pixel_values": volume,
            "text": ex.prompt,
            "question": ex.question,
            "answer": ex.answer,
            "relevant_slices": ex.relevant_slices,
        }


class Collator:
    """Pads a list of items into one batch through the processor (the chat template's single source).

    With ``num_slices`` the batch also carries ``relevant_slices``, a B x S mask of each example's relevant
    model slices (all False where the example lists none), for the relevant-slice loss.
    """

    def __init__(self, processor: Med2E3Processor, num_slices: int | None = None):
        self.processor = processor
        self.num_slices = num_slices

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(
            self.processor(
                [it["text"] for it in items],
                questions=[it["question"] for it in items],
                answers=[it["answer"] for it in items],
                volumes=[it["pixel_values"] for it in items],
                padding_side="right",
            )
        )
        if self.num_slices is not None:
            mask = torch.zeros(len(items), self.num_slices, dtype=torch.bool)
            for row, item in enumerate(items):
                mask[row, list(item["relevant_slices"] or ())] = True
            batch["relevant_slices"] = mask
        return batch
