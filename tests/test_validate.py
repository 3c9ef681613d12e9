"""Structural validation (``p2pacs.dicom.validate``) on real files and round-tripped encodings.

No sockets: bytes in, an exception or nothing out. Inputs are pydicom's test files and datasets
encoded with pydicom's writer; each defect is then made by cutting or appending raw bytes.
What was found and is pinned here:
- every file of pydicom's test folder that p2pacs archived before validation passes it, but for
  three that are structurally broken (``PYDICOM_BROKEN`` in conftest.py), which dcmdump refuses
  too; ``image_dfl.dcm`` (David Clunie's dctool) ends its deflate stream with a gzip-style
  CRC-32 + size trailer, which is accepted because it checks out;
- a prefix of a valid dataset passes exactly when it ends at a top-level element boundary
  (pydicom's reader is the oracle for where those are); every other cut is refused.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from p2pacs.dicom import extract_attributes, split_part10
from p2pacs.dicom.validate import validate_dataset
from p2pacs.errors import InvalidDicomError, MalformedDatasetError
from p2pacs.samples import pydicom_test_files

JPEG = "1.2.840.10008.1.2.4.51"  # JPEG Extended, what JPEG-lossy.dcm is in
_FILES = {p.name: p for p in pydicom_test_files()}


def _part(name: str) -> tuple[bytes, str]:
    part = split_part10(_FILES[name].read_bytes())
    return bytes(part.dataset), part.transfer_syntax


def _refused(data: bytes, ts: str, *fragments: str) -> str:
    with pytest.raises(MalformedDatasetError) as info:
        validate_dataset(data, ts)
    msg = str(info.value)
    assert "at byte" in msg or "deflate" in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def _encode(ds: Dataset, ts: str) -> bytes:
    """``ds``'s elements encoded by pydicom's writer in ``ts`` (deflated the way pydicom does)."""
    uid = UID(ts)
    fp = DicomBytesIO()
    fp.is_little_endian = uid.is_little_endian
    fp.is_implicit_VR = uid.is_implicit_VR
    write_dataset(fp, ds)
    data = fp.getvalue()
    if uid.is_deflated:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
        data += b"\0" * (len(data) % 2)
    return data


def _ct() -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(_FILES["CT_small.dcm"])


def _item(**keys: str) -> Dataset:
    item = Dataset()
    for k, v in keys.items():
        setattr(item, k, v)
    return item


def _nested() -> Dataset:
    """CT_small with sequences of both lengths nested three deep, items of both lengths."""
    ds = _ct()
    code = _item(CodeValue="113076", CodingSchemeDesignator="DCM", CodeMeaning="Segmentation")
    inner = _item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", ReferencedSOPInstanceUID="1.2")
    inner.PurposeOfReferenceCodeSequence = Sequence([code])
    inner["PurposeOfReferenceCodeSequence"].is_undefined_length = True  # undefined in defined
    first = _item(SeriesInstanceUID="1.2.3")
    first.ReferencedInstanceSequence = Sequence([inner, _item(ReferencedSOPInstanceUID="1.3")])
    first.is_undefined_length_sequence_item = True
    ds.ReferencedSeriesSequence = Sequence([first, _item(SeriesInstanceUID="1.2.4")])
    ds["ReferencedSeriesSequence"].is_undefined_length = True
    ds.DerivationCodeSequence = Sequence([code, code])  # defined length, defined items
    return ds


def _boundaries(data: bytes, ts: str) -> set[int]:
    """Where pydicom's reader finds each top-level element ending (the oracle)."""
    uid = UID(ts)
    fp = io.BytesIO(data)
    out = set()
    for _ in data_element_generator(fp, uid.is_implicit_VR, uid.is_little_endian):
        out.add(fp.tell())
    assert fp.tell() == len(data)
    return out


# --- no false positives -------------------------------------------------------------------------


def test_every_archivable_pydicom_file_passes(
    pydicom_all_files: list[Path], pydicom_broken: dict[Path, str]
) -> None:
    checked = 0
    for path in pydicom_all_files:
        try:
            part = split_part10(path.read_bytes())
            extract_attributes(part.dataset, part.transfer_syntax)
        except InvalidDicomError:
            continue  # not archivable anyway (see test_archive)
        checked += 1
        if path in pydicom_broken:
            with pytest.raises(MalformedDatasetError):
                validate_dataset(part.dataset, part.transfer_syntax)
        else:
            validate_dataset(part.dataset, part.transfer_syntax)
            validate_dataset(bytes(part.dataset), part.transfer_syntax)
    assert checked > 140


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk's dcmdump is not installed")
def test_dcmdump_refuses_the_broken_pydicom_files_too(pydicom_broken: dict[Path, str]) -> None:
    for path in pydicom_broken:
        done = subprocess.run(
            ["dcmdump", "-q", str(path)], check=False, capture_output=True, timeout=60
        )
        assert done.returncode != 0, path.name


