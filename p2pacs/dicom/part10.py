"""Part-10 framing: split a file into its prefix (preamble + file meta) and its dataset bytes.

The dataset bytes are what p2pacs hashes and stores: they are identical however an instance
travelled (pynetdicom regenerates file meta on every receive), so an instance has one address at
every site. The prefix is kept beside the blob so export gives back an imported file byte for
byte (PS3.10 section 7.1).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from p2pacs.errors import InvalidDicomError

__all__ = ["Part10", "build_prefix", "split_part10"]

_PREAMBLE = 128  # bytes before the "DICM" magic (PS3.10 section 7.1)
_IMPLEMENTATION_VERSION = "P2PACS_010"  # (0002,0013), at most 16 characters


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
    """
    fp = io.BytesIO(data)
    try:
        preamble = read_preamble(fp, force=True)
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
    ts = str(meta.get("TransferSyntaxUID", "") or "")
    if not ts:
        if preamble is not None:
            raise InvalidDicomError("file meta has no (0002,0010) Transfer Syntax UID")
        ts = _guess_bare_syntax(data[start : start + 8])
    return Part10(prefix=data[:start], dataset=memoryview(data)[start:], transfer_syntax=ts)


def _guess_bare_syntax(head: bytes) -> str:
    """Explicit VR if bytes 4-5 look like a VR (two uppercase letters), else implicit."""
    if len(head) < 8:
        raise InvalidDicomError("too short to be a DICOM dataset")
    vr = head[4:6]
    return ExplicitVRLittleEndian if vr.isalpha() and vr.isupper() else ImplicitVRLittleEndian


def build_prefix(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str = ""
) -> bytes:
    """Preamble + "DICM" + file meta for a dataset received over the network (PS3.10 7.1)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae.strip()[:16]
    buf = DicomBytesIO()
    buf.write(b"\x00" * _PREAMBLE + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()
