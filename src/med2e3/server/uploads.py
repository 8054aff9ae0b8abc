"""Receive an upload into a server-owned folder and turn it into something `load_volume` reads.

The content decides what a file is (magic bytes), never its name: gzip or NIfTI header -> NIfTI,
``\\x93NUMPY`` -> .npy, ``PK\\x03\\x04`` -> a zipped DICOM series ('DICM' at byte 128 of each file).
Headers are checked before anything is decoded: declared voxel counts, zip entry names, types,
counts and sizes. Files are written under server-generated names only.
"""

from __future__ import annotations

import gzip
import math
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from med2e3.errors import VolumeError
from med2e3.server.settings import MB, ServerSettings

Kind = Literal["nifti", "nifti-gz", "npy", "zip"]

FILE_FIELD = "file"
_CHUNK = 1024 * 1024
_FORM_SLACK = 64 * 1024  # multipart framing and small fields around the file
_NPY_MAGIC = b"\x93NUMPY"
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP = b"PK\x05\x06"
_DICM_OFFSET = 128
_LABEL_CHARS = re.compile(r"[^\w.\- ()+]")


class UploadError(VolumeError):
    """An upload that is refused; ``status`` is the HTTP status to answer with (400, 413 or 415)."""

    def __init__(self, label: str | None, reason: str, status: int = 400):
        super().__init__(label, reason)
        self.status = status


def safe_label(filename: str | None) -> str:
    """The client's file name reduced to a short display label (never used as a path)."""
    name = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    name = _LABEL_CHARS.sub("_", name).strip() or "upload"
    return name[:80]


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MB"


# ---- multipart ------------------------------------------------------------------------------------


async def receive_upload(
    chunks: AsyncIterator[bytes], content_type: str | None, dest: Path, max_bytes: int
) -> str:
    """Stream the ``file`` field of a multipart body into ``dest``; return the file's display label.

    Raises:
        UploadError: not multipart (415), no file field (400), or more than ``max_bytes`` (413).
    """
    mime, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise UploadError(None, f"send the volume as multipart/form-data with a '{FILE_FIELD}' field", 415)
    sink = _FileSink(dest, max_bytes)
    parser = MultipartParser(boundary, sink.callbacks(), max_header_count=16)
    total = 0
    try:
        async for chunk in chunks:
            total += len(chunk)
            if total > max_bytes + _FORM_SLACK:
                raise UploadError(sink.label, f"the upload is larger than the {_mb(max_bytes)} limit", 413)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(sink.label, f"malformed multipart body ({exc})") from None
    finally:
        sink.close()
    if not sink.found:
        raise UploadError(None, f"the form has no '{FILE_FIELD}' field with a file")
    if sink.size == 0:
        raise UploadError(sink.label, "the file is empty")
    return sink.label


class _FileSink:
    """Multipart callbacks that write the first ``file`` part to ``dest`` and count its bytes."""

    def __init__(self, dest: Path, max_bytes: int):
        self.dest = dest
        self.max_bytes = max_bytes
        self.found = False
        self.label: str | None = None
        self.size = 0
        self._out = None
        self._headers: dict[str, str] = {}
        self._field = b""
        self._value = b""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self.close,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", ""))
        name = options.get(b"name", b"").decode("latin-1")
        if name == FILE_FIELD and b"filename" in options and not self.found:
            self.found = True
            self.label = safe_label(options[b"filename"].decode("utf-8", "replace"))
            self._out = self.dest.open("xb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._out is None:
            return
        self.size += end - start
        if self.size > self.max_bytes:
            raise UploadError(self.label, f"the file is larger than the {_mb(self.max_bytes)} limit", 413)
        self._out.write(data[start:end])

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


# ---- content --------------------------------------------------------------------------------------


def sniff(head: bytes, label: str) -> Kind:
    """What the first bytes of an upload say it is.

    Raises:
        UploadError: unknown or unsupported content (415).
    """
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_GZIP_MAGIC):
        return "nifti-gz"
    if head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP):
        return "zip"
    if _nifti_dims(head) is not None:
        return "nifti"
    if head[_DICM_OFFSET : _DICM_OFFSET + 4] == b"DICM":
        raise UploadError(
            label, "a single DICOM file is one 2D slice: upload the series folder as a .zip", 415
        )
    raise UploadError(
        label,
        "unsupported content: expected a NIfTI file (.nii or .nii.gz), a zipped DICOM series (.zip) "
        "or a NumPy array (.npy)",
        415,
    )


def prepare_upload(raw: Path, folder: Path, label: str, settings: ServerSettings) -> Path:
    """Validate the received file ``raw`` and lay it out in ``folder`` for `load_volume`; return that path.

    Raises:
        UploadError: refused content (400, 413 or 415).
    """
    with raw.open("rb") as f:
        head = f.read(544)
    kind = sniff(head, label)
    if kind == "npy":
        check_npy(raw, label, settings.max_voxels)
        return raw.rename(folder / "volume.npy")
    if kind == "nifti":
        check_nifti_header(head, label, settings.max_voxels)
        return raw.rename(folder / "volume.nii")
    if kind == "nifti-gz":
        check_nifti_header(_gunzip_head(raw, label), label, settings.max_voxels)
        return raw.rename(folder / "volume.nii.gz")
    series = folder / "dicom"
    series.mkdir()
    try:
        extract_dicom_zip(raw, series, label, settings.max_zip_entries, settings.max_extracted_bytes)
    finally:
        raw.unlink()
    return series


def _gunzip_head(path: Path, label: str) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read(544)
    except (OSError, EOFError, zlib.error) as exc:
        raise UploadError(label, f"not a readable gzip file ({exc})") from None


