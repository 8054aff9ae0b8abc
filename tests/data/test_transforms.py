"""Tests of med2e3.data.transforms: the release's MONAI preprocessing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.transforms import Randomizable, Resized

from med2e3.data.io import apply_window, from_array
from med2e3.data.transforms import KEY, build_transforms, prepare_volume

SIZE = (8, 16, 16)


def _ct(depth: int, height: int = 24, width: int = 20) -> np.ndarray:
    """Air around a soft-tissue block with some texture, in HU."""
    rng = np.random.default_rng(depth)
    array = np.full((depth, height, width), -1000.0, np.float32)
    array[1:-1, 3:-3, 2:-2] = rng.uniform(-100, 200, size=(depth - 2, height - 6, width - 4))
    return array


@pytest.mark.parametrize("depth", [5, 20, 32, 50])
def test_eval_shape_dtype_range(depth: int) -> None:
    out = prepare_volume(from_array(_ct(depth)), (32, 16, 16))
    assert type(out) is torch.Tensor
    assert out.shape == (1, 32, 16, 16) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_hu_volume_is_windowed_and_cropped() -> None:
    array = np.full((10, 20, 20), -1000.0, np.float32)
    array[2:8, 5:15, 4:12] = 40.0  # abdomen window: 40 HU -> 0.5, air -> 0 and cropped away
    out = prepare_volume(from_array(array, intensity="hu"), SIZE)
    torch.testing.assert_close(out, torch.full((1, *SIZE), 0.5))
    out = prepare_volume(from_array(array, intensity="hu"), SIZE, window="brain")  # 40 HU -> 0.5 as well
    torch.testing.assert_close(out, torch.full((1, *SIZE), 0.5))


def test_unit_volume_skips_windowing() -> None:
    array = np.zeros((6, 12, 12), np.float32)
    array[1:5, 2:10, 3:9] = 0.3
    out = prepare_volume(from_array(array), SIZE, window="lung")
    torch.testing.assert_close(out, torch.full((1, *SIZE), 0.3))


def test_empty_image_is_not_cropped_away() -> None:
    out = prepare_volume(from_array(np.zeros((4, 6, 6), np.float32)), SIZE)
    assert out.shape == (1, *SIZE) and float(out.abs().max()) == 0.0


def _unit_blob(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """[0, 1] noise inside an off-centre box, zeros around it (float64, as a .npy may hold)."""
    rng = np.random.default_rng(seed)
    array = np.zeros(shape)
    d, h, w = shape
    array[d // 4 : d - 1, 1 : h // 2 + 2, w // 3 :] = rng.uniform(
        0.01, 1.0, size=array[d // 4 : d - 1, 1 : h // 2 + 2, w // 3 :].shape
    )
    return array


@pytest.mark.parametrize(
    ("image", "size"),
    [
        (apply_window(_ct(5), "abdomen"), (32, 16, 16)),  # upsampled in depth
        (apply_window(_ct(50, 40, 36), "lung"), SIZE),  # downsampled
        (_unit_blob((9, 17, 23), 0), (7, 19, 5)),  # float64, mixed scale factors
        (_unit_blob((8, 16, 16), 1), SIZE),  # cropped, then resized back up
        (np.random.default_rng(2).uniform(0.1, 1, size=SIZE), SIZE),  # already the size: no resize
        (np.zeros((4, 6, 6), np.float32), SIZE),  # no foreground: nothing cropped
    ],
)
def test_eval_equals_the_monai_pipeline(image: np.ndarray, size: tuple[int, int, int]) -> None:
    """`prepare_volume` runs the eval pipeline without MONAI; it must give MONAI's voxels exactly."""
    reference = build_transforms(size, train=False)({KEY: image[None]})[KEY]
    out = prepare_volume(from_array(image, intensity="unit"), size)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (1, *size)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_asking_does_not_import_monai() -> None:
    code = "import sys, med2e3.inference, med2e3.cli; print('monai' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_eval_is_deterministic() -> None:
    volume = from_array(_ct(12))
    torch.testing.assert_close(prepare_volume(volume, SIZE), prepare_volume(volume, SIZE), rtol=0, atol=0)


def test_train_seeded() -> None:
    volume = from_array(_ct(12))
    a, b = (prepare_volume(volume, SIZE, train=True, seed=3) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, prepare_volume(volume, SIZE, train=True, seed=4))
    evaluation = prepare_volume(volume, SIZE)
    changed = [
        not torch.equal(prepare_volume(volume, SIZE, train=True, seed=s), evaluation) for s in range(6)
    ]
    assert sum(changed) >= 3  # augmentations are random: most seeds change something


def test_train_keeps_size_for_non_square_target() -> None:
    volume = from_array(_ct(7, height=30, width=18))
    for seed in range(8):  # in-plane 90 degree rotations happen before the resize
        out = prepare_volume(volume, (4, 12, 8), train=True, seed=seed)
        assert out.shape == (1, 4, 12, 8)
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_train_and_eval_differ_only_in_random_transforms() -> None:
    train, evaluation = build_transforms(SIZE, train=True), build_transforms(SIZE, train=False)
    assert not any(isinstance(t, Randomizable) for t in evaluation.transforms)
    fixed = [t for t in train.transforms if not isinstance(t, Randomizable)]
    assert [type(t) for t in fixed] == [type(t) for t in evaluation.transforms]
    resize = [t for t in evaluation.transforms if isinstance(t, Resized)]
    assert len(resize) == 1 and tuple(resize[0].resizer.spatial_size) == SIZE
    random_names = sorted(type(t).__name__ for t in train.transforms if isinstance(t, Randomizable))
    assert random_names == [
        "RandFlipd",
        "RandFlipd",
        "RandFlipd",
        "RandRotate90d",
        "RandScaleIntensityd",
        "RandShiftIntensityd",
    ]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        build_transforms((8, 16), train=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="abdomen"):
        prepare_volume(from_array(_ct(5)), SIZE, window="liver")
