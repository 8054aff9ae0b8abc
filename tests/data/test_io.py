"""Tests of med2e3.data.io: NIfTI / DICOM / .npy reading, orientation, bad inputs, CT windows."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import BasicTextSRStorage, generate_uid

from dicom_helpers import ct_slice
from med2e3.data.io import WINDOWS, Volume, VolumeWarning, apply_window, from_array, load_volume
from med2e3.errors import VolumeError, VolumeSizeError

# --- helpers ------------------------------------------------------------------------------------------


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """World (RAS mm) coordinates of integer voxel indices, shape (N, 3)."""
    return (affine[:3, :3] @ index.T).T + affine[:3, 3]


def _assert_same_geometry(volume: Volume, data: np.ndarray, affine: np.ndarray) -> None:
    """Every voxel of ``volume`` sits at the same world position as the original voxel of equal value."""
    values = np.unique(data)
    assert len(values) == data.size, "fixture values must be unique"
    flat = volume.array.reshape(-1)
    original_index = np.argwhere(np.ones(data.shape, bool))  # C order, matches data.reshape(-1)
    by_value = dict(zip(data.reshape(-1).tolist(), _world(affine, original_index), strict=True))
    loaded_index = np.argwhere(np.ones(volume.array.shape, bool))
    expected = np.array([by_value[v] for v in flat.tolist()])
    np.testing.assert_allclose(_world(volume.affine, loaded_index), expected, atol=1e-4)


def _unique_data(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).permutation(np.prod(shape)).reshape(shape).astype(np.float32)


def _write_series(
    folder: Path,
    pixels: np.ndarray,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    origin: tuple[float, float, float] = (-20.0, -30.0, 100.0),
    pixel_spacing: tuple[float, float] = (0.8, 0.6),
    slice_step: float = 2.5,
    dtype: type = np.uint16,
    series_uid: str | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write ``pixels`` (slice, row, column) as a CT series in LPS, files in shuffled order.

    Returns the equivalent NIfTI: data in (i=column, j=row, k=slice) order and its RAS affine.
    """
    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    names = np.random.default_rng(seed).permutation(len(pixels))
    for k, image in enumerate(pixels):
        position = np.asarray(origin) + k * slice_step * normal
        ds = ct_slice(
            image, k, series_uid, study_uid, position, orientation, pixel_spacing, slice_step, dtype
        )
        ds.save_as(folder / f"IM{names[k]:04d}", enforce_file_format=True)
    linear = np.column_stack([row_dir * pixel_spacing[1], col_dir * pixel_spacing[0], normal * slice_step])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ linear
    affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(origin)
    return {"data": (pixels.astype(np.float32) - 1024).transpose(2, 1, 0), "affine": affine}


# --- NIfTI --------------------------------------------------------------------------------------------


def test_nifti_ras_identity_becomes_superior_posterior_left(tmp_path: Path) -> None:
    data = _unique_data((5, 6, 7))  # (i: R, j: A, k: S)
    volume = load_volume(_save_nifti(tmp_path / "ras.nii.gz", data, np.eye(4)))
    np.testing.assert_array_equal(volume.array, data.transpose(2, 1, 0)[:, ::-1, ::-1])
    assert volume.array.dtype == np.float32
    assert volume.intensity == "hu" and volume.source == tmp_path / "ras.nii.gz"
    _assert_same_geometry(volume, data, np.eye(4))


def test_nifti_permuted_flipped_anisotropic(tmp_path: Path) -> None:
    # voxel i -> inferior (2.5 mm), j -> right (0.7 mm), k -> posterior (1.2 mm)
    affine = np.array([[0, 0.7, 0, 10.0], [0, 0, -1.2, 20.0], [-2.5, 0, 0, 30.0], [0, 0, 0, 1]])
    data = np.zeros((6, 8, 10), np.float32)
    data[4, 3, 5] = 100.0  # reference voxel
    data[1, 3, 5] = 200.0  # more superior (smaller i)
    data[4, 3, 8] = 300.0  # more posterior (larger k)
    data[4, 0, 5] = 400.0  # more left (smaller j)
    volume = load_volume(_save_nifti(tmp_path / "odd.nii", data, affine))
    assert volume.array.shape == (6, 10, 8)
    assert volume.spacing == pytest.approx((2.5, 1.2, 0.7))
    ref, sup, post, left = (np.argwhere(volume.array == v)[0] for v in (100, 200, 300, 400))
    assert sup[0] > ref[0] and (sup[1:] == ref[1:]).all()
    assert post[1] > ref[1] and post[0] == ref[0] and post[2] == ref[2]
    assert left[2] > ref[2] and (left[:2] == ref[:2]).all()
    # columns of the new affine point to S, P, L
    np.testing.assert_allclose(volume.affine[:3, :3], np.diag([-0.7, -1.2, 2.5])[:, ::-1], atol=1e-6)


