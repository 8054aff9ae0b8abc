"""How far intensity alone answers the Abnormality question at the model's input resolution, given the
organ's mask (oracle localisation) or only the organ's slices.

The synthetic benchmark's Abnormality question names a host organ (`LESION_HOSTS`) and asks what lesion
it holds: cyst, solid mass, calcification or none. Here every (volume, host organ present in it) pair is
one example, labelled with the organ's lesion type or "none" (so the class balance is that of all host
organs, not that of the questions asked). Its features are statistics of the windowed intensities the
setting gives, as HU deviations from their median, and the organ's name:

- organ mask: the organ's voxels;
- organ mask eroded 1 voxel in-plane: the same without the organ's rim (partial volume with neighbours);
- organ's slices only: every voxel of the depth slices that hold the organ (what slice selection can
  point at, without a mask).

The image is the volume as the model sees it (`prepare_volume`: acquisition orientation, abdomen window,
foreground crop, trilinear resize to the preset's image size); the label maps are cropped with the same
`foreground_box` and resized nearest, so they stay aligned. ``--native`` adds the three settings on the
cropped volume at its stored resolution. A multinomial logistic regression (torch L-BFGS, L2) is scored
by 4-fold cross-validation grouped by volume, next to the majority rate (each test fold answered with
its training folds' most common label). Prints a markdown table. Run from the repository root::

    python -m benchmarks.lesion_ceiling --volumes 400 --seed 5000
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import command
from med2e3.config import PRESETS, Med2E3Config
from med2e3.data.io import WINDOWS, Volume, apply_window, from_array
from med2e3.data.synth import (
    GENERATOR_VERSION,
    LESION_HOSTS,
    LESION_TYPES,
    STRUCTURE_ID,
    SynthConfig,
    case_rng,
    synthesize,
)
from med2e3.data.transforms import foreground_box, prepare_volume

WINDOW = "abdomen"
HU_PER_UNIT = WINDOWS[WINDOW][1]  # the window's width: one unit of the [0, 1] image in HU
CLASSES: tuple[str, ...] = ("none", *LESION_TYPES)
SETTINGS: tuple[str, ...] = ("organ mask", "organ mask eroded 1 voxel in-plane", "organ's slices only")
FOLDS = 4
MIN_VOXELS = 5  # an organ with fewer voxels in the model's input is left out
QUANTILES = (0.0, 0.5, 1.0, 2.0, 5.0, 50.0, 95.0, 98.0, 99.0, 99.5, 100.0)
BELOW_HU = (20.0, 40.0, 60.0, 80.0, 120.0)  # cysts: 0-15 HU, below every host's tissue
ABOVE_HU = (20.0, 30.0, 45.0, 60.0, 100.0, 200.0)  # masses: 30-60 HU above; calcifications: the window top
SPREADS = (3.0, 4.0, 5.0)  # tails beyond these multiples of the robust spread


@dataclass(frozen=True)
class View:
    """A windowed image in [0, 1] and its organ and lesion label maps, aligned voxel for voxel (D, H, W)."""

    image: np.ndarray
    organs: np.ndarray
    lesions: np.ndarray


@dataclass
class Examples:
    """Per setting: the volume index, class index and feature vector of every example."""

    volumes: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)

    def add(self, volume: int, label: int, features: np.ndarray) -> None:
        self.volumes.append(volume)
        self.labels.append(label)
        self.features.append(features)


@dataclass(frozen=True)
class Score:
    """Cross-validated accuracy, majority rate and per-class recall (NaN for a class with no example)."""

    n: int
    accuracy: float
    majority: float
    recall: tuple[float, ...]


def read_case(
    seed: int, index: int, cfg: SynthConfig
) -> tuple[Volume, np.ndarray, np.ndarray, dict[str, Any]]:
    """Volume ``index`` of the benchmark made with ``seed``, with its organ and lesion label maps and labels.

    The generator stores (W, H, D) arrays whose order is already the acquisition orientation, so the
    transposed array is what ``load_volume(path, orientation="acquisition")`` reads from the written file
    (tests/test_benchmarks.py checks it).
    """
    case = synthesize(case_rng(seed, index), cfg)
    volume = from_array(case.volume.transpose(2, 1, 0), intensity="hu", affine=case.affine[:, [2, 1, 0, 3]])
    return volume, case.organ_map.transpose(2, 1, 0), case.lesion_map.transpose(2, 1, 0), case.labels


def resize_labels(labels: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """A label map resized to ``size`` by nearest neighbour, sampling where the trilinear resize samples."""
    grid = torch.as_tensor(labels.astype(np.float32))[None, None]
    return F.interpolate(grid, size=size, mode="nearest-exact")[0, 0].numpy().astype(labels.dtype)


def model_view(
    volume: Volume, organs: np.ndarray, lesions: np.ndarray, size: tuple[int, int, int] | None
) -> View:
    """The model's input (`prepare_volume` at ``size``) with the label maps cropped and resized alike;
    ``size=None``: the windowed, cropped volume at its stored resolution."""
    windowed = apply_window(volume.array, WINDOW)
    box = foreground_box(windowed)
    if size is None:
        return View(windowed[box], organs[box], lesions[box])
    image = prepare_volume(volume, size, window=WINDOW)[0].numpy()
    return View(image, resize_labels(organs[box], size), resize_labels(lesions[box], size))


def erode_in_plane(mask: np.ndarray) -> np.ndarray:
    """The voxels of a (D, H, W) mask whose four in-plane neighbours are in it (the image edge counts as in)."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="edge")
    height, width = mask.shape[1:]
    core = mask.copy()
    for dh, dw in ((0, 1), (2, 1), (1, 0), (1, 2)):
        core &= padded[:, dh : dh + height, dw : dw + width]
    return core


