"""Helpers for the server tests: volumes in each upload format, and a live server on loopback."""

from __future__ import annotations

import contextlib
import gzip
import io
import socket
import threading
import time
import zipfile
from collections.abc import Iterator

import nibabel as nib
import numpy as np
from pydicom.uid import generate_uid

from dicom_helpers import ct_slice
from med2e3.data.synth import SynthConfig, case_rng, generate_volume
from med2e3.inference import Med2E3Predictor
from med2e3.server import ServerSettings, create_app

# ---- volumes ----------------------------------------------------------------------------------------


def synthetic_ct(shape: tuple[int, int, int] = (40, 96, 96), index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An axial synthetic CT: int16 HU in NIfTI voxel order (i, j, k) and its affine."""
    cfg = SynthConfig(shape=shape, plane_probs={"axial": 1.0})
    volume, affine, _ = generate_volume(case_rng(7, index), cfg)
    return volume, affine


def npy_bytes(shape: tuple[int, ...] = (1, 24, 40, 48), seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32))
    return buffer.getvalue()


def nifti_bytes(compress: bool = True) -> bytes:
    volume, affine = synthetic_ct()
    raw = nib.Nifti1Image(volume, affine).to_bytes()
    return gzip.compress(raw) if compress else raw


def dicom_file_bytes(image: np.ndarray, k: int, series: str, study: str, step: float = 2.5) -> bytes:
    """One CT slice (uint16 stored, HU = stored - 1024) of an axial series."""
    ds = ct_slice(image, k, series, study, (-40.0, -40.0, 100.0 + k * step), thickness=step)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_zip_bytes(
    n_slices: int = 12, extra: dict[str, bytes] | None = None, damaged: dict[int, bytes] | None = None
) -> bytes:
    """A zipped axial DICOM series (in a subfolder, plus a non-DICOM readme that must be skipped);
    ``damaged`` replaces the file of slice k with other bytes."""
    rng = np.random.default_rng(0)
    series, study = generate_uid(), generate_uid()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for k in range(n_slices):
            image = rng.integers(900, 1300, size=(32, 40))
            data = dicom_file_bytes(image, k, series, study)
            archive.writestr(f"series/IM{k:04d}", (damaged or {}).get(k, data))
        archive.writestr("README.txt", "not DICOM")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def upload(client: object, data: bytes, name: str = "volume.bin") -> object:
    return client.post("/api/volumes", files={"file": (name, data)})  # type: ignore[attr-defined]


# ---- a live server on loopback (for the browser test) ------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(predictor: Med2E3Predictor, **settings: object) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    app = create_app(predictor, ServerSettings(**settings), model_name="tiny")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
