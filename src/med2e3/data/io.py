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

import math
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pydicom
from nibabel import orientations as nio
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from med2e3.errors import VolumeError, VolumeSizeError

Orientation = Literal["axial", "acquisition"]
Intensity = Literal["hu", "unit"]
BadSlices = Literal["raise", "skip"]

#: Default limit of `load_volume` on the memory a volume's voxels need (1 GiB: 512 x 512 x 1024 as float32).
MAX_VOLUME_BYTES = 2**30

#: CT display windows as (level, width) in HU; ``None`` means per-volume min-max (MRI, unknown units).
WINDOWS: dict[str, tuple[float, float] | None] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "minmax": None,
}

_HU_MIN_BELOW = -200.0  # an array whose minimum is below this is taken to hold CT numbers
_CT_AIR = -500.0  # every CT field of view holds air (about -1000 HU)
_CT_FAT = -30.0  # ... or at least fat (-50 to -150 HU)
_CT_MAX = 4000.0  # beyond 12-bit CT numbers (3071 HU), with no air: not CT
MIN_SCAN_SIDE = 16  # a scan has at least this many voxels along two of its axes
_UNIT_TOLERANCE = 1e-3  # resampling noise allowed around [0, 1] for "unit" arrays
_CANONICAL = nio.axcodes2ornt(("S", "P", "L"))
# Preferred direction per patient axis (0: R/L, 1: A/P, 2: S/I); +1 points to R, A or S.
_DEPTH_SIGN = (-1.0, -1.0, 1.0)  # towards L, P, S
_INPLANE_SIGN = (-1.0, -1.0, -1.0)  # towards L, P, I: image top is anterior or superior
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class VolumeWarning(UserWarning):
    """A volume was read, with a caveat the user should know about (e.g. skipped DICOM files)."""


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


def load_volume(
    path: str | Path,
    orientation: Orientation = "axial",
    max_bytes: int = MAX_VOLUME_BYTES,
    bad_slices: BadSlices = "raise",
) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file, a folder with one DICOM series, or an M3D-Data ``.npy``.

    NIfTI and DICOM are reoriented as ``orientation`` says (see the module docstring) and keep
    CT numbers (``intensity="hu"``). A ``.npy`` is taken as published by M3D-Data: already in
    (D, H, W) order (a leading channel of 1 is dropped), no geometry, and ``intensity="unit"``
    when its values lie in [0, 1]; values outside [0, 1] are accepted as CT numbers only when the
    minimum is below -200 (air), otherwise the file is rejected. ``orientation`` has no effect on
    ``.npy`` files.

    ``max_bytes`` bounds the memory the voxels need (as stored or as float32, whichever is larger);
    a NIfTI or ``.npy`` is checked from its header, before any voxel is read or decompressed.
    In a DICOM folder, a DICOM file that is not a readable image slice is an error naming it, and so
    is a file that is empty or has no DICOM marker but sits next to the slices with their extension
    (a damaged slice); ``bad_slices="skip"`` skips such files instead, with a `VolumeWarning` naming
    them and the number of slices kept. Other files (notes, a LOCKFILE) and DICOM objects that are
    not images (DICOMDIR, reports) are ignored.

    Raises:
        VolumeError: the path is missing, unreadable, not a 3D image, or holds NaN / inf voxels.
        VolumeSizeError: the voxels need more than ``max_bytes``.
        ValueError: ``orientation`` is not ``"axial"`` or ``"acquisition"``.
    """
    if orientation not in ("axial", "acquisition"):
        raise ValueError(f"orientation must be 'axial' or 'acquisition', got {orientation!r}")
    if bad_slices not in ("raise", "skip"):
        raise ValueError(f"bad_slices must be 'raise' or 'skip', got {bad_slices!r}")
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, "no such file or folder")
    name = path.name.lower()
    if path.is_dir():
        array, affine = _read_dicom_series(path, bad_slices)
    elif name.endswith((".nii", ".nii.gz")):
        array, affine = _read_nifti(path, max_bytes)
    elif name.endswith(".npy"):
        return _with_intensity(_read_npy(path, max_bytes), None, path)
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


def check_scan_size(volume: Volume) -> Volume:
    """``volume`` unchanged if it is big enough to be a scan: `MIN_SCAN_SIDE` voxels along two axes.

    A slab of a few slices passes; a 2 x 2 x 2 array or a line of voxels does not.

    Raises:
        VolumeError: the volume is too small.
    """
    if sorted(volume.shape)[1] < MIN_SCAN_SIDE:
        shape = "x".join(map(str, volume.shape))
        raise VolumeError(
            volume.source,
            f"{shape} voxels is too small to be a scan (at least {MIN_SCAN_SIDE} along two axes)",
        )
    return volume


def ct_window_problem(volume: Volume, window: str, name: str | None = None) -> str | None:
    """Why the CT ``window`` plainly does not suit ``volume``'s intensities, or None; the message names
    the volume by ``name`` (default: its source).

    A volume read as CT numbers whose values hold no air (nothing below -500 HU) and either no fat
    (nothing below -30 HU) or values past 12-bit CT (above 4000) is no CT in Hounsfield units: an MRI,
    or a CT stored without its rescale intercept. A CT window would show the model flat grey slices.
    """
    if volume.intensity != "hu" or WINDOWS.get(window) is None:
        return None
    low, high = float(volume.array.min()), float(volume.array.max())
    if low < _CT_AIR or (low < _CT_FAT and high <= _CT_MAX):
        return None
    name = name if name is not None else volume.source
    where = f"{name}: " if name is not None else ""
    return (
        f"{where}intensities in [{low:.4g}, {high:.4g}] do not look like CT Hounsfield units, so the "
        f"{window!r} CT window shows the model flat grey slices; for MRI and other non-CT images use "
        "--window minmax (window='minmax')"
    )


# --- readers: each returns (array, affine) with array axes (slice, row, column) --------------------


def _read_nifti(path: Path, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI voxels as (k, j, i) plus the matching voxel -> RAS affine."""
    try:
        image = nib.load(path)
        shape = image.shape
        dtype = image.get_data_dtype()
    except Exception as exc:
        raise VolumeError(path, f"not a readable NIfTI file ({_short(exc)})") from exc
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) != 3:
        raise VolumeError(path, f"expected a 3D image, got shape {tuple(shape)}")
    _check_declared(shape, dtype, max_bytes, path)
    try:
        data = image.get_fdata(dtype=np.float32).reshape(shape)
    except Exception as exc:
        raise VolumeError(path, f"cannot read voxel data, file truncated or corrupt ({_short(exc)})") from exc
    affine = np.asarray(image.affine, dtype=np.float64)
    return data.transpose(2, 1, 0), affine[:, [2, 1, 0, 3]]