def features(values: np.ndarray, organ: str) -> np.ndarray:
    """Statistics of one example's windowed values as HU deviations from their median: quantiles, robust
    spread, log count, tail fractions and log tail counts (fixed HU and spread multiples), extreme
    quantiles over the spread; then the median itself and the organ as one-hot."""
    median = float(np.median(values))
    deviation = (values - median) * HU_PER_UNIT
    spread = 1.4826 * float(np.median(np.abs(deviation))) + 1.0  # MAD as a std, +1 HU: never 0
    quantiles = np.percentile(deviation, QUANTILES)
    low = [*BELOW_HU, *(k * spread for k in SPREADS)]
    high = [*ABOVE_HU, *(k * spread for k in SPREADS)]
    tails = np.array([(deviation < -t).sum() for t in low] + [(deviation > t).sum() for t in high], float)
    return np.concatenate(
        [
            quantiles,
            [spread, math.log(values.size), median],
            tails / values.size,
            np.log1p(tails),
            [quantiles[1] / spread, quantiles[-2] / spread],
            [float(organ == host) for host in LESION_HOSTS],
        ]
    )


def setting_values(view: View, organ: str) -> dict[str, np.ndarray]:
    """The voxel values each setting gives for one organ (the eroded mask falls back to the whole mask
    when fewer than `MIN_VOXELS` remain)."""
    mask = view.organs == STRUCTURE_ID[organ]
    core = erode_in_plane(mask)
    slices = mask.any(axis=(1, 2))
    return {
        SETTINGS[0]: view.image[mask],
        SETTINGS[1]: view.image[core if core.sum() >= MIN_VOXELS else mask],
        SETTINGS[2]: view.image[slices].ravel(),
    }


def hosts_in(view: View) -> list[str]:
    """The host organs of a volume with at least `MIN_VOXELS` voxels in ``view``."""
    return [organ for organ in LESION_HOSTS if (view.organs == STRUCTURE_ID[organ]).sum() >= MIN_VOXELS]


