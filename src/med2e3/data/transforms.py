"""The release's volume preprocessing as MONAI dictionary transforms on the key ``"image"``.

Eval: crop to the foreground (voxels > 0 of the windowed [0, 1] image) -> trilinear resize to the
target (D, H, W) -> clip to [0, 1] -> float32 tensor. Train inserts the random transforms of the
release and nothing else: in-plane RandRotate90 and a RandFlip per axis before the resize (so the
output size never changes), RandScaleIntensity and RandShiftIntensity after it.

`prepare_volume` runs the eval pipeline in plain torch (`preprocess_eval`, equal to the MONAI one
voxel for voxel; tests/data/test_transforms.py checks it), so that asking a question never imports
MONAI, which costs seconds; the train pipelines import it when they are built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from med2e3.data.io import WINDOWS, Volume, apply_window

if TYPE_CHECKING:
    from monai.transforms import Compose, MapTransform

KEY = "image"


def _check_size(size: tuple[int, int, int]) -> None:
    if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"size must be three positive integers (D, H, W), got {size!r}")


def preprocess_eval(image: np.ndarray | torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """The eval pipeline of `build_transforms` on a ``(1, D, H, W)`` image in [0, 1], without MONAI.

    Crop to `foreground_box` (CropForegroundd, no margin), resize trilinearly (Resized:
    ``F.interpolate`` in float32, ``align_corners=False``, skipped when the size already fits),
    clip to [0, 1].
    """
    _check_size(size)
    image = torch.as_tensor(image, dtype=torch.float32)
    image = image[(slice(None), *foreground_box(image[0]))]
    if tuple(image.shape[1:]) != tuple(size):
        image = F.interpolate(image[None], size=size, mode="trilinear", align_corners=False)[0]
    return image.contiguous().clip(0.0, 1.0)


def build_transforms(size: tuple[int, int, int], train: bool = False) -> Compose:
    """Preprocessing of a ``{"image": (1, D, H, W) array in [0, 1]}`` item to ``(1, *size)`` float32.

    Train and eval pipelines hold the same deterministic transforms in the same order; ``train``
    only adds the random ones.

    Raises:
        ValueError: ``size`` is not three positive integers.
    """
    _check_size(size)
    from monai.transforms import Compose, CropForegroundd, Resized

    spatial_aug = _spatial_augmentation() if train else []
    intensity_aug = _intensity_augmentation() if train else []
    return Compose(
        [
            CropForegroundd(KEY, source_key=KEY, select_fn=_foreground, allow_smaller=True),
            *spatial_aug,
            Resized(KEY, spatial_size=size, mode="trilinear"),
            *intensity_aug,
            *_finish(),
        ]
    )


def _spatial_augmentation() -> list[MapTransform]:
    from monai.transforms import RandFlipd, RandRotate90d

    return [
        RandRotate90d(KEY, prob=0.5, spatial_axes=(1, 2)),  # in-plane (H, W)
        *(RandFlipd(KEY, prob=0.1, spatial_axis=axis) for axis in range(3)),
    ]


def _intensity_augmentation() -> list[MapTransform]:
    from monai.transforms import RandScaleIntensityd, RandShiftIntensityd

    return [RandScaleIntensityd(KEY, factors=0.1, prob=0.5), RandShiftIntensityd(KEY, offsets=0.1, prob=0.5)]


def _clip_unit(image: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] (MONAI's ScaleIntensityRanged does it too, at ~20x the cost)."""
    return image.clip(0.0, 1.0)


def _finish() -> list[MapTransform]:
    from monai.transforms import EnsureTyped, Lambdad

    return [
        EnsureTyped(KEY, data_type="tensor", dtype=torch.float32, track_meta=False),
        Lambdad(KEY, func=_clip_unit),
    ]


def build_augmentation() -> Compose:
    """The train pipeline's random transforms alone, for an already preprocessed (1, D, H, W) volume.

    Used on cached eval-preprocessed volumes (`augment`). The in-plane rotation and flips commute with
    the resize for square slices, so this equals the train pipeline up to interpolation.
    """
    from monai.transforms import Compose

    return Compose([*_spatial_augmentation(), *_intensity_augmentation(), *_finish()])


def augment(image: torch.Tensor, seed: int, pipeline: Compose | None = None) -> torch.Tensor:
    """Apply `build_augmentation` (or a prebuilt one) with its random state set from ``seed``."""
    pipeline = pipeline or build_augmentation()
    pipeline.set_random_state(seed=seed)
    return pipeline({KEY: image})[KEY]


def prepare_volume(
    volume: Volume,
    size: tuple[int, int, int],
    window: str = "abdomen",
    train: bool = False,
    seed: int | None = None,
) -> torch.Tensor:
    """A `Volume` as the model's float32 ``(1, *size)`` input in [0, 1].

    CT numbers (``intensity="hu"``) go through ``window`` first (see `WINDOWS`); ``"unit"``
    volumes are already in [0, 1] and skip it. ``seed`` makes the train augmentation repeatable.

    Raises:
        ValueError: unknown ``window`` or bad ``size``.
    """
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; valid names: {', '.join(WINDOWS)}")
    image = volume.array if volume.intensity == "unit" else apply_window(volume.array, window)
    if not train:
        return preprocess_eval(image[None], size)
    pipeline = build_transforms(size, train=True)
    if seed is not None:
        pipeline.set_random_state(seed=seed)
    return pipeline({KEY: image[None]})[KEY]


def source_slice_ranges(volume: Volume, n_slices: int, window: str = "abdomen") -> list[tuple[int, int]]:
    """For each of the model's ``n_slices`` depth slices, the [start, stop) slices of ``volume`` it covers.

    Follows the eval pipeline: the foreground crop's depth extent, resized linearly to ``n_slices``.
    """
    image = volume.array if volume.intensity == "unit" else apply_window(volume.array, window)
    depth = foreground_box(image)[0]
    first, extent = depth.start, depth.stop - depth.start
    bounds = [first + (j * extent) // n_slices for j in range(n_slices + 1)]
    return [(bounds[j], max(bounds[j + 1], bounds[j] + 1)) for j in range(n_slices)]


def foreground_box(image: np.ndarray | torch.Tensor) -> tuple[slice, slice, slice]:
    """The eval pipeline's crop of a ``(D, H, W)`` image in [0, 1]: the bounding box of `_foreground`.

    `preprocess_eval` crops with these slices; a label map aligned with the image, cropped with them
    and resized to the same size, stays aligned with the model's input.
    """
    mask = torch.as_tensor(_foreground(image))
    box = []
    for axis in range(3):
        kept = mask.any(dim=tuple(a for a in range(3) if a != axis)).nonzero()
        box.append(slice(int(kept[0]), int(kept[-1]) + 1))
    return box[0], box[1], box[2]


def _foreground(image: Any) -> Any:
    """Voxels > 0 (numpy or torch); the whole image when none is, so an empty image is not cropped away."""
    mask = image > 0
    if not mask.any():
        mask[...] = True
    return mask
