"""Shared fixtures: a small, learnable volume-text dataset generated on the fly (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SIDES = ("left", "right")


def make_dataset(root: Path, n: int = 8, seed: int = 0) -> Path:
    """Volumes with a bright block on one side; the caption names the side. Returns the JSONL path."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        side = SIDES[i % 2]
        vol = rng.uniform(0.05, 0.2, size=(1, 32, 64, 64)).astype(np.float32)
        w = slice(8, 24) if side == "right" else slice(40, 56)
        vol[0, 10:20, 20:40, w] = 0.9
        np.save(root / f"vol{i}.npy", vol)
        question = "Where is the bright lesion?"
        lines.append(
            {
                "id": f"ex{i}",
                "volume": f"vol{i}.npy",
                "task": "vqa_open",
                "question": question,
                "conversations": [
                    {"from": "human", "value": f"<image3d>\n{question}"},
                    {"from": "gpt", "value": f"The lesion is on the {side} side."},
                ],
            }
        )
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight model folder with its processor (answers are gibberish, but real)."""
    import torch

    from med2e3 import Med2E3Config, Med2E3ForConditionalGeneration, Med2E3Processor

    folder = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    config = Med2E3Config.from_preset("tiny")
    Med2E3ForConditionalGeneration(config).save_pretrained(folder)
    Med2E3Processor.for_config(config).save_pretrained(folder)
    return folder