def test_other_real_structures_pass() -> None:
    """UN of undefined length (a sequence in implicit VR, PS3.5 6.2.2) from GDCM, a private
    sequence, a gzip-trailed deflated dataset, native YBR_FULL_422 (two samples per pixel)."""
    for name in (
        "UN_sequence.dcm",
        "priv_SQ.dcm",
        "image_dfl.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
    ):
        validate_dataset(*_part(name))


# --- the bug report: what dcmtk's storescp refuses ------------------------------------------------


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_pixel_data_cut_short_as_sent(fraction: float) -> None:
    data, ts = _part("CT_small.dcm")
    _refused(data[: int(len(data) * fraction)], ts, "(7FE0,0010)", "runs past", "byte 5952")


def test_pixel_data_cut_short_and_re_encoded() -> None:
    """pydicom reads the 50% cut without a word (13,471 bytes of pixels) and writes it back
    padded to 13,472: structurally whole, but 128 x 128 x 16 bits need 32,768."""
    raw = _FILES["CT_small.dcm"].read_bytes()
    part = split_part10(raw)
    cut = raw[: len(part.prefix) + len(part.dataset) // 2]
    ds = pydicom.dcmread(io.BytesIO(cut))
    assert len(ds.PixelData) % 2 == 1
    _refused(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian, "need 32768")


def test_element_running_past_the_end() -> None:
    data, ts = _part("CT_small.dcm")
    extra = struct.pack("<HH2sHI", 0x7FE1, 0x0010, b"OB", 0, 100_000) + b"\0" * 64
    _refused(data + extra, ts, f"byte {len(data)}", "(7FE1,0010)", "value length 100000")


def test_undefined_length_sequence_never_closed() -> None:
    data, ts = _part("CT_small.dcm")
    extra = struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"SQ", 0, 0xFFFFFFFF)
    extra += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    extra += struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 4) + b"1234"
    _refused(data + extra, ts, "(FFFE,E000) item inside (7FE1,1010)", "not closed")
    closed = extra + struct.pack("<HHIHHI", 0xFFFE, 0xE00D, 0, 0xFFFE, 0xE0DD, 0)
    validate_dataset(data + closed, ts)
    _refused(data + closed[:-8], ts, "(7FE1,1010)", "sequence of undefined length", "not closed")


# --- each defect, in each encoding ------------------------------------------------------------


def _elem(ts: str, group: int, elem: int, vr: bytes, value: bytes, *, length: int = -1) -> bytes:
    """One element in ``ts`` (uncompressed), with ``length`` instead of the real one if given."""
    uid = UID(ts)
    e = "<" if uid.is_little_endian else ">"
    n = len(value) if length < 0 else length
    if uid.is_implicit_VR:
        return struct.pack(f"{e}HHI", group, elem, n) + value
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack(f"{e}HH2sHI", group, elem, vr, 0, n) + value
    return struct.pack(f"{e}HH2sH", group, elem, vr, n) + value


def _delim(ts: str, elem: int, length: int = 0) -> bytes:
    return struct.pack("<HHI" if UID(ts).is_little_endian else ">HHI", 0xFFFE, elem, length)


UNCOMPRESSED = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]


