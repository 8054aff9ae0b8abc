"""What does a 2D encoder's output tell about the Abnormality answer, pooled over the asked organ's slices?

For each (volume, host organ present) pair of the synthetic benchmark (`dense_lesions.build`: the model's
input, 32 x 64 x 64), the encoder's tokens of every slice are pooled over the slices that hold the organ,
as an oracle TG-IS would (the mean, and for a readout that TG-IS cannot do, the per-feature max and min),
one vector per token position, plus the organ as a one-hot. A multinomial logistic regression
(`lesion_ceiling.fit_predict`, three L2 strengths) fitted on training volumes answers none / cyst / mass /
calcification on new ones; printed next to the organ alone and the majority answer. Run from the
repository root::

    python -m benchmarks.lesion_probe --encoder shipped
    python -m benchmarks.lesion_probe --encoder runs/dense-encoder.safetensors   # dense_lesions --save
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from benchmarks.dense_lesions import HOSTS, Targets, build, make_model
from benchmarks.lesion_ceiling import fit_predict


def encoder(
    name: str, shape: tuple[int, int, int, int] = (64, 16, 64, 2)
) -> tuple[nn.Module, nn.Module | None]:
    """``shipped`` (the shipped model's 2D encoder and connector), ``random`` (a fresh encoder) or a
    safetensors file of an encoder's weights (`dense_lesions --save`); ``shape``: slice size, patch, width
    and layers of the last two (the tiny preset's by default)."""
    torch.manual_seed(0)
    if name == "shipped":
        model = make_model("shipped", *shape)
        return model.encoder.eval(), model.connector.eval()
    fresh = make_model("fresh", *shape).encoder
    if name != "random":
        fresh.load_state_dict(load_file(name))
    return fresh.eval(), None


@torch.no_grad()
def pooled(data: Targets, enc: nn.Module, connector: nn.Module | None) -> tuple[np.ndarray, np.ndarray]:
    """(features, answers) of every (volume, host organ present) pair (see module doc)."""
    features, answers = [], []
    for start in range(0, len(data.images), 8):
        images = data.images[start : start + 8].float()
        v, s, r, _ = images.shape
        tokens = enc(pixel_values=images.reshape(v * s, 1, r, r).expand(-1, 3, -1, -1)).last_hidden_state
        if connector is not None:
            tokens = connector(tokens)
        tokens = tokens.reshape(v, s, tokens.shape[1], -1)
        labels = data.labels[start : start + 8].long()  # V x S x T x hosts
        for i in range(v):
            for k in range(len(HOSTS)):
                present = (labels[i, :, :, k] > 0).any(1)
                if not present.any():
                    continue
                held = tokens[i][present]  # slices with the organ x T x D
                organ = torch.zeros(len(HOSTS))
                organ[k] = 1
                parts = (held.mean(0), held.amax(0), held.amin(0))
                features.append(torch.cat([*(p.flatten() for p in parts), organ]).numpy())
                answers.append(int((labels[i, :, :, k].max() - 1).clamp(min=0)))
    return np.stack(features), np.asarray(answers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="shipped", help="shipped, random or a weights file")
    parser.add_argument("--train-volumes", type=int, default=600)
    parser.add_argument("--test-volumes", type=int, default=200)
    parser.add_argument("--train-seed", type=int, default=3000)
    parser.add_argument("--test-seed", type=int, default=3001)
    parser.add_argument("--size", type=int, default=64, help="slice size in pixels (as dense_lesions)")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.monotonic()
    enc, connector = encoder(args.encoder, (args.size, args.patch, args.width, args.layers))
    grid = (args.size, args.patch)
    train_x, train_y = pooled(build(args.train_seed, args.train_volumes, *grid, False), enc, connector)
    test_x, test_y = pooled(build(args.test_seed, args.test_volumes, *grid, False), enc, connector)
    record: dict = {"encoder": args.encoder, "pairs": [len(train_y), len(test_y)]}
    for l2 in (1e-3, 1e-2, 1e-1):
        predicted = fit_predict(train_x, train_y, test_x, l2=l2)
        record[f"accuracy (l2 {l2})"] = round(float((predicted == test_y).mean()), 3)
    organ = slice(-len(HOSTS), None)
    record["organ alone"] = round(
        float((fit_predict(train_x[:, organ], train_y, test_x[:, organ]) == test_y).mean()), 3
    )
    record["majority"] = round(float((test_y == np.bincount(train_y).argmax()).mean()), 3)
    record["seconds"] = round(time.monotonic() - start)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