def _read_npy(path: Path, max_bytes: int) -> np.ndarray:
    """An M3D-Data array, (1, D, H, W) or (D, H, W), validated as (D, H, W)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only, until used
    except Exception as exc:
        raise VolumeError(path, f"not a readable .npy array ({_short(exc)})") from exc
    _check_declared(array.shape, array.dtype, max_bytes, path)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    return _check_voxels(array, path)


@dataclass(frozen=True)
class _Slice:
    """One readable DICOM image slice: its file (relative to the series folder), header and HU pixels."""

    name: str
    ds: pydicom.Dataset
    hu: np.ndarray
    orientation: np.ndarray
    spacing: np.ndarray
    position: np.ndarray


def _read_dicom_series(folder: Path, bad_slices: BadSlices) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM series as HU voxels (slice, row, column) plus its voxel -> RAS affine."""
    slices, skipped = _dicom_slices(folder, bad_slices)
    uids = sorted({str(s.ds.get("SeriesInstanceUID", "?")) for s in slices})
    if len(uids) > 1:
        raise VolumeError(
            folder, f"holds {len(uids)} DICOM series ({', '.join(uids[:3])}); pass one series folder"
        )
    if len(slices) < 2:
        raise VolumeError(folder, "holds a single DICOM image: a 2D image, not a volume")
    first = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise VolumeError(
                folder, f"slices have different ImageOrientationPatient ({first.name}, {s.name})"
            )
        if not np.allclose(s.spacing, first.spacing, rtol=1e-4) or s.hu.shape != first.hu.shape:
            raise VolumeError(
                folder, f"slices have different PixelSpacing or image size ({first.name}, {s.name})"
            )
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]  # along a row, along a column
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(s.position @ normal))
    positions = np.array([s.position for s in slices])
    gaps = np.diff(positions @ normal)
    if gaps.min() < 1e-3:
        raise VolumeError(folder, "two slices share one position (duplicate images?)")
    if np.abs(gaps - np.median(gaps)).max() > 0.1 * np.median(gaps) + 1e-2:
        after = f" after skipping {', '.join(name for name, _ in skipped)}" if skipped else ""
        raise VolumeError(folder, f"uneven slice spacing (missing slices?){after}")
    if skipped:
        details = "; ".join(f"{name}: {reason}" for name, reason in skipped)
        warnings.warn(
            f"{folder}: skipped {len(skipped)} unreadable DICOM file{'s' if len(skipped) > 1 else ''} "
            f"({details}); kept {len(slices)} of {len(slices) + len(skipped)} slices",
            VolumeWarning,
            stacklevel=3,
        )
    linear = np.column_stack(
        [
            (positions[-1] - positions[0]) / (len(slices) - 1),
            col_dir * first.spacing[0],
            row_dir * first.spacing[1],
        ]
    )
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ linear
    affine[:3, 3] = _LPS_TO_RAS @ positions[0]
    return np.stack([s.hu for s in slices]), affine


