"""Lossy JPEG Baseline on retrieve (p2pacs/dicom/jpegbaseline.py through ``transcode``): 8-bit
grayscale and colour images encoded with Pillow, decoded again with GDCM (the decoder the
archive uses) close to the original, marked lossy; other images refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from p2pacs.dicom import split_part10
from p2pacs.dicom.transcode import Plan, choose_target, transcode
from p2pacs.errors import TranscodeError

LOSSY = Plan(JPEGBaseline8Bit, lossy=True)


def _gray8(frames: int = 1) -> bytes:
    """An 8-bit MONOCHROME2 image (a gradient with noise), as dataset bytes."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:96, 0:128]
    base = ((x + y) * 255 / (96 + 128)).astype(np.float64)
    arr = np.clip(base[None] + rng.normal(0, 4, (frames, 96, 128)), 0, 255).astype(np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 96, 128, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = arr.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return bytes(split_part10(out.getvalue()).dataset)


def _decode(data: bytes, ts: str) -> pydicom.Dataset:
    native = transcode(data, ts, Plan(ExplicitVRLittleEndian))  # GDCM decodes JPEG Baseline
    ds = pydicom.dcmread(io.BytesIO(native), force=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.mark.parametrize("frames", [1, 3])
def test_gray_8_bit_is_encoded_lossy_and_decodes_close(frames: int) -> None:
    raw = _gray8(frames)
    assert choose_target(ExplicitVRLittleEndian, [JPEGBaseline8Bit], allow_lossy=True) == LOSSY
    out = transcode(raw, ExplicitVRLittleEndian, LOSSY)
    ds = pydicom.dcmread(io.BytesIO(out), force=True)
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(ds.LossyImageCompressionRatio) > 1.5
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    got = _decode(out, JPEGBaseline8Bit).pixel_array.astype(float)
    want = _decode(raw, ExplicitVRLittleEndian).pixel_array.astype(float)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 3.0 and not np.array_equal(got, want)  # lossy, close


def test_rgb_8_bit_from_a_compressed_file(pydicom_all_files: list[Path]) -> None:
    path = next(p for p in pydicom_all_files if p.name == "SC_rgb_rle_2frame.dcm")
    part = split_part10(path.read_bytes())
    out = transcode(part.dataset, part.transfer_syntax, LOSSY)
    ds = pydicom.dcmread(io.BytesIO(out), force=True)
    assert ds.PhotometricInterpretation == "YBR_FULL" and ds.LossyImageCompression == "01"
    got = _decode(out, JPEGBaseline8Bit).pixel_array.astype(float)
    want = pydicom.dcmread(path).pixel_array.astype(float)
    assert got.shape == want.shape == (2, 100, 100, 3)
    assert np.abs(got - want).mean() < 4.0


def test_other_images_are_refused_never_corrupted(pydicom_all_files: list[Path]) -> None:
    for name, why in [
        ("CT_small.dcm", "unsigned 8-bit samples only"),  # 16-bit signed
        ("MR_small.dcm", "unsigned 8-bit samples only"),
        ("examples_palette.dcm", "cannot hold PALETTE COLOR"),
    ]:
        path = next(p for p in pydicom_all_files if p.name == name)
        part = split_part10(path.read_bytes())
        with pytest.raises(TranscodeError, match=why):
            transcode(part.dataset, part.transfer_syntax, LOSSY)
