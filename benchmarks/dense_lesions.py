"""Can the 2D encoder find the lesions when it is told where every one is? Dense per-token targets.

Every slice of the model's input (`lesion_ceiling.model_view`: acquisition orientation, abdomen window,
foreground crop, resize) is cut into the 2D encoder's patches; each patch token gets, for each host organ of
`LESION_HOSTS`, one of five classes: the organ is absent from the patch, present without a lesion, or holds
a cyst / mass / calcification there (from the generator's label maps). A 2D encoder (SigLIP, as in the
model) with a linear head is trained on these targets by weighted cross-entropy (lesion classes weighted
up: they are a few in ten thousand) and scored after every epoch on new volumes and on 200 training volumes:

- token recall of each class (argmax);
- a volume-level readout: every (volume, host organ present) pair answered with the lesion class whose
  largest token probability passes a threshold, else "none", next to the majority answer.

``--init shipped`` starts from the shipped model's 2D encoder and connector (the head reads the tokens the
LLM receives); ``--init fresh`` from a random encoder of the given size. One JSON object per epoch is
printed. Run from the repository root::

    python -m benchmarks.dense_lesions --init fresh --epochs 35 --lesion-weight 150
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import SiglipVisionConfig, SiglipVisionModel

from benchmarks.lesion_ceiling import model_view, read_case
from med2e3.data.synth import LESION_HOSTS, LESION_TYPES, STRUCTURE_ID, SynthConfig
from med2e3.folders import BUNDLED_TINY_MODEL, named_folder

HOSTS: tuple[str, ...] = tuple(LESION_HOSTS)
CLASSES: tuple[str, ...] = ("absent", "organ", *LESION_TYPES)
N_SLICES = 32


@dataclass
class Targets:
    """Model-input volumes (V x S x R x R, float16) and their token classes (V x S x T x hosts, int8)."""

    images: torch.Tensor
    labels: torch.Tensor


def token_labels(organs: np.ndarray, lesions: np.ndarray, found: list[dict], patch: int) -> np.ndarray:
    """The class of every (slice, patch token, host organ) of one volume's label maps (S x R x R each)."""
    depth, size = organs.shape[0], organs.shape[1]
    grid = size // patch

    def tokens(a: np.ndarray) -> np.ndarray:  # S x R x R -> S x T x (patch * patch), row-major tokens
        return (
            a.reshape(depth, grid, patch, grid, patch)
            .transpose(0, 1, 3, 2, 4)
            .reshape(depth, grid * grid, -1)
        )

    organ_tokens, lesion_tokens = tokens(organs), tokens(lesions)
    out = np.zeros((depth, grid * grid, len(HOSTS)), np.int8)
    for k, host in enumerate(HOSTS):
        out[:, :, k] = (organ_tokens == STRUCTURE_ID[host]).any(-1)
    for index, lesion in enumerate(found, start=1):
        column = out[:, :, HOSTS.index(lesion["organ"])]
        column[(lesion_tokens == index).any(-1)] = CLASSES.index(lesion["type"])
    return out


def build(seed: int, volumes: int, size: int, patch: int, progress: bool = True) -> Targets:
    """Targets for volumes 0 .. ``volumes`` - 1 of the synthetic benchmark made with ``seed``."""
    cfg, images, labels = SynthConfig(), [], []
    for index in tqdm(range(volumes), desc=f"seed {seed}", unit="vol", disable=not progress):
        volume, organs, lesions, case = read_case(seed, index, cfg)
        view = model_view(volume, organs, lesions, (N_SLICES, size, size))
        images.append(torch.from_numpy(view.image.astype(np.float16)))
        labels.append(torch.from_numpy(token_labels(view.organs, view.lesions, case["lesions"], patch)))
    return Targets(torch.stack(images), torch.stack(labels))


