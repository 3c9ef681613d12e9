"""JPEG Baseline (Process 1) encoding with Pillow: the lossy target a requester gets when it
accepts nothing else and lossy transcoding is allowed (``transcode.LOSSY_TARGETS``).

pydicom has no JPEG Baseline encoder; Pillow's libjpeg has (Pillow: MIT-CMU licence). JPEG
Baseline holds unsigned 8-bit samples only (PS3.5 A.4.1), so only such images are encoded:
grayscale (MONOCHROME1/2) as is, colour as RGB compressed in YCbCr without subsampling, hence
Photometric Interpretation YBR_FULL (PS3.5 8.2.1). Anything else raises ``TranscodeError`` (a
counted failure, never a corrupt file).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, features
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from p2pacs.errors import TranscodeError

__all__ = ["JPEG_QUALITY", "available", "encode_jpeg_baseline"]

JPEG_QUALITY = 90  # libjpeg quality: visually lossless for 8-bit images at roughly 5-10:1
_GRAY = ("MONOCHROME1", "MONOCHROME2")


def available() -> bool:
    """Whether Pillow was built with a JPEG codec."""
    return bool(features.check_codec("jpg"))


def encode_jpeg_baseline(ds: Dataset, arr: Any, quality: int = JPEG_QUALITY) -> float:
    """Replace the native pixel data of ``ds`` (decoded as ``arr``: pydicom's ``pixel_array``,
    colour as RGB) by JPEG Baseline frames; returns the compression ratio (native bytes over
    compressed bytes) for Lossy Image Compression Ratio."""
    bits, stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if bits != 8 or stored != 8 or int(ds.get("PixelRepresentation", 0) or 0) != 0:
        raise TranscodeError(
            f"JPEG Baseline holds unsigned 8-bit samples only, not {stored} of {bits} bits"
            f"{' signed' if ds.get('PixelRepresentation') else ''}"
        )
    if not ((samples == 1 and photometric in _GRAY) or samples == 3):
        raise TranscodeError(f"JPEG Baseline cannot hold {photometric} with {samples} samples")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    frames = np.asarray(arr, dtype=np.uint8).reshape(
        (count, int(ds.Rows), int(ds.Columns), *((3,) if samples == 3 else ()))
    )
    encoded = []
    for frame in frames:
        out = io.BytesIO()
        image = Image.fromarray(frame, mode="RGB" if samples == 3 else "L")
        image.save(out, format="JPEG", quality=quality, subsampling=0)  # 4:4:4
        encoded.append(out.getvalue())
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if samples == 3:
        ds.PhotometricInterpretation = "YBR_FULL"
        ds.PlanarConfiguration = 0
    return frames.nbytes / max(1, sum(len(e) for e in encoded))
