"""Transcoding on retrieve, the pure part: every compressed syntax among pydicom's test files
decoded to uncompressed with the pixel values pydicom itself decodes, lossless re-encoding,
the lossy fallback, and what cannot be converted (an error, never a broken dataset)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from p2pacs.dicom import build_prefix, split_part10, validate_dataset
from p2pacs.dicom.transcode import (
    Plan,
    choose_target,
    decodable,
    deliverable_for_all,
    transcode,
)
from p2pacs.errors import TranscodeError

# pydicom test files whose pixel data no installed decoder reads, with why: they must fail
# with TranscodeError (a counted sub-operation failure on retrieve), never give a dataset
NOT_CONVERTIBLE = {
    "JPEG-lossy.dcm": "JPEG Extended, 12-bit samples: only the GPL pylibjpeg-libjpeg decodes it",
    "JPGExtended.dcm": "JPEG Extended, 12-bit samples: only the GPL pylibjpeg-libjpeg decodes it",
    "JPEG2000-embedded-sequence-delimiter.dcm": "its JPEG 2000 codestream is corrupt",
}


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def _decode(sop: Dataset, ts: str, data: bytes) -> Dataset:
    """A converted dataset as a file pydicom reads (our file meta in front)."""
    prefix = build_prefix(str(sop.SOPClassUID), str(sop.SOPInstanceUID), ts)
    return pydicom.dcmread(io.BytesIO(prefix + data))


@pytest.fixture(scope="module")
def compressed_files(pydicom_all_files: list[Path], pydicom_broken: dict[Path, str]) -> list[Path]:
    """pydicom's Part-10 test files in a compressed syntax with pixel data (not only those an
    archive indexes: the JPEG-LS near-lossless samples lack study keys), less the broken."""
    out = []
    for p in pydicom_all_files:
        if p in pydicom_broken:
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            ts = ds.file_meta.TransferSyntaxUID
            split_part10(p.read_bytes())
        except Exception:  # pydicom's deliberately broken or non-DICOM files
            continue
        if ts.is_compressed and "PixelData" in _read(p):
            out.append(p)
    assert len(out) > 20
    return out


def test_every_compressed_syntax_decodes_to_what_pydicom_decodes(
    compressed_files: list[Path],
) -> None:
    syntaxes: dict[str, int] = {}
    failed = set()
    for path in compressed_files:
        part = split_part10(path.read_bytes())
        original = _read(path)
        ts = part.transfer_syntax
        for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            try:
                out = transcode(part.dataset, ts, Plan(target))
            except TranscodeError as exc:
                assert path.name in NOT_CONVERTIBLE, f"{path.name}: {exc}"
                failed.add(path.name)
                continue
            validate_dataset(out, target)
            got = _decode(original, target, out)
            assert got.SOPInstanceUID == original.SOPInstanceUID
            assert got.file_meta.TransferSyntaxUID == target
            want = original.pixel_array
            assert got.pixel_array.shape == want.shape, path.name
            assert np.array_equal(got.pixel_array, want), path.name
            # every attribute outside the image pixel module is unchanged (group lengths,
            # retired (PS3.5 7.2), are left out by pydicom's writer; implicit VR loses the VR
            # of private elements, so their bytes read back as another type there)
            for elem in original:
                if elem.tag.group in (0x0028, 0x7FE0) or elem.tag.element == 0:
                    continue
                if not elem.tag.is_private or target == ExplicitVRLittleEndian:
                    assert got[elem.tag].value == elem.value, (path.name, elem.tag)
            syntaxes[ts] = syntaxes.get(ts, 0) + 1
    assert failed == set(NOT_CONVERTIBLE)
    # every compressed family pydicom ships a sample of came through at least once
    names = {UID(ts).name for ts in syntaxes}
    for family in ("JPEG Baseline", "JPEG Lossless", "JPEG-LS Lossless", "JPEG-LS Lossy"):
        assert any(n.startswith(family) for n in names), (family, names)
    for uid in (JPEG2000Lossless, JPEG2000, RLELossless, JPEGBaseline8Bit):
        assert uid in syntaxes, uid.name


@pytest.mark.parametrize(
    "target", [RLELossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless]
)
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_rle.dcm"])
def test_lossless_targets_keep_every_pixel(
    pydicom_files: list[Path], name: str, target: str
) -> None:
    path = next(p for p in pydicom_files if p.name == name)
    part = split_part10(path.read_bytes())
    original = _read(path)
    out = transcode(part.dataset, part.transfer_syntax, Plan(target))
    got = _decode(original, target, out)
    assert got.file_meta.TransferSyntaxUID == target
    assert np.array_equal(got.pixel_array, original.pixel_array)
    assert "LossyImageCompression" not in got or got.LossyImageCompression == original.get(
        "LossyImageCompression"
    )


def test_big_endian_and_deflated(pydicom_files: list[Path]) -> None:
    big = [p for p in pydicom_files if "expb" in p.name or p.name == "ExplVR_BigEnd.dcm"]
    assert big
    for path in big:
        part = split_part10(path.read_bytes())
        assert part.transfer_syntax == ExplicitVRBigEndian
        original = _read(path)
        for target in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless):
            try:
                out = transcode(part.dataset, part.transfer_syntax, Plan(target))
            except TranscodeError:
                assert target == RLELossless  # e.g. RLE cannot hold 32-bit multi-sample
                continue
            got = _decode(original, target, out)
            assert np.array_equal(got.pixel_array, original.pixel_array), (path.name, target)


def test_lossy_plan_marks_the_dataset(pydicom_files: list[Path]) -> None:
    path = next(p for p in pydicom_files if p.name == "CT_small.dcm")
    part = split_part10(path.read_bytes())
    original = _read(path)
    out = transcode(part.dataset, part.transfer_syntax, Plan(JPEG2000, lossy=True))
    got = _decode(original, JPEG2000, out)
    assert got.LossyImageCompression == "01"
    assert "ISO_15444_1" in list(np.atleast_1d(got.LossyImageCompressionMethod))
    assert got.pixel_array.shape == original.pixel_array.shape
    # lossy, but close: the mean absolute error is a small part of the range
    diff = np.abs(got.pixel_array.astype(float) - original.pixel_array.astype(float))
    assert diff.mean() < 0.02 * float(np.ptp(original.pixel_array))


def test_cannot_encode_into_an_unsupported_syntax(pydicom_files: list[Path]) -> None:
    path = next(p for p in pydicom_files if p.name == "CT_small.dcm")
    part = split_part10(path.read_bytes())
    with pytest.raises(TranscodeError, match="cannot encode"):
        transcode(part.dataset, part.transfer_syntax, Plan(JPEGBaseline8Bit))
    # an element cut short: pydicom would read past it; transcode refuses
    with pytest.raises(TranscodeError, match=r"malformed|past"):
        transcode(b"\x08\x00\x05\x00CS\x10\x00ab", ExplicitVRLittleEndian, Plan(RLELossless))
    with pytest.raises(TranscodeError, match="Bits Allocated"):  # pixel data, no image module
        raw = b"\xe0\x7f\x10\x00OW\x00\x00\x02\x00\x00\x00ab"
        transcode(raw, ExplicitVRLittleEndian, Plan(RLELossless))


def test_choose_target() -> None:
    # as stored when accepted, whatever else was
    assert choose_target(JPEG2000, [ExplicitVRLittleEndian, JPEG2000]) == Plan(JPEG2000)
    # uncompressed first (explicit VR preferred), then lossless compressed in requester order
    assert choose_target(JPEG2000, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]) == Plan(
        ExplicitVRLittleEndian
    )
    assert choose_target(ExplicitVRLittleEndian, [JPEGBaseline8Bit, RLELossless]) == Plan(
        RLELossless
    )
    # nothing deliverable: None; lossy only when allowed (JPEG 2000, JPEG Baseline)
    assert choose_target(ExplicitVRLittleEndian, [JPEGBaseline8Bit]) is None
    assert choose_target(ExplicitVRLittleEndian, [JPEG2000]) is None
    assert choose_target(ExplicitVRLittleEndian, [JPEG2000], allow_lossy=True) == Plan(
        JPEG2000, lossy=True
    )
    assert choose_target(ExplicitVRLittleEndian, [JPEGBaseline8Bit], allow_lossy=True) == Plan(
        JPEGBaseline8Bit, lossy=True
    )
    # a syntax with no decoder installed cannot be converted at all
    mpeg2 = "1.2.840.10008.1.2.4.100"
    assert not decodable(mpeg2)
    assert choose_target(mpeg2, [ExplicitVRLittleEndian]) is None
    assert decodable(JPEGExtended12Bit)  # a decoder exists (GDCM), for 8-bit samples only
    assert choose_target(ExplicitVRLittleEndian, []) is None
    assert deliverable_for_all(ExplicitVRLittleEndian)
    assert deliverable_for_all(JPEG2000Lossless)
    assert not deliverable_for_all(JPEGBaseline8Bit)
    assert not deliverable_for_all(JPEG2000)


def test_failed_conversions_log_no_tracebacks(
    pydicom_all_files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom logs a traceback for every plugin that fails to decode; during ``transcode``
    that is dropped (the error carries pydicom's message), elsewhere it is kept."""
    path = next(p for p in pydicom_all_files if p.name == "JPEG-lossy.dcm")
    part = split_part10(path.read_bytes())
    with caplog.at_level("DEBUG", logger="pydicom"):
        with pytest.raises(TranscodeError, match="12-bit precision"):
            transcode(part.dataset, part.transfer_syntax, Plan(ExplicitVRLittleEndian))
        assert not [r for r in caplog.records if r.name.startswith("pydicom.pixels")]
        with pytest.raises(RuntimeError):
            _read(path).pixel_array  # noqa: B018
        assert [r for r in caplog.records if r.name.startswith("pydicom.pixels")]