class DenseModel(nn.Module):
    """A 2D encoder (and, from the shipped model, its connector) with a linear per-token head."""

    def __init__(self, encoder: nn.Module, connector: nn.Module | None, width: int):
        super().__init__()
        self.encoder, self.connector = encoder, connector
        self.head = nn.Linear(width, len(HOSTS) * len(CLASSES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """V x S x R x R volumes -> V x S x T x hosts x classes logits."""
        v, s, r, _ = images.shape
        slices = images.to(self.head.weight.device).float().reshape(v * s, 1, r, r).expand(-1, 3, -1, -1)
        tokens = self.encoder(pixel_values=slices).last_hidden_state
        if self.connector is not None:
            tokens = self.connector(tokens)
        return self.head(tokens).reshape(v, s, tokens.shape[1], len(HOSTS), len(CLASSES))


def make_model(init: str, size: int, patch: int, width: int, layers: int) -> DenseModel:
    """The shipped model's 2D encoder + connector (``init="shipped"``) or a fresh SigLIP of the given size."""
    if init == "shipped":
        from med2e3 import Med2E3ForConditionalGeneration

        shipped = Med2E3ForConditionalGeneration.from_pretrained(named_folder(BUNDLED_TINY_MODEL))
        config = shipped.config.vision2d_config
        if (config.image_size, config.patch_size) != (size, patch):
            raise SystemExit(
                f"the shipped encoder takes {config.image_size}-pixel slices in {config.patch_size}-pixel patches"
            )
        return DenseModel(shipped.vision2d, shipped.projector2d, shipped.config.text_config.hidden_size)
    config = SiglipVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=size,
        patch_size=patch,
        num_channels=3,
        vision_use_head=False,
    )
    return DenseModel(SiglipVisionModel(config), None, width)


@torch.no_grad()
def score(model: DenseModel, data: Targets, thresholds: tuple[float, ...], batch: int = 8) -> dict:
    """Token recall per class, volume-level accuracy per threshold and the majority rate (see module doc)."""
    model.eval()
    hits, counts = torch.zeros(len(CLASSES)), torch.zeros(len(CLASSES))
    correct, truths = Counter(), Counter()
    for start in range(0, len(data.images), batch):
        probs = model(data.images[start : start + batch]).softmax(-1).cpu()
        labels = data.labels[start : start + batch].long()
        predicted = probs.argmax(-1)
        for c in range(len(CLASSES)):
            mask = labels == c
            counts[c] += mask.sum()
            hits[c] += (predicted[mask] == c).sum()
        present = (labels > 0).flatten(1, 2).any(1)  # V x hosts
        truth = (labels.flatten(1, 2).amax(1) - 1).clamp(min=0)  # 0: none, 1-3: lesion type
        best = probs[..., 2:].flatten(1, 2).amax(1)  # V x hosts x lesion types
        for v, k in zip(*torch.nonzero(present, as_tuple=True), strict=True):
            truths[int(truth[v, k])] += 1
            for t in thresholds:
                answer = 1 + int(best[v, k].argmax()) if best[v, k].max() > t else 0
                correct[t] += answer == int(truth[v, k])
    model.train()
    pairs = sum(truths.values())
    return {
        "token_recall": {
            c: round(float(h / max(n, 1)), 3) for c, h, n in zip(CLASSES, hits, counts, strict=True)
        },
        "volume_accuracy": {str(t): round(correct[t] / pairs, 3) for t in thresholds},
        "majority": round(max(truths.values()) / pairs, 3),
        "pairs": pairs,
    }


def save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    """``state`` as a safetensors file at ``path``, replaced only once written."""
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, partial)
    os.replace(partial, path)


def train(model: DenseModel, train_set: Targets, test_set: Targets, args: argparse.Namespace) -> None:
    """Train epoch by epoch, printing one JSON line of scores after each."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    weight = torch.tensor([1.0, 1.0] + [args.lesion_weight] * len(LESION_TYPES), device=args.device)
    seen = Targets(train_set.images[:200], train_set.labels[:200])
    start = time.monotonic()
    for epoch in range(args.epochs):
        for index in torch.randperm(len(train_set.images)).split(args.batch_size):
            logits = model(train_set.images[index])
            loss = F.cross_entropy(
                logits.flatten(0, -2), train_set.labels[index].to(args.device).long().flatten(), weight=weight
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        record = {"epoch": epoch + 1, "seconds": round(time.monotonic() - start, 1)}
        record["test"] = score(model, test_set, tuple(args.thresholds))
        record["train_200"] = score(model, seen, tuple(args.thresholds))
        print(json.dumps(record), flush=True)
        if args.save:
            save_atomic(model.encoder.state_dict(), args.save)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", choices=("fresh", "shipped"), default="fresh")
    parser.add_argument("--train-volumes", type=int, default=1200)
    parser.add_argument("--test-volumes", type=int, default=200)
    parser.add_argument("--train-seed", type=int, default=3000)
    parser.add_argument("--test-seed", type=int, default=3001)
    parser.add_argument("--size", type=int, default=64, help="slice size in pixels (the tiny preset: 64)")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--width", type=int, default=64, help="fresh encoder's width (the tiny preset: 64)")
    parser.add_argument("--layers", type=int, default=2, help="fresh encoder's layers (the tiny preset: 2)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4, help="volumes per step (32 slices each)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lesion-weight", type=float, default=150.0)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    parser.add_argument("--seed", type=int, default=0, help="torch seed")
    parser.add_argument("--save", type=Path, help="write the 2D encoder's weights here after every epoch")
    parser.add_argument(
        "--device", default="cpu", help="where to train, e.g. cuda (the data stays on the CPU)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = make_model(args.init, args.size, args.patch, args.width, args.layers).to(args.device)
    train_set = build(args.train_seed, args.train_volumes, args.size, args.patch)
    test_set = build(args.test_seed, args.test_volumes, args.size, args.patch)
    print(json.dumps({"settings": vars(args)}, default=str), flush=True)
    train(model, train_set, test_set, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
