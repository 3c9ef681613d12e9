"""Header-only attribute extraction for the DICOM index.

Only the header is parsed (reading stops before Pixel Data and skips every element the index
does not keep), so indexing a 1 GB multi-frame instance costs about as much as a 0.5 MB one.
Values are kept as DICOM strings (multi-valued ones as lists), which is what C-FIND matching and
responses work on (PS3.4 C.2.2.2).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from p2pacs.errors import InvalidDicomError

__all__ = ["LEVEL_KEYS", "REQUIRED", "AttrValue", "Level", "extract_attributes"]

AttrValue = str | list[str]


class Level(StrEnum):
    """Query/Retrieve levels (PS3.4 C.3)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


# Attributes the index keeps, by the level that owns them (PS3.4 C.6.1.1 / C.6.2.1, plus the keys
# dcmtk's findscu and common PACS send). Computed attributes (counts, ModalitiesInStudy) are not
# read from instances; the index maintains them.
LEVEL_KEYS: Mapping[Level, tuple[str, ...]] = {
    Level.PATIENT: (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientSex",
        "EthnicGroup",
        "PatientComments",
    ),
    Level.STUDY: (
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "AdmittingDiagnosesDescription",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "InstitutionName",
    ),
    Level.SERIES: (
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "ProtocolName",
        "Laterality",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "StationName",
        "Manufacturer",
        "ManufacturerModelName",
        "OperatorsName",
    ),
    Level.IMAGE: (
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "ContentDate",
        "ContentTime",
        "AcquisitionDate",
        "AcquisitionTime",
        "AcquisitionNumber",
        "ImageType",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "BitsAllocated",
        "PhotometricInterpretation",
        "ImageComments",
    ),
}

REQUIRED = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")

# An archive stores what it receives: value-representation quirks are not a reason to refuse an
# instance, so pydicom reports them at debug level instead of warning about every file.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

_WANTED: list[BaseTag | int] = [
    tag_for_keyword(kw) or 0 for level in LEVEL_KEYS.values() for kw in level
] + [0x00080005]  # SpecificCharacterSet decodes the text values
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


def _to_str(value: Any) -> AttrValue:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    return str(value)


def _read_header(dataset: bytes | memoryview, transfer_syntax: str) -> Dataset:
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax:
        raise InvalidDicomError(f"{transfer_syntax!r} is not a known transfer syntax UID")
    data = bytes(dataset)
    if uid == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise InvalidDicomError(f"deflated dataset does not inflate: {exc}") from exc
    try:
        ds = read_dataset(
            io.BytesIO(data),
            is_implicit_VR=uid.is_implicit_VR,
            is_little_endian=uid.is_little_endian,
            stop_when=_stop_at_pixels,
            specific_tags=_WANTED,
        )
    except Exception as exc:  # pydicom raises many types on garbage; all mean "not DICOM"
        raise InvalidDicomError(f"unreadable DICOM header: {exc}") from exc
    return ds


def extract_attributes(dataset: bytes | memoryview, transfer_syntax: str) -> dict[str, AttrValue]:
    """Index attributes of one instance, read from its header only.

    Raises ``InvalidDicomError`` when the bytes are not a dataset or lack an identifying UID.
    """
    ds = _read_header(dataset, transfer_syntax)
    attrs: dict[str, AttrValue] = {}
    try:
        for elem in ds.iterall():
            keyword = keyword_for_tag(elem.tag)
            if keyword and keyword != "SpecificCharacterSet" and elem.VR != "SQ":
                value = _to_str(elem.value)
                if value not in ("", []):
                    attrs[keyword] = value
    except Exception as exc:
        raise InvalidDicomError(f"undecodable DICOM header value: {exc}") from exc
    missing = [kw for kw in REQUIRED if not isinstance(attrs.get(kw), str) or not attrs.get(kw)]
    if missing:
        raise InvalidDicomError(f"dataset lacks {', '.join(missing)}; it cannot be archived")
    return attrs


_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "US or SS"})
_FLOAT_VRS = frozenset({"FL", "FD"})


def typed_value(vr: str, value: Any) -> Any:
    """An index value (DICOM strings) as pydicom wants it for ``vr`` in a response (C-FIND,
    QIDO-RS): binary numbers (Rows, BitsAllocated...) as int/float, else unchanged; an
    unreadable number becomes None (sent empty)."""
    values = list(value) if isinstance(value, list | tuple) else [value]
    if vr not in _INT_VRS and vr not in _FLOAT_VRS:
        return values if isinstance(value, list | tuple) else value
    convert = int if vr in _INT_VRS else float
    try:
        out = [convert(str(v).strip()) for v in values if str(v).strip()]
    except ValueError:
        return None
    if not out:
        return None
    return out if len(out) > 1 else out[0]