def test_nifti_geometry_preserved_for_unique_values(tmp_path: Path) -> None:
    affine = np.array([[0, 0.7, 0, 10.0], [0, 0, -1.2, 20.0], [-2.5, 0, 0, 30.0], [0, 0, 0, 1]])
    data = _unique_data((6, 8, 10))
    for orientation in ("axial", "acquisition"):
        volume = load_volume(_save_nifti(tmp_path / "u.nii.gz", data, affine), orientation=orientation)
        _assert_same_geometry(volume, data, affine)


def test_nifti_trailing_singleton_fourth_dim(tmp_path: Path) -> None:
    data = _unique_data((4, 5, 6))
    volume = load_volume(_save_nifti(tmp_path / "v.nii.gz", data[..., None], np.eye(4)))
    assert volume.array.shape == (6, 5, 4)


def test_nifti_scaling_applied(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.full((3, 4, 5), 10, np.int16), np.eye(4))
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, tmp_path / "s.nii.gz")
    np.testing.assert_allclose(load_volume(tmp_path / "s.nii.gz").array, -1004.0)


def test_nifti_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = _save_nifti(tmp_path / "zeros.nii.gz", np.zeros((64, 64, 64)), np.eye(4))  # 2 MiB of float64
    with pytest.raises(VolumeSizeError, match=r"float64.*2\.0 MiB.*more than the 1\.0 MiB limit") as info:
        load_volume(path, max_bytes=2**20)
    assert info.value.path == path
    assert load_volume(path, max_bytes=2**21).shape == (64, 64, 64)


def test_nifti_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    """A header declaring 2 GiB of float64 voxels: refused for its size before any voxel is read."""
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 1024))
    header.set_data_dtype(np.float64)
    (path := tmp_path / "bomb.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    with pytest.raises(VolumeSizeError, match=r"2\.0 GiB.*more than the 1\.0 GiB limit"):
        load_volume(path)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_nifti_complex_voxels_are_refused(tmp_path: Path, dtype: type) -> None:
    path = _save_nifti(tmp_path / "c.nii.gz", np.full((4, 4, 4), 1 + 2j, dtype), np.eye(4))
    with pytest.raises(VolumeError, match=f"real numbers, got dtype {np.dtype(dtype)}"):
        load_volume(path)


@pytest.mark.parametrize(
    ("columns", "acquisition_flips"),
    [
        # coronal stack: i -> R, j -> S, k -> A: depth goes to P, rows to I, columns to L
        ([[1, 0, 0], [0, 0, 1], [0, 1, 0]], (True, True, True)),
        # sagittal stack: i -> P, j -> I, k -> L: already the preferred directions
        ([[0, -1, 0], [0, 0, -1], [-1, 0, 0]], (False, False, False)),
        # axial stack: i -> L, j -> A, k -> S: only rows flip (to P)
        ([[-1, 0, 0], [0, 1, 0], [0, 0, 1]], (False, True, False)),
    ],
)
def test_acquisition_keeps_slice_axis(tmp_path: Path, columns: list, acquisition_flips: tuple) -> None:
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns, float).T * [0.8, 0.9, 3.0]
    data = _unique_data((5, 6, 7))
    path = _save_nifti(tmp_path / "stack.nii.gz", data, affine)
    acquisition = load_volume(path, orientation="acquisition")
    expected = data.transpose(2, 1, 0)
    expected = expected[tuple(slice(None, None, -1) if f else slice(None) for f in acquisition_flips)]
    np.testing.assert_array_equal(acquisition.array, expected)
    assert acquisition.spacing == pytest.approx((3.0, 0.9, 0.8))
    _assert_same_geometry(acquisition, data, affine)
    axial = load_volume(path)
    _assert_same_geometry(axial, data, affine)
    assert nib.aff2axcodes(axial.affine) == ("S", "P", "L")


