"""Read CT / MR volumes (NIfTI, a DICOM series folder, M3D-Data .npy) into one `Volume` type.

Orientation conventions (array axes are always (D, H, W)):

* ``"axial"`` (default, canonical): D runs inferior -> superior (foot to head), H runs anterior ->
  posterior (top of the image is anterior), W runs patient right -> left (radiological display:
  the patient's right is on the image's left). In nibabel axis codes the (d, h, w) axes point to
  (S, P, L), whatever plane the scan was acquired in.
* ``"acquisition"``: D is the acquisition's stacking axis (the 3rd voxel axis of a NIfTI, the slice
  axis of a DICOM series); H is the 2nd voxel axis (DICOM rows), W the 1st (DICOM columns). Axes
  are never permuted, only flipped: depth points to S, P or L and the in-plane axes point to I, P
  or L, depending on which patient axis each is closest to. An axial scan therefore reads exactly
  as in ``"axial"``; a coronal stack reads front to back with superior at the top of each slice,
  a sagittal stack right to left with superior at the top and anterior on the left.

The affine of a `Volume` maps a (d, h, w, 1) index of ``Volume.array`` to RAS+ millimetres
(nibabel convention) and stays exact through reorientation. Intensities are kept as read: CT
numbers (``"hu"``) for NIfTI and DICOM, [0, 1] (``"unit"``) for the published M3D-Data arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pydicom
from nibabel import orientations as nio
from pydicom.errors import InvalidDicomError

from med2e3.errors import VolumeError

Orientation = Literal["axial", "acquisition"]
Intensity = Literal["hu", "unit"]

#: CT display windows as (level, width) in HU; ``None`` means per-volume min-max (MRI, unknown units).
WINDOWS: dict[str, tuple[float, float] | None] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "minmax": None,
}

_HU_MIN_BELOW = -200.0  # an array whose minimum is below this is taken to hold CT numbers
_UNIT_TOLERANCE = 1e-3  # resampling noise allowed around [0, 1] for "unit" arrays
_CANONICAL = nio.axcodes2ornt(("S", "P", "L"))
# Preferred direction per patient axis (0: R/L, 1: A/P, 2: S/I); +1 points to R, A or S.
_DEPTH_SIGN = (-1.0, -1.0, 1.0)  # towards L, P, S
_INPLANE_SIGN = (-1.0, -1.0, -1.0)  # towards L, P, I: image top is anterior or superior
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image in (D, H, W) order with its geometry.

    Attributes:
        array: float32 voxels, shape (D, H, W).
        spacing: voxel size in mm along (D, H, W); (1, 1, 1) when unknown (.npy).
        affine: 4x4 map from a (d, h, w, 1) index of ``array`` to RAS+ mm; ``None`` when unknown.
        intensity: ``"hu"`` for raw CT numbers, ``"unit"`` for values already in [0, 1].
        source: the file or folder read, ``None`` for in-memory arrays.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray | None
    intensity: Intensity
    source: Path | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 3 or self.array.dtype != np.float32:
            raise ValueError(
                f"Volume.array must be float32 (D, H, W), got {self.array.dtype} {self.array.shape}"
            )
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"Volume.spacing must be 3 positive numbers, got {self.spacing}")
        if self.affine is not None and np.shape(self.affine) != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got shape {np.shape(self.affine)}")
        if self.intensity not in ("hu", "unit"):
            raise ValueError(f"Volume.intensity must be 'hu' or 'unit', got {self.intensity!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D, H, W)."""
        return tuple(self.array.shape)  # type: ignore[return-value]