@pytest.mark.parametrize("ts", UNCOMPRESSED)
def test_defects(ts: str) -> None:
    ds = _nested()
    ok = _encode(ds, ts)
    validate_dataset(ok, ts)
    end = len(ok)
    # a partial element after the last one; a long header cut short (explicit VR)
    _refused(ok + b"\0" * 5, ts, f"byte {end}", "5 byte(s) left")
    if not UID(ts).is_implicit_VR:
        _refused(ok + _elem(ts, 0x7FE1, 0x10, b"OB", b"")[:10], ts, "header cut short")
        _refused(ok + _elem(ts, 0x7FE1, 0x10, b"ZZ", b"ab"), ts, "not a value representation")
    # odd value length (PS3.5 7.1.1), in implicit VR too
    _refused(ok + _elem(ts, 0x7FE1, 0x10, b"LO", b"odd"), ts, "(7FE1,0010)", "odd value length 3")
    # trailing padding is an element like any other
    validate_dataset(ok + _elem(ts, 0xFFFC, 0xFFFC, b"OB", b"\0" * 8), ts)
    # delimiters where an element belongs
    _refused(ok + _delim(ts, 0xE00D), ts, "(FFFE,E00D)", "where a data element belongs")
    _refused(ok + _delim(ts, 0xE000, 0), ts, "(FFFE,E000)", "where a data element belongs")
    # a defined-length sequence: items must fill it exactly
    code = _elem(ts, 0x0008, 0x0100, b"SH", b"1234")
    item = _delim(ts, 0xE000, len(code)) + code
    sq = 0x0008, 0x1140, b"SQ"  # ReferencedImageSequence: the dictionary says SQ
    validate_dataset(ok + _elem(ts, *sq, item), ts)
    _refused(ok + _elem(ts, *sq, item, length=12) + item[12:], ts, "item length 12 runs past")
    _refused(ok + _elem(ts, *sq, item + b"\0" * 8), ts, "inside (0008,1140)", "an item (FFFE,E000)")
    _refused(ok + _elem(ts, *sq, item + _delim(ts, 0xE0DD)), ts, "(FFFE,E0DD) inside (0008,1140)")
    # an undefined-length sequence: closed by its delimiter, delimiters of length 0
    usq = _elem(ts, *sq, b"", length=0xFFFFFFFF)
    validate_dataset(ok + usq + item + _delim(ts, 0xE0DD), ts)
    _refused(ok + usq + item, ts, "(0008,1140)", "not closed")
    _refused(ok + usq + item + _delim(ts, 0xE0DD, 4), ts, "delimiter of length 4")
    uitem = _delim(ts, 0xE000, 0xFFFFFFFF) + code
    validate_dataset(ok + usq + uitem + _delim(ts, 0xE00D) + _delim(ts, 0xE0DD), ts)
    _refused(ok + usq + uitem + _delim(ts, 0xE0DD), ts, "(FFFE,E0DD) inside (0008,1140)")
    # undefined length on a VR that cannot have it
    if not UID(ts).is_implicit_VR:
        bad = _elem(ts, 0x7FE1, 0x10, b"UT", b"", length=0xFFFFFFFF) + _delim(ts, 0xE0DD)
        _refused(ok + bad, ts, "undefined length for VR UT")


def test_nesting_is_named_in_messages() -> None:
    ts = ExplicitVRLittleEndian
    data = _encode(_nested(), ts)
    start = data.index(b"113076")  # CodeValue inside the innermost item
    broken = bytearray(data)
    struct.pack_into("<H", broken, start - 2, 7)  # its length made odd
    _refused(
        bytes(broken),
        ts,
        f"byte {start - 8}",
        "(0008,0100) inside (0008,1115) > (0008,114A) > (0040,A170)",
        "odd value length 7",
    )