def test_acquisition_equals_axial_for_axial_scan(tmp_path: Path) -> None:
    affine = np.diag([-0.7, -0.7, 2.0, 1.0])
    path = _save_nifti(tmp_path / "axial.nii.gz", _unique_data((4, 5, 6)), affine)
    a, b = load_volume(path), load_volume(path, orientation="acquisition")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)


def test_bad_orientation_name(tmp_path: Path) -> None:
    path = _save_nifti(tmp_path / "x.nii.gz", _unique_data((3, 3, 3)), np.eye(4))
    with pytest.raises(ValueError, match="orientation"):
        load_volume(path, orientation="coronal")  # type: ignore[arg-type]


# --- DICOM --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
def test_dicom_axial_series_hu_and_order(tmp_path: Path, dtype: type) -> None:
    pixels = np.random.default_rng(1).integers(0, 2000, size=(6, 5, 4)).astype(dtype)
    _write_series(tmp_path / "series", pixels, dtype=dtype)
    volume = load_volume(tmp_path / "series")
    # standard axial DICOM (rows -> P, columns -> L, slices -> S) is already canonical
    np.testing.assert_array_equal(volume.array, pixels.astype(np.float32) - 1024)
    assert volume.intensity == "hu" and volume.source == tmp_path / "series"
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.6))
    np.testing.assert_allclose(volume.affine[:3, 3], [20.0, 30.0, 100.0])  # LPS (-20, -30) -> RAS


@pytest.mark.parametrize(
    "orientation",
    [
        (1, 0, 0, 0, 1, 0),  # axial
        (-1, 0, 0, 0, 1, 0),  # axial, columns to the patient's right
        (1, 0, 0, 0, 0, -1),  # coronal
        (0, 1, 0, 0, 0, -1),  # sagittal
    ],
)
def test_dicom_matches_equivalent_nifti(tmp_path: Path, orientation: tuple) -> None:
    pixels = np.random.default_rng(2).permutation(4 * 5 * 6).reshape(4, 5, 6).astype(np.uint16)
    nifti = _write_series(tmp_path / "series", pixels, orientation=orientation)
    path = _save_nifti(tmp_path / "same.nii.gz", nifti["data"], nifti["affine"])
    for mode in ("axial", "acquisition"):
        from_dicom, from_nifti = load_volume(tmp_path / "series", mode), load_volume(path, mode)
        np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
        np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-5)
        assert from_dicom.spacing == pytest.approx(from_nifti.spacing)
    assert load_volume(tmp_path / "series", "acquisition").array.shape[0] == 4  # slices stay depth


def test_dicom_ignores_non_dicom_files(tmp_path: Path) -> None:
    _write_series(tmp_path / "s", np.ones((3, 4, 4), np.uint16))
    (tmp_path / "s" / "README.txt").write_text("not dicom")
    assert load_volume(tmp_path / "s").array.shape == (3, 4, 4)


def test_dicom_two_series_rejected(tmp_path: Path) -> None:
    _write_series(tmp_path / "s", np.ones((3, 4, 4), np.uint16), seed=0)
    _write_series(tmp_path / "s" / "other", np.ones((3, 4, 4), np.uint16), seed=1)
    with pytest.raises(VolumeError, match="2 DICOM series") as info:
        load_volume(tmp_path / "s")
    assert str(tmp_path / "s") in str(info.value)


def test_dicom_inconsistent_slices_rejected(tmp_path: Path) -> None:
    uid = generate_uid()
    _write_series(tmp_path / "s", np.ones((3, 4, 4), np.uint16), series_uid=uid)
    _write_series(tmp_path / "s" / "b", np.ones((3, 5, 5), np.uint16), series_uid=uid, origin=(0, 0, 0))
    with pytest.raises(VolumeError, match="different") as info:
        load_volume(tmp_path / "s")
    assert info.value.path == tmp_path / "s"


def test_dicom_single_slice_rejected(tmp_path: Path) -> None:
    _write_series(tmp_path / "s", np.ones((1, 4, 4), np.uint16))
    with pytest.raises(VolumeError, match="2D"):
        load_volume(tmp_path / "s")