def load_volume(path: str | Path, orientation: Orientation = "axial") -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file, a folder with one DICOM series, or an M3D-Data ``.npy``.

    NIfTI and DICOM are reoriented as ``orientation`` says (see the module docstring) and keep
    CT numbers (``intensity="hu"``). A ``.npy`` is taken as published by M3D-Data: already in
    (D, H, W) order (a leading channel of 1 is dropped), no geometry, and ``intensity="unit"``
    when its values lie in [0, 1]; values outside [0, 1] are accepted as CT numbers only when the
    minimum is below -200 (air), otherwise the file is rejected. ``orientation`` has no effect on
    ``.npy`` files.

    Raises:
        VolumeError: the path is missing, unreadable, not a 3D image, or holds NaN / inf voxels.
        ValueError: ``orientation`` is not ``"axial"`` or ``"acquisition"``.
    """
    if orientation not in ("axial", "acquisition"):
        raise ValueError(f"orientation must be 'axial' or 'acquisition', got {orientation!r}")
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, "no such file or folder")
    name = path.name.lower()
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    elif name.endswith((".nii", ".nii.gz")):
        array, affine = _read_nifti(path)
    elif name.endswith(".npy"):
        return _with_intensity(_read_npy(path), None, path)
    else:
        raise VolumeError(
            path, "unsupported file type (expected .nii, .nii.gz, .npy or a DICOM series folder)"
        )
    array, affine = _reorient(_check_voxels(array, path), affine, orientation, path)
    return Volume(array, _spacing(affine), affine, "hu", path)


def from_array(
    array: Any,
    spacing: tuple[float, float, float] | None = None,
    intensity: Intensity | None = None,
    affine: np.ndarray | None = None,
) -> Volume:
    """Wrap an in-memory (D, H, W) or (1, D, H, W) numpy array or torch tensor as a `Volume`.

    The array is taken as already in the orientation the caller wants. ``intensity=None`` infers
    it as for ``.npy`` files (values in [0, 1] -> ``"unit"``, minimum below -200 -> ``"hu"``);
    ``"unit"`` requires values in [0, 1]. ``spacing`` defaults to the affine's column norms, or
    (1, 1, 1).

    Raises:
        VolumeError: the array is not a finite numeric 3D volume, or its range fits no intensity.
    """
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch here
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    voxels = _check_voxels(array, None)
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise VolumeError(None, f"affine must be 4x4, got shape {affine.shape}")
    if spacing is None:
        spacing = _spacing(affine) if affine is not None else (1.0, 1.0, 1.0)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise VolumeError(None, f"spacing must be 3 positive numbers, got {spacing}")
    spacing = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    return _with_intensity(voxels, intensity, None, spacing=spacing, affine=affine)


def apply_window(array: np.ndarray, window: str) -> np.ndarray:
    """Map intensities to [0, 1] float32 with a named window from `WINDOWS`.

    A (level, width) window maps ``level - width/2`` to 0 and ``level + width/2`` to 1, clipping
    outside. ``"minmax"`` rescales the array's own range (a constant array gives zeros).

    Raises:
        ValueError: unknown window name.
    """
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; valid names: {', '.join(WINDOWS)}")
    x = np.asarray(array, dtype=np.float32)
    bounds = WINDOWS[window]
    if bounds is None:
        low, high = float(x.min()), float(x.max())
        if high <= low:
            return np.zeros_like(x)
    else:
        level, width = bounds
        low, high = level - width / 2, level + width / 2
    return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32)


# --- readers: each returns (array, affine) with array axes (slice, row, column) --------------------


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI voxels as (k, j, i) plus the matching voxel -> RAS affine."""
    try:
        image = nib.load(path)
        shape = image.shape
    except Exception as exc:
        raise VolumeError(path, f"not a readable NIfTI file ({_short(exc)})") from exc
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) != 3:
        raise VolumeError(path, f"expected a 3D image, got shape {tuple(shape)}")
    try:
        data = image.get_fdata(dtype=np.float32).reshape(shape)
    except Exception as exc:
        raise VolumeError(path, f"cannot read voxel data, file truncated or corrupt ({_short(exc)})") from exc
    affine = np.asarray(image.affine, dtype=np.float64)
    return data.transpose(2, 1, 0), affine[:, [2, 1, 0, 3]]