def test_un_of_undefined_length_is_walked_as_implicit_vr() -> None:
    """PS3.5 6.2.2: in any syntax its value is a sequence in implicit VR little endian."""
    data, ts = _part("UN_sequence.dcm")
    assert data[4:6] == b"UN"
    validate_dataset(data, ts)
    cut = data.rindex(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    _refused(data[:cut] + data[cut + 8 :], ts, "(4453,100C)", "not closed")
    inner = data.index(b"\x08\x00\x50\x11")  # (0008,1150) inside, implicit VR: 4-byte length
    broken = bytearray(data)
    struct.pack_into("<I", broken, inner + 4, 27)
    _refused(bytes(broken), ts, "(0008,1150) inside (4453,100C) > (0008,1115)", "odd value")


def test_encapsulated_pixel_data() -> None:
    data, ts = _part("JPEG-lossy.dcm")
    validate_dataset(data, ts)
    pixels = data.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
    head, items = data[: pixels + 12], data[pixels + 12 :]
    bot_len = struct.unpack_from("<I", items, 4)[0]
    bot, fragments = items[: 8 + bot_len], items[8 + bot_len : -8]
    delim = items[-8:]
    assert delim == _delim(ts, 0xE0DD)
    _refused(head + delim, ts, "(FFFE,E0DD) inside (7FE0,0010)", "Basic Offset Table")
    _refused(head + bot + fragments, ts, "(7FE0,0010)", "not closed")
    _refused(head + bot + fragments + delim[:5], ts, "5 byte(s) left")
    _refused(head + bot + fragments + _elem(ts, 0x0008, 0x0100, b"SH", b"1234"), ts, "fragment")
    _refused(head + bot + _delim(ts, 0xE000, 0xFFFFFFFF) + delim, ts, "undefined length")
    _refused(head + bot + _delim(ts, 0xE000, 3) + b"abc" + b"\0" + delim, ts, "odd pixel data")
    _refused(head + bot + fragments + delim + b"\0" * 4, ts, "4 byte(s) left")
    _refused(head + bot + _delim(ts, 0xE000, 1 << 20) + fragments + delim, ts, "runs past")
    validate_dataset(head + bot + delim, ts)  # an empty image is still well formed


def _image(shape: tuple[int, int, int, int, int], pixels: bytes) -> Dataset:
    """CT_small as (rows, columns, samples per pixel, bits allocated, frames) with ``pixels``."""
    rows, columns, samples, bits, frames = shape
    ds = _ct()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = rows, columns, samples, bits
    ds.NumberOfFrames = frames
    ds.PixelData = pixels
    return ds


@pytest.mark.parametrize("ts", UNCOMPRESSED)
def test_native_pixel_data_must_hold_every_frame(ts: str) -> None:
    cases = [  # (rows, columns, samples per pixel, bits allocated, frames), bytes needed
        ((5, 5, 1, 1, 1), 4),  # 25 bits -> 4 bytes
        ((5, 5, 1, 1, 3), 10),  # 75 bits -> 10 bytes
        ((3, 3, 3, 8, 2), 54),
        ((4, 4, 1, 16, 3), 96),
    ]
    for shape, need in cases:
        validate_dataset(_encode(_image(shape, b"\x01" * need), ts), ts)
        short = _image(shape, b"\x01" * (need - 2))
        _refused(_encode(short, ts), ts, "(7FE0,0010)", f"of {need - 2} bytes", f"need {need}")
    ds = _image((4, 4, 1, 32, 2), b"")
    del ds.PixelData
    ds.FloatPixelData = b"\0" * 124  # 4 x 4 x 2 frames x 32 bits = 128 bytes
    _refused(_encode(ds, ts), ts, "(7FE0,0008)", "need 128")
    del ds.Rows  # an attribute missing: nothing to check against
    validate_dataset(_encode(ds, ts), ts)


def test_deflated() -> None:
    ts = DeflatedExplicitVRLittleEndian
    data = _encode(_nested(), ts)
    validate_dataset(data, ts)
    stream = data[:-1] if data.endswith(b"\0") and len(data) % 2 == 0 else data
    _refused(stream[:-3], ts, "cut short")
    _refused(stream + b"junk", ts, "after the end of its deflate stream")
    inflated = zlib.decompress(stream, -zlib.MAX_WBITS)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    _refused(deflater.compress(inflated[:-1000]) + deflater.flush(), ts, "runs past")
    _refused(b"this is not a deflate stream", ts, "does not inflate")


def test_unknown_transfer_syntax_is_invalid_not_malformed() -> None:
    data, _ = _part("CT_small.dcm")
    with pytest.raises(InvalidDicomError) as info:
        validate_dataset(data, "1.2.3.4.5")
    assert not isinstance(info.value, MalformedDatasetError)


# --- truncation: every cut that is not an element boundary is refused --------------------------


def _samples() -> dict[str, tuple[bytes, str]]:
    nested = _nested()
    out = {
        name: _part(name)
        for name in (
            "CT_small.dcm",  # explicit VR little endian
            "MR_small_implicit.dcm",
            "MR_small_bigendian.dcm",
            "JPEG-lossy.dcm",  # encapsulated
            "rtplan.dcm",  # implicit VR, defined-length sequences
            "UN_sequence.dcm",  # UN of undefined length in an encapsulated syntax
        )
    }
    for ts in UNCOMPRESSED:
        out[f"nested {UID(ts).name}"] = (_encode(nested, ts), ts)
    return out


SAMPLES = _samples()


def _check_prefix(data: bytes, ts: str, k: int, boundaries: set[int]) -> None:
    if k in boundaries:
        validate_dataset(data[:k], ts)
    else:
        with pytest.raises(MalformedDatasetError):
            validate_dataset(data[:k], ts)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_cut_in_the_header(name: str) -> None:
    """Every prefix up to just inside the pixel data (the whole dataset if it has none)."""
    data, ts = SAMPLES[name]
    boundaries = _boundaries(data, ts)
    pixels = [data.find(t) for t in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")]
    stop = max(pixels) + 40 if max(pixels) > 0 else len(data)
    for k in range(1, min(stop, len(data))):
        _check_prefix(data, ts, k, boundaries)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_cut_anywhere(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(SAMPLES)), label="sample")
    encoded, ts = SAMPLES[name]
    k = data.draw(st.integers(1, len(encoded) - 1), label="cut")
    _check_prefix(encoded, ts, k, _boundaries(encoded, ts))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10_000))
def test_any_cut_of_a_deflated_stream(k: int) -> None:
    ts = DeflatedExplicitVRLittleEndian
    data = _encode(_nested(), ts)
    stream_end = len(data) - (1 if data.endswith(b"\0") and len(data) % 2 == 0 else 0)
    k = k % len(data)
    if k == stream_end or k == len(data):
        validate_dataset(data[:k], ts)
    else:
        _refused(data[:k], ts)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 32_766))
def test_any_shortened_pixel_data_re_encoded(keep: int) -> None:
    """Pixel data cut anywhere and written back by pydicom (padded to even): refused. (Cut
    by one byte, 32,767, pydicom's pad byte makes it whole again: nothing tells them apart.)"""
    ds = _ct()
    ds.PixelData = ds.PixelData[:keep]
    _refused(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian, "need 32768")