def _file_of_slice(folder: Path, k: int) -> Path:
    """The file holding slice ``k`` (0-based position order) of a series written by `_write_series`."""
    return next(f for f in folder.iterdir() if pydicom.dcmread(f).InstanceNumber == k + 1)


def _empty(file: Path) -> None:
    file.write_bytes(b"")


def _cut_in_header(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:300])  # meta header kept, dataset cut before the pixel data


def _cut_in_pixels(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-10])


def _garbage(file: Path) -> None:
    file.write_bytes(np.random.default_rng(0).bytes(file.stat().st_size))  # no DICOM marker left


@pytest.mark.parametrize("damage", [_empty, _cut_in_header, _cut_in_pixels, _garbage])
@pytest.mark.parametrize("k", [0, 2, 4], ids=["first", "middle", "last"])
def test_dicom_bad_file_is_named(tmp_path: Path, damage, k: int) -> None:
    pixels = np.random.default_rng(4).integers(0, 2000, size=(5, 6, 6)).astype(np.uint16)
    _write_series(tmp_path / "s", pixels)
    bad = _file_of_slice(tmp_path / "s", k)
    damage(bad)
    with pytest.raises(VolumeError, match=f"DICOM file {bad.name}") as info:
        load_volume(tmp_path / "s")
    assert "uneven" not in str(info.value) and info.value.path == tmp_path / "s"


def test_dicom_bad_file_skipped_with_a_warning_when_asked(tmp_path: Path) -> None:
    pixels = np.random.default_rng(4).integers(0, 2000, size=(5, 6, 6)).astype(np.uint16)
    _write_series(tmp_path / "s", pixels)
    bad = _file_of_slice(tmp_path / "s", 4)
    _cut_in_header(bad)
    with pytest.warns(VolumeWarning, match=rf"skipped 1 unreadable DICOM file \({bad.name}: .*kept 4 of 5"):
        volume = load_volume(tmp_path / "s", bad_slices="skip")
    np.testing.assert_array_equal(volume.array, pixels[:4].astype(np.float32) - 1024)
    middle = _file_of_slice(tmp_path / "s", 2)
    _empty(middle)
    with pytest.raises(VolumeError, match=f"uneven slice spacing.*skipping .*{middle.name}"):
        load_volume(tmp_path / "s", bad_slices="skip")


def test_dicom_non_image_objects_and_other_files_are_ignored(tmp_path: Path) -> None:
    """A report next to the slices, and a CD export's LOCKFILE / VERSION files beside the image folder."""
    _write_series(tmp_path / "cd" / "DICOM" / "S1", np.ones((3, 4, 4), np.uint16))
    report = ct_slice(np.ones((4, 4), np.uint16), 9, generate_uid(), generate_uid(), (0, 0, 0))
    del report.PixelData
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    report.save_as(tmp_path / "cd" / "DICOM" / "S1" / "SR0001", enforce_file_format=True)
    (tmp_path / "cd" / "LOCKFILE").write_bytes(b"")
    (tmp_path / "cd" / "VERSION").write_text("1.0")
    (tmp_path / "cd" / "DICOM" / "S1" / "notes.txt").write_text("not dicom")
    assert load_volume(tmp_path / "cd").array.shape == (3, 4, 4)


# --- .npy and in-memory arrays -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 4, 5, 6), (4, 5, 6)])
def test_npy_unit(tmp_path: Path, shape: tuple) -> None:
    data = np.random.default_rng(3).random(shape, dtype=np.float32)
    np.save(tmp_path / "m3d.npy", data)
    volume = load_volume(tmp_path / "m3d.npy")
    np.testing.assert_array_equal(volume.array, data.reshape(4, 5, 6))
    assert volume.intensity == "unit" and volume.affine is None and volume.spacing == (1.0, 1.0, 1.0)


def test_npy_hu_and_unknown_range(tmp_path: Path) -> None:
    np.save(tmp_path / "hu.npy", np.linspace(-1000, 800, 60).reshape(3, 4, 5))
    assert load_volume(tmp_path / "hu.npy").intensity == "hu"
    np.save(tmp_path / "u8.npy", np.arange(60, dtype=np.uint8).reshape(3, 4, 5) * 4)
    with pytest.raises(VolumeError, match="neither"):
        load_volume(tmp_path / "u8.npy")