def _read_npy(path: Path) -> np.ndarray:
    """An M3D-Data array, (1, D, H, W) or (D, H, W), validated as (D, H, W)."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise VolumeError(path, f"not a readable .npy array ({_short(exc)})") from exc
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    return _check_voxels(array, path)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM series as HU voxels (slice, row, column) plus its voxel -> RAS affine."""
    slices = _dicom_slices(folder)
    uids = sorted({str(ds.get("SeriesInstanceUID", "?")) for ds in slices})
    if len(uids) > 1:
        raise VolumeError(
            folder, f"holds {len(uids)} DICOM series ({', '.join(uids[:3])}); pass one series folder"
        )
    if len(slices) < 2:
        raise VolumeError(folder, "holds a single DICOM image: a 2D image, not a volume")
    orient, spacing, shape = _dicom_geometry(slices[0], folder)
    for ds in slices[1:]:
        other = _dicom_geometry(ds, folder)
        if not np.allclose(other[0], orient, atol=1e-4):
            raise VolumeError(folder, "slices have different ImageOrientationPatient")
        if not np.allclose(other[1], spacing, rtol=1e-4) or other[2] != shape:
            raise VolumeError(folder, "slices have different PixelSpacing or image size")
    row_dir, col_dir = orient[:3], orient[3:]  # along a row (column index), along a column (row index)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_dicom_floats(ds, "ImagePositionPatient", 3, folder) for ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    positions, slices = positions[order], [slices[i] for i in order]
    gaps = np.diff(positions @ normal)
    if gaps.min() < 1e-3:
        raise VolumeError(folder, "two slices share one position (duplicate images?)")
    if np.abs(gaps - np.median(gaps)).max() > 0.1 * np.median(gaps) + 1e-2:
        raise VolumeError(folder, "uneven slice spacing (missing slices?)")
    array = np.stack([_dicom_hu(ds, shape, folder) for ds in slices])
    linear = np.column_stack(
        [(positions[-1] - positions[0]) / (len(slices) - 1), col_dir * spacing[0], row_dir * spacing[1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ linear
    affine[:3, 3] = _LPS_TO_RAS @ positions[0]
    return array, affine


def _dicom_slices(folder: Path) -> list[pydicom.Dataset]:
    """Every DICOM image (with pixel data) under ``folder``; other files are ignored."""
    slices = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(file)
        except InvalidDicomError:
            continue
        except Exception as exc:
            raise VolumeError(folder, f"cannot read DICOM file {file.name} ({_short(exc)})") from exc
        if "PixelData" in ds:
            slices.append(ds)
    if not slices:
        raise VolumeError(folder, "folder holds no DICOM images")
    return slices


def _dicom_geometry(ds: pydicom.Dataset, folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(ImageOrientationPatient, PixelSpacing, (Rows, Columns)) of one slice."""
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeError(folder, "multi-frame DICOM files are not supported; use one file per slice")
    orient = _dicom_floats(ds, "ImageOrientationPatient", 6, folder)
    spacing = _dicom_floats(ds, "PixelSpacing", 2, folder)
    return orient, spacing, (int(ds.Rows), int(ds.Columns))


def _dicom_floats(ds: pydicom.Dataset, keyword: str, count: int, folder: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != count:
        raise VolumeError(folder, f"a slice lacks a valid {keyword}")
    return np.array([float(v) for v in value], dtype=np.float64)


def _dicom_hu(ds: pydicom.Dataset, shape: tuple[int, int], folder: Path) -> np.ndarray:
    """Pixel data of one slice rescaled to HU (RescaleSlope / RescaleIntercept)."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
        raise VolumeError(
            folder, f"cannot decode pixel data (transfer syntax {syntax}: {_short(exc)})"
        ) from exc
    if pixels.shape != shape:
        raise VolumeError(folder, f"pixel data of shape {pixels.shape} is not a {shape} grayscale image")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


# --- shared checks and geometry ---------------------------------------------------------------------


def _check_voxels(array: np.ndarray, path: Path | None) -> np.ndarray:
    """A finite real 3D array with at least 2 voxels per axis, as float32."""
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise VolumeError(path, f"voxels must be real numbers, got dtype {array.dtype}")
    if array.ndim != 3:
        raise VolumeError(path, f"expected a 3D image, got shape {tuple(array.shape)}")
    if min(array.shape) < 2:
        raise VolumeError(path, f"shape {tuple(array.shape)} is a 2D image, not a volume")
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise VolumeError(path, "contains NaN or infinite voxels")
    return array


def _with_intensity(
    array: np.ndarray,
    intensity: Intensity | None,
    path: Path | None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    affine: np.ndarray | None = None,
) -> Volume:
    """Decide (or check) the intensity kind of a geometry-free array and build the `Volume`."""
    low, high = float(array.min()), float(array.max())
    in_unit = low >= -_UNIT_TOLERANCE and high <= 1 + _UNIT_TOLERANCE
    if intensity is None:
        if in_unit:
            intensity = "unit"
        elif low < _HU_MIN_BELOW:
            intensity = "hu"
        else:
            raise VolumeError(
                path, f"values in [{low:.4g}, {high:.4g}] are neither [0, 1] intensities nor CT numbers (HU)"
            )
    elif intensity == "unit" and not in_unit:
        raise VolumeError(path, f"intensity 'unit' needs values in [0, 1], got [{low:.4g}, {high:.4g}]")
    elif intensity not in ("hu", "unit"):
        raise VolumeError(path, f"intensity must be 'hu' or 'unit', got {intensity!r}")
    if intensity == "unit":
        array = np.clip(array, 0.0, 1.0)
    return Volume(array, spacing, affine, intensity, path)


def _reorient(
    array: np.ndarray, affine: np.ndarray, orientation: Orientation, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Flip / permute (slice, row, column) voxels into ``orientation``; the affine follows."""
    current = nio.io_orientation(affine)
    if np.isnan(current).any():
        raise VolumeError(path, "the affine is degenerate (zero or repeated voxel axes)")
    if orientation == "axial":
        target = _CANONICAL
    else:
        target = current.copy()
        for axis, (world, _) in enumerate(current):
            target[axis, 1] = (_DEPTH_SIGN if axis == 0 else _INPLANE_SIGN)[int(world)]
    transform = nio.ornt_transform(current, target)
    out = np.ascontiguousarray(nio.apply_orientation(array, transform), dtype=np.float32)
    return out, affine @ nio.inv_ornt_aff(transform, array.shape)


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis: the norms of the affine's columns."""
    d, h, w = np.linalg.norm(affine[:3, :3], axis=0)
    return float(d), float(h), float(w)


def _short(exc: BaseException) -> str:
    """A one-line, bounded description of a library exception."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
