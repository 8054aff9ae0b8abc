"""Figures of where TG-IS looked: the slice-score curve over depth, the top-scoring slices, and the
curves of several questions on one volume."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from med2e3.files import atomic_path  # noqa: E402


def plot_slice_scores(
    volume: torch.Tensor | np.ndarray,
    scores: Sequence[float],
    path: str | Path,
    question: str | None = None,
    answer: str | None = None,
    slice_ranges: Sequence[tuple[int, int]] | None = None,
    top_k: int = 4,
) -> Path:
    """Write a PNG: TG-IS score per slice (with the uniform level) and the ``top_k`` slices as images.

    Args:
        volume: the model's input (1 x D x H x W or D x H x W, values in [0, 1]).
        scores: one TG-IS weight per model slice.
        slice_ranges: for each model slice, the [start, stop) slices of the original volume, to label
            the x-axis in original slice numbers.
    """
    array = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    array = array.reshape(array.shape[-3:])  # D x H x W
    scores_arr = np.asarray(scores, dtype=float)
    if scores_arr.shape[0] != array.shape[0]:
        raise ValueError(f"{scores_arr.shape[0]} scores for a volume of {array.shape[0]} slices")
    top = np.argsort(scores_arr)[::-1][:top_k]

    fig = plt.figure(figsize=(3.0 * top_k, 7.0), dpi=100)
    grid = fig.add_gridspec(2, top_k, height_ratios=[1.0, 1.25], hspace=0.6)
    curve = fig.add_subplot(grid[0, :])
    x = np.arange(len(scores_arr))
    curve.bar(x, scores_arr, color="#4c72b0", width=0.85)
    curve.bar(top, scores_arr[top], color="#dd8452", width=0.85, label=f"top {top_k}")
    _depth_axes(curve, len(scores_arr), slice_ranges)
    curve.legend(loc="upper right", fontsize=8)
    title = "Which slices TG-IS weighted"
    if question:
        title += "\nQ: " + textwrap.shorten(question, 110)
    if answer is not None:
        title += "\nA: " + textwrap.shorten(answer or "(empty)", 110)
    curve.set_title(title, fontsize=10, loc="left")

    for rank, j in enumerate(top):
        ax = fig.add_subplot(grid[1, rank])
        ax.imshow(array[j], cmap="gray", vmin=0.0, vmax=1.0)
        label = f"slice {j}" + (f" (orig. {slice_ranges[j][0]})" if slice_ranges is not None else "")
        ax.set_title(f"{label}\nweight {scores_arr[j]:.3f}", fontsize=9)
        ax.axis("off")
    return _save(fig, Path(path))


def plot_question_scores(
    scores: dict[str, Sequence[float]],
    path: str | Path,
    slice_ranges: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Write a PNG: the TG-IS score curves of several questions on one volume, with the uniform level.

    Args:
        scores: question -> one TG-IS weight per model slice (all of the same length).
        slice_ranges: as in `plot_slice_scores`, to label the x-axis in original slice numbers.
    """
    lengths = {len(v) for v in scores.values()}
    if len(lengths) != 1:
        raise ValueError(f"the questions' scores differ in length: {sorted(lengths)}")
    n = lengths.pop()
    fig, ax = plt.subplots(figsize=(10.0, 4.0), dpi=100)
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # a volume has up to about a dozen questions
    x = np.arange(n)
    for question, curve in scores.items():
        ax.plot(x, curve, marker="o", markersize=3, linewidth=1.2, label=textwrap.shorten(question, 70))
    _depth_axes(ax, n, slice_ranges)
    ax.set_title("TG-IS weights of different questions on the same volume", fontsize=10, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, Path(path))


def _depth_axes(ax: plt.Axes, n: int, slice_ranges: Sequence[tuple[int, int]] | None) -> None:
    """TG-IS weight over the ``n`` model slices: the uniform level, and the x-axis in model slices (with the
    original slice each starts at, when ``slice_ranges`` is given)."""
    ax.axhline(1.0 / n, color="grey", linestyle="--", linewidth=1, label="uniform")
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("TG-IS weight")
    ax.set_xlabel("model slice (foot → head)")
    if slice_ranges is not None:
        ticks = np.arange(n)[:: max(1, n // 8)]
        ax.set_xticks(ticks, [f"{t}\n({slice_ranges[t][0]})" for t in ticks])
        ax.set_xlabel("model slice (original slice)   foot → head")


def _save(fig: plt.Figure, path: Path) -> Path:
    """Write atomically: a reader never sees half a PNG."""
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