def _dicom_slices(folder: Path, bad_slices: BadSlices) -> tuple[list[_Slice], list[tuple[str, str]]]:
    """Every DICOM image slice under ``folder``, and the (file, reason) of each bad file skipped.

    A file without the DICOM marker (or empty) is ignored, unless it sits next to image slices with
    their extension: then it is taken for a damaged slice, and is bad like an unreadable DICOM file.
    """
    slices: list[_Slice] = []
    skipped: list[tuple[str, str]] = []
    unknown: list[tuple[str, str]] = []

    def bad(name: str, reason: str) -> None:
        if bad_slices == "raise":
            raise VolumeError(folder, f"DICOM file {name} {reason}")
        skipped.append((name, reason))

    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        name = file.relative_to(folder).as_posix()
        try:
            image = _dicom_slice(file, name)
        except _NotDicom as err:
            unknown.append((name, err.reason))
        except _BadFile as err:
            bad(name, err.reason)
        else:
            if image is not None:
                slices.append(image)
    like_slices = {_place(s.name) for s in slices}
    for name, reason in unknown:
        if _place(name) in like_slices:
            bad(name, reason)
    if not slices:
        raise VolumeError(folder, "folder holds no DICOM images")
    return slices, skipped


def _place(name: str) -> tuple[str, str]:
    """A file's folder and extension: files with the same place as image slices should be slices."""
    path = PurePosixPath(name)
    return str(path.parent), path.suffix.lower()


class _BadFile(Exception):
    """A file of a DICOM folder that should be an image slice and is not a readable one."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _NotDicom(_BadFile):
    """A file that is empty or has no DICOM marker: bad only if it is named like the slices."""


def _dicom_slice(file: Path, name: str) -> _Slice | None:
    """One image slice; None for a DICOM object that is no image (DICOMDIR, a report, ...).

    Raises:
        _NotDicom: the file is empty or has no DICOM marker.
        _BadFile: the file is DICOM but not a readable image slice.
    """
    if file.stat().st_size == 0:
        raise _NotDicom("is empty")
    try:
        ds = pydicom.dcmread(file)
    except InvalidDicomError:
        raise _NotDicom("is not a DICOM file (no DICM marker)") from None
    except Exception as exc:
        raise _BadFile(f"cannot be read ({_short(exc)})") from exc
    if "PixelData" not in ds:
        if _is_not_an_image(ds):
            return None
        raise _BadFile("has no pixel data (truncated or corrupt)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise _BadFile("is multi-frame, which is not supported; use one file per slice")
    orientation = _dicom_floats(ds, "ImageOrientationPatient", 6)
    spacing = _dicom_floats(ds, "PixelSpacing", 2)
    position = _dicom_floats(ds, "ImagePositionPatient", 3)
    return _Slice(name, ds, _dicom_hu(ds), orientation, spacing, position)


def _is_not_an_image(ds: pydicom.Dataset) -> bool:
    """True for a DICOM object whose SOP class is known and is no image (DICOMDIR, a report, ...)."""
    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return sop is not None and "Image" not in UID(str(sop)).name


def _dicom_floats(ds: pydicom.Dataset, keyword: str, count: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != count:
        raise _BadFile(f"lacks a valid {keyword}")
    return np.array([float(v) for v in value], dtype=np.float64)


def _dicom_hu(ds: pydicom.Dataset) -> np.ndarray:
    """Pixel data of one slice rescaled to HU (RescaleSlope / RescaleIntercept)."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
        raise _BadFile(
            f"has pixel data that cannot be decoded (transfer syntax {syntax}: {_short(exc)})"
        ) from exc
    shape = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
    if pixels.shape != shape:
        raise _BadFile(f"has pixel data of shape {pixels.shape}, not a {shape} grayscale image")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


# --- shared checks and geometry ---------------------------------------------------------------------


def _check_declared(shape: tuple[int, ...], dtype: np.dtype, max_bytes: int, path: Path) -> None:
    """Refuse, from a header alone, voxels that are not real numbers or would need more than ``max_bytes``."""
    if dtype.kind not in "biuf":
        raise VolumeError(path, f"voxels must be real numbers, got dtype {dtype}")
    needed = math.prod(shape) * max(dtype.itemsize, 4)  # as stored, then as float32
    if needed > max_bytes:
        raise VolumeSizeError(
            path,
            f"{'x'.join(map(str, shape))} voxels of {dtype} need {_bytes(needed)} to read, more than "
            f"the {_bytes(max_bytes)} limit (--max-volume-mb)",
        )


def _bytes(n: int) -> str:
    """A byte count in MiB or GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


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
