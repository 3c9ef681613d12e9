"""Part-10 framing: split a file into its prefix (preamble + file meta) and its dataset bytes.

The dataset bytes are what p2pacs hashes and stores: they are identical however an instance
travelled (pynetdicom regenerates file meta on every receive), so an instance has one address at
every site. The prefix is kept beside the blob so export gives back an imported file byte for
byte (PS3.10 section 7.1).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from p2pacs.dicom.validate import syntax_encoding
from p2pacs.errors import InvalidDicomError, MalformedDatasetError

__all__ = ["Part10", "build_prefix", "build_prefix_pydicom", "split_part10"]

_PREAMBLE = 128  # bytes before the "DICM" magic (PS3.10 section 7.1)
_IMPLEMENTATION_VERSION = "P2PACS_010"  # (0002,0013), at most 16 characters
_PREFIX_HEAD = b"\x00" * _PREAMBLE + b"DICM"
_GROUP_LENGTH_SIZE = 12  # (0002,0000) UL element: tag 4 + VR 2 + length 2 + value 4 (PS3.10 7.1)


@dataclass(frozen=True, slots=True)
class Part10:
    """A DICOM file cut in two: ``prefix + dataset`` are the original bytes."""

    prefix: bytes
    dataset: memoryview
    transfer_syntax: str


def split_part10(data: bytes) -> Part10:
    """Find where the dataset starts and which transfer syntax encodes it.

    A file without preamble or file meta is accepted as a bare dataset: its prefix is empty and
    its transfer syntax is detected (implicit or explicit VR little endian), as pydicom does.
    Refused (``InvalidDicomError``): unreadable file meta, file meta whose group length
    (0002,0000) does not end where the meta elements end, a missing or unknown transfer syntax.
    """
    fp = io.BytesIO(data)
    try:
        preamble = read_preamble(fp, force=True)
        meta_start = fp.tell()
        meta = _read_file_meta_info(fp)
    except (
        PydicomInvalidDicomError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        OverflowError,
    ) as exc:
        raise InvalidDicomError(f"unreadable DICOM file meta: {exc}") from exc
    start = fp.tell()
    if start >= len(data):
        raise InvalidDicomError("the file holds file meta but no dataset")
    group_length = meta.get("FileMetaInformationGroupLength")
    if group_length is not None and (
        not isinstance(group_length, int) or meta_start + _GROUP_LENGTH_SIZE + group_length != start
    ):
        raise MalformedDatasetError(
            f"file meta group length (0002,0000) is {group_length!r}: it does not end the meta "
            f"elements, which end at byte {start} ({start - meta_start - _GROUP_LENGTH_SIZE} "
            f"bytes after it)"
        )
    ts = str(meta.get("TransferSyntaxUID", "") or "")
    if not ts:
        if preamble is not None:
            raise InvalidDicomError("file meta has no (0002,0010) Transfer Syntax UID")
        ts = _guess_bare_syntax(data[start : start + 8])
    syntax_encoding(ts)  # raises for a UID that is not a known transfer syntax
    return Part10(prefix=data[:start], dataset=memoryview(data)[start:], transfer_syntax=ts)


def _guess_bare_syntax(head: bytes) -> str:
    """Explicit VR if bytes 4-5 look like a VR (two uppercase letters), else implicit; big endian
    (explicit VR only, PS3.5 A.3, retired) when the first group number reads smaller that way, as
    it does for the low groups a dataset starts with ((0008,xxxx) is ``00 08``, not ``08 00``)."""
    if len(head) < 8:
        raise InvalidDicomError("too short to be a DICOM dataset")
    vr = head[4:6]
    if not (vr.isalpha() and vr.isupper()):
        return ImplicitVRLittleEndian
    if int.from_bytes(head[:2], "big") < int.from_bytes(head[:2], "little"):
        return ExplicitVRBigEndian
    return ExplicitVRLittleEndian


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002 (PS3.5 7.1.2)."""
    group, elem = divmod(tag, 0x10000)
    head = struct.pack("<HH", group, elem) + vr
    if vr in (b"OB", b"UN"):
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.strip().encode("ascii")
    if len(raw) > 64:
        raise InvalidDicomError(f"UID longer than 64 characters: {uid[:80]!r}")
    return raw + b"\0" if len(raw) % 2 else raw


def _text(value: str, limit: int) -> bytes:
    raw = value.strip()[:limit].encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def build_prefix(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str = ""
) -> bytes:
    """Preamble + "DICM" + file meta for a dataset received over the network (PS3.10 7.1).

    Encoded here rather than with pydicom's writer: it runs for every received instance and
    this is ten times faster; the bytes are the same (tests compare them).
    """
    body = b"".join(
        [
            _element(0x00020001, b"OB", b"\x00\x01"),  # File Meta Information Version
            _element(0x00020002, b"UI", _ui(sop_class_uid)),
            _element(0x00020003, b"UI", _ui(sop_instance_uid)),
            _element(0x00020010, b"UI", _ui(transfer_syntax)),
            _element(0x00020012, b"UI", _ui(PYDICOM_IMPLEMENTATION_UID)),
            _element(0x00020013, b"SH", _text(_IMPLEMENTATION_VERSION, 16)),
        ]
        + ([_element(0x00020016, b"AE", _text(source_ae, 16))] if source_ae.strip() else [])
    )
    group_length = _element(0x00020000, b"UL", struct.pack("<I", len(body)))
    return _PREFIX_HEAD + group_length + body


def build_prefix_pydicom(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str = ""
) -> bytes:
    """``build_prefix`` through pydicom's file meta writer (the reference the tests use)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae.strip()[:16]
    buf = DicomBytesIO()
    buf.write(_PREFIX_HEAD)
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()