def collect(
    volumes: int, seed: int, size: tuple[int, int, int], native: bool, progress: bool = True
) -> dict[str, Examples]:
    """Examples per row of the table ("<resolution>: <setting>"), over the same (volume, organ) pairs:
    the host organs present in the model's input."""
    resolutions: dict[str, tuple[int, int, int] | None] = {"model": size}
    if native:
        resolutions["native"] = None
    rows = {f"{res}: {setting}": Examples() for res in resolutions for setting in SETTINGS}
    cfg = SynthConfig()
    for index in tqdm(range(volumes), desc="volumes", unit="vol", disable=not progress):
        volume, organs, lesions, labels = read_case(seed, index, cfg)
        views = {res: model_view(volume, organs, lesions, s) for res, s in resolutions.items()}
        kinds = {lesion["organ"]: lesion["type"] for lesion in labels["lesions"]}
        for organ in hosts_in(views["model"]):
            label = CLASSES.index(kinds.get(organ, "none"))
            for res, view in views.items():
                for setting, values in setting_values(view, organ).items():
                    rows[f"{res}: {setting}"].add(index, label, features(values, organ))
    return rows


def fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Class predictions for ``test_x`` of a multinomial logistic regression on standardised features
    (float64, L-BFGS with a strong Wolfe line search, L2 penalty on the weights)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.as_tensor((train_x - mean) / std, dtype=torch.float64)
    y = torch.as_tensor(train_y, dtype=torch.long)
    weight = torch.zeros(x.shape[1], len(CLASSES), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(CLASSES), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        test = torch.as_tensor((test_x - mean) / std, dtype=torch.float64)
        return (test @ weight + bias).argmax(1).numpy()


def cross_validate(examples: Examples) -> Score:
    """`FOLDS`-fold cross-validation grouped by volume (fold = volume index mod `FOLDS`)."""
    x, y = np.stack(examples.features), np.asarray(examples.labels)
    fold = np.asarray(examples.volumes) % FOLDS
    predicted = np.empty_like(y)
    majority_hits = 0
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        predicted[test] = fit_predict(x[train], y[train], x[test])
        majority_hits += int((y[test] == np.bincount(y[train], minlength=len(CLASSES)).argmax()).sum())
    recall = tuple(
        float((predicted[y == c] == c).mean()) if (y == c).any() else math.nan for c in range(len(CLASSES))
    )
    return Score(len(y), float((predicted == y).mean()), majority_hits / len(y), recall)


def _percent(value: float) -> str:
    return "–" if math.isnan(value) else f"{value * 100:.1f}"


def table(scores: dict[str, Score]) -> str:
    """Markdown: one row per resolution and setting, percentages."""
    lines = [
        "| input: setting | pairs | accuracy, % | majority rate, % | "
        + " | ".join(f"recall {c}, %" for c in CLASSES)
        + " |",
        "|---|---|---|---|" + "---|" * len(CLASSES),
    ]
    for row, s in scores.items():
        cells = [row, str(s.n), _percent(s.accuracy), _percent(s.majority), *map(_percent, s.recall)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=5000, help="the synthetic benchmark's seed")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="gives the input size")
    parser.add_argument("--native", action="store_true", help="add the stored resolution's rows")
    args = parser.parse_args(argv)
    if args.volumes < 2 * FOLDS:
        parser.error(f"--volumes must be at least {2 * FOLDS}")
    torch.set_num_threads(1)  # small problems: threads only add overhead
    size = tuple(Med2E3Config.from_preset(args.preset).vision3d_config.image_size)
    rows = collect(args.volumes, args.seed, size, args.native)
    counts = Counter(CLASSES[label] for label in rows[f"model: {SETTINGS[0]}"].labels)
    print(
        f"`{command('benchmarks.lesion_ceiling', argv)}`: synthetic benchmark (generator version "
        f"{GENERATOR_VERSION}, seed {args.seed}), {args.volumes} volumes; model input "
        f"{' × '.join(map(str, size))} ({args.preset} preset), {WINDOW} window; (volume, host organ) "
        f"pairs: {', '.join(f'{c} {counts[c]}' for c in CLASSES)}; logistic regression, "
        f"{FOLDS}-fold cross-validation grouped by volume.\n"
    )
    print(table({row: cross_validate(examples) for row, examples in rows.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
