"""Slices of the original volume as PNG images, with a CT window."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from med2e3.data.io import WINDOWS
from med2e3.server.store import StoredVolume


def window_bounds(entry: StoredVolume, window: str) -> tuple[float, float]:
    """The intensities shown as black and white for ``window`` on this upload.

    Named CT windows apply to CT numbers; [0, 1] volumes (.npy) are shown as stored; ``minmax``
    uses the whole volume's range, so slices stay comparable.

    Raises:
        ValueError: unknown window name.
    """
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; valid names: {', '.join(WINDOWS)}")
    bounds = WINDOWS[window]
    if bounds is None:
        low, high = entry.value_range
        return low, (high if high > low else low + 1.0)
    if entry.intensity == "unit":
        return 0.0, 1.0
    level, width = bounds
    return level - width / 2, level + width / 2


def slice_png(array: np.ndarray, k: int, bounds: tuple[float, float]) -> bytes:
    """Depth slice ``k`` of a (D, H, W) array as an 8-bit grey PNG (top: anterior, left: patient's right)."""
    low, high = bounds
    grey = np.clip((array[k].astype(np.float32) - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