def test_from_array_numpy_and_torch() -> None:
    volume = from_array(torch.rand(1, 3, 4, 5), spacing=(2, 1, 1))
    assert (
        volume.array.shape == (3, 4, 5) and volume.intensity == "unit" and volume.spacing == (2.0, 1.0, 1.0)
    )
    assert from_array(np.full((3, 4, 5), -1000.0)).intensity == "hu"
    assert from_array(np.full((3, 4, 5), 50.0), intensity="hu").intensity == "hu"
    with pytest.raises(VolumeError, match="unit"):
        from_array(np.full((3, 4, 5), 50.0), intensity="unit")
    with pytest.raises(VolumeError, match="3D"):
        from_array(np.zeros((4, 5)))


# --- bad inputs: a VolumeError naming the path ---------------------------------------------------------


def _truncated_nifti(tmp_path: Path) -> Path:
    path = _save_nifti(tmp_path / "t.nii.gz", _unique_data((20, 20, 20)), np.eye(4))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _text_as_nifti(tmp_path: Path) -> Path:
    (path := tmp_path / "notes.nii.gz").write_bytes(gzip.compress(b"hello, not an image"))
    return path


def _plain_text(tmp_path: Path) -> Path:
    (path := tmp_path / "notes.nii").write_text("hello, not an image")
    return path


def _unsupported(tmp_path: Path) -> Path:
    (path := tmp_path / "report.txt").write_text("text")
    return path


def _image_2d(tmp_path: Path) -> Path:
    return _save_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32), np.eye(4))


def _single_slice(tmp_path: Path) -> Path:
    return _save_nifti(tmp_path / "slice.nii.gz", np.zeros((8, 8, 1), np.float32), np.eye(4))


def _image_4d(tmp_path: Path) -> Path:
    return _save_nifti(tmp_path / "dyn.nii.gz", np.zeros((4, 4, 4, 3), np.float32), np.eye(4))


def _nan_nifti(tmp_path: Path) -> Path:
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    return _save_nifti(tmp_path / "nan.nii.gz", data, np.eye(4))


def _inf_npy(tmp_path: Path) -> Path:
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, 0] = np.inf
    np.save(path := tmp_path / "inf.npy", data)
    return path


def _garbage_npy(tmp_path: Path) -> Path:
    (path := tmp_path / "bad.npy").write_bytes(b"\x00\x01 definitely not numpy")
    return path


def _empty_folder(tmp_path: Path) -> Path:
    (path := tmp_path / "empty").mkdir()
    return path


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere.nii.gz"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_missing, "no such"),
        (_truncated_nifti, "truncated"),
        (_text_as_nifti, "NIfTI"),
        (_plain_text, "NIfTI"),
        (_unsupported, "unsupported"),
        (_image_2d, "3D"),
        (_single_slice, "2D"),
        (_image_4d, "3D"),
        (_nan_nifti, "NaN"),
        (_inf_npy, "NaN or infinite"),
        (_garbage_npy, "npy"),
        (_empty_folder, "no DICOM"),
    ],
)
def test_bad_input_raises_volume_error_with_path(tmp_path: Path, make, reason: str) -> None:
    path = make(tmp_path)
    with pytest.raises(VolumeError, match=reason) as info:
        load_volume(path)
    assert str(path) in str(info.value)
    assert info.value.path == path
    assert "\n" not in str(info.value)


# --- windows ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "hu", "expected"),
    [
        ("abdomen", [-1000, -160, 40, 240, 1000], [0, 0, 0.5, 1, 1]),
        ("lung", [-1350, -600, 150], [0, 0.5, 1]),
        ("bone", [-500, 400, 1300], [0, 0.5, 1]),
        ("brain", [0, 20, 40, 80, 100], [0, 0.25, 0.5, 1, 1]),
        ("minmax", [2, 4, 6], [0, 0.5, 1]),
    ],
)
def test_windows_map_known_values(window: str, hu: list, expected: list) -> None:
    out = apply_window(np.array(hu, np.float32), window)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_window_table_and_errors() -> None:
    assert {"abdomen", "lung", "bone", "brain", "minmax"} <= set(WINDOWS)
    np.testing.assert_array_equal(apply_window(np.full((2, 2, 2), 7.0), "minmax"), 0.0)
    with pytest.raises(ValueError, match="abdomen"):
        apply_window(np.zeros(3), "liver")
