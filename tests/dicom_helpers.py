"""A CT slice as a pydicom dataset, shared by the I/O and the server tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_slice(
    image: np.ndarray,
    k: int,
    series: str,
    study: str,
    position: Sequence[float],
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (0.8, 0.8),
    thickness: float = 2.5,
    dtype: type = np.uint16,
) -> Dataset:
    """Slice ``k`` (0-based) of a CT series: stored values ``image``, HU = stored - 1024."""
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "CT"
    ds.InstanceNumber = k + 1
    ds.Rows, ds.Columns = image.shape
    ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = thickness
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [float(x) for x in position]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(np.dtype(dtype).kind == "i")
    ds.PixelData = image.astype(dtype).tobytes()
    return ds