def _nifti_dims(header: bytes) -> tuple[int, ...] | None:
    """The image dimensions a single-file NIfTI-1 or NIfTI-2 header declares, or None if it is not one."""
    if len(header) < 348:
        return None
    for order in "<>":
        (size,) = struct.unpack(order + "i", header[:4])
        if size == 348 and header[344:348] == b"n+1\0":
            dim = struct.unpack(order + "8h", header[40:56])
        elif size == 540 and len(header) >= 540 and header[4:8] == b"n+2\0":
            dim = struct.unpack(order + "8q", header[16:80])
        else:
            continue
        return tuple(dim[1 : 1 + max(0, min(int(dim[0]), 7))])
    return None


def check_nifti_header(header: bytes, label: str, max_voxels: int) -> None:
    """Refuse a (decompressed) NIfTI header that is not a single-file NIfTI or declares too many voxels."""
    dims = _nifti_dims(header)
    if dims is None:
        raise UploadError(
            label, "gzip content is not a single-file NIfTI image (no 'n+1' / 'n+2' header)", 415
        )
    if not dims or min(dims) < 1:
        raise UploadError(label, f"the NIfTI header declares invalid dimensions {dims}")
    _check_voxel_count(math.prod(dims), dims, label, max_voxels)


def check_npy(path: Path, label: str, max_voxels: int) -> None:
    """Refuse a .npy whose header is unreadable, non-numeric, too large, or longer than the file."""
    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0
            if version != (1, 0):
                reader = np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(f, max_header_size=10_000)
        except ValueError as exc:
            raise UploadError(label, f"not a readable .npy array ({exc})") from None
        offset = f.tell()
    if dtype.hasobject or dtype.kind not in "biuf":
        raise UploadError(label, f"voxels must be real numbers, got dtype {dtype}")
    _check_voxel_count(math.prod(shape), shape, label, max_voxels)
    if path.stat().st_size < offset + math.prod(shape) * dtype.itemsize:
        raise UploadError(label, f"the .npy file is truncated (shape {tuple(shape)}, dtype {dtype})")


def _check_voxel_count(n: int, shape: tuple[int, ...], label: str, max_voxels: int) -> None:
    if n > max_voxels:
        raise UploadError(
            label, f"shape {tuple(shape)} has {n:,} voxels, more than the {max_voxels:,} limit", 413
        )


# ---- zipped DICOM series --------------------------------------------------------------------------


def _entry_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry is refused, or None."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "has a '..' path component"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    if info.flag_bits & 0x1:
        return "is encrypted"
    return None


def extract_dicom_zip(src: Path, dest: Path, label: str, max_entries: int, max_bytes: int) -> int:
    """Write the DICOM files of the zip ``src`` into ``dest``; return their count.

    Entry names are checked (no absolute paths, '..', symlinks or encryption) and never used as
    paths: files are written as ``00000-NAME.dcm``, ``00001-NAME.dcm``, ... where NAME is the stem of
    the entry's `safe_label`, so that a reader's error can name the entry. The declared sizes must fit
    ``max_bytes`` and so must the bytes actually decompressed. Entries without 'DICM' at byte 128
    are skipped, unless they sit next to DICOM entries with their extension (a damaged slice, which
    the reader then reports).

    Raises:
        UploadError: a refused or corrupt archive (400), too many entries or bytes (413), no DICOM (415).
    """
    try:
        with zipfile.ZipFile(src) as archive:
            infos = archive.infolist()
            if len(infos) > max_entries:
                raise UploadError(
                    label, f"the zip holds {len(infos)} entries, more than the {max_entries} limit", 413
                )
            for info in infos:
                problem = _entry_problem(info)
                if problem:
                    raise UploadError(label, f"zip entry {info.filename[:100]!r} {problem}")
            declared = sum(info.file_size for info in infos)
            if declared > max_bytes:
                raise UploadError(
                    label, f"the zip expands to {_mb(declared)}, more than the {_mb(max_bytes)} limit", 413
                )
            return _copy_dicom_entries(archive, infos, dest, label, max_bytes)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise UploadError(label, f"not a valid zip archive ({str(exc)[:120]})") from None


def _copy_dicom_entries(
    archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path, label: str, max_bytes: int
) -> int:
    """Copy the DICOM entries (and look-alikes), counting every decompressed byte against ``max_bytes``."""
    files = [info for info in infos if not info.is_dir()]
    dicom = [_is_dicom(archive, info) for info in files]
    if not any(dicom):
        raise UploadError(label, "the zip holds no DICOM files (no 'DICM' marker at byte 128)", 415)
    places = {_entry_place(info) for info, is_dicom in zip(files, dicom, strict=True) if is_dicom}
    keep = [i for i, d in zip(files, dicom, strict=True) if d or _entry_place(i) in places]
    expanded = 0
    for count, info in enumerate(keep):
        name = PurePosixPath(safe_label(info.filename)).stem
        with archive.open(info) as entry, (dest / f"{count:05d}-{name}.dcm").open("xb") as out:
            while chunk := entry.read(_CHUNK):
                expanded += len(chunk)
                if expanded > max_bytes:
                    raise UploadError(label, f"the zip expands past the {_mb(max_bytes)} limit", 413)
                out.write(chunk)
    return len(keep)


def _is_dicom(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    with archive.open(info) as entry:
        return entry.read(_DICM_OFFSET + 4)[_DICM_OFFSET:] == b"DICM"


def _entry_place(info: zipfile.ZipInfo) -> tuple[str, str]:
    """An entry's folder and extension: entries in the same place as DICOM slices should be slices."""
    path = PurePosixPath(info.filename.replace("\\", "/"))
    return str(path.parent), path.suffix.lower()
