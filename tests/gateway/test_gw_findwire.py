"""``gateway.findwire``: C-FIND responses encoded without pydicom, byte for byte what pydicom and
pynetdicom write (the gateway's ``_response`` dataset through pydicom's encoder; pynetdicom's
C-FIND-RSP command set). Pure: no sockets."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pytest
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode

from p2pacs.dicom import Level
from p2pacs.dicom.uids import PATIENT_ROOT_FIND, STUDY_ROOT_FIND
from p2pacs.gateway.find import Query, _response
from p2pacs.gateway.findwire import IdentifierEncoder, pending_command

STUDY_QUERY: Query = dict.fromkeys(
    ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "AccessionNumber",
     "StudyID", "StudyInstanceUID", "ModalitiesInStudy", "StudyDescription",
     "NumberOfStudyRelatedInstances", "ReferringPhysicianName"),
    "",
)  # fmt: skip
RECORDS: list[dict[str, Any]] = [
    {
        "PatientName": "SMITH^JOHN",
        "PatientID": "P1",  # even length
        "PatientBirthDate": "19700101",
        "StudyDate": "20240102",
        "StudyTime": "101010.5",  # odd: padded with a space
        "AccessionNumber": "A123",
        "StudyID": "7",
        "StudyInstanceUID": "1.2.826.0.1.3680043.10.4242.1",  # odd: padded with NUL
        "ModalitiesInStudy": ["CT", "SR"],  # several values
        "StudyDescription": "CHEST W CONTRAST",
        "NumberOfStudyRelatedInstances": "31",
        "ReferringPhysicianName": "",
    },
    {"StudyInstanceUID": "1.2.3.44", "PatientID": "X"},  # most keys missing: empty elements
    {"StudyInstanceUID": "1.2.3", "ModalitiesInStudy": "MR", "PatientName": "O'NEIL^A B"},
]


def _pydicom(level: Level, query: Query, record: dict[str, Any], syntax: str) -> bytes:
    ts = UID(syntax)
    out = encode(_response(level, query, record), ts.is_implicit_VR, ts.is_little_endian)
    assert out is not None
    return bytes(out)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
@pytest.mark.parametrize("record", RECORDS)
def test_study_identifiers_match_pydicom(syntax: str, record: dict[str, Any]) -> None:
    enc = IdentifierEncoder(Level.STUDY, STUDY_QUERY, implicit=UID(syntax).is_implicit_VR)
    assert enc.supported
    assert enc.encode(record) == _pydicom(Level.STUDY, STUDY_QUERY, record, syntax)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_image_and_series_identifiers_match_pydicom(syntax: str) -> None:
    implicit = UID(syntax).is_implicit_VR
    image: Query = {"SOPInstanceUID": "1.2.3.4.5", "SOPClassUID": "", "InstanceNumber": ""}
    record = {"SOPInstanceUID": "1.2.3.4.5", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
              "InstanceNumber": "12", "StudyInstanceUID": "1.2"}  # fmt: skip
    got = IdentifierEncoder(Level.IMAGE, image, implicit=implicit).encode(record)
    assert got == _pydicom(Level.IMAGE, image, record, syntax)
    series: Query = {"SeriesInstanceUID": "", "Modality": "", "SeriesNumber": "",
                     "SeriesDescription": ""}  # fmt: skip
    record = {"SeriesInstanceUID": "1.2.9", "Modality": "CT", "SeriesNumber": "3"}
    got = IdentifierEncoder(Level.SERIES, series, implicit=implicit).encode(record)
    assert got == _pydicom(Level.SERIES, series, record, syntax)


def test_what_pydicom_must_write_is_left_to_it() -> None:
    enc = IdentifierEncoder(Level.STUDY, STUDY_QUERY, implicit=True)
    # a non-ASCII value needs a Specific Character Set (the gateway's _response adds it)
    assert enc.encode({**RECORDS[0], "PatientName": "MÜLLER^JÖRG"}) is None
    # a value too long for a 16-bit length field
    assert enc.encode({**RECORDS[0], "StudyDescription": "X" * 70_000}) is None
    # binary VRs (Rows is US): pydicom converts and writes those
    assert not IdentifierEncoder(
        Level.IMAGE, {"SOPInstanceUID": "", "Rows": ""}, implicit=True
    ).supported


@pytest.mark.parametrize("message_id", [1, 7, 0xFFFF])
@pytest.mark.parametrize("sop_class", [STUDY_ROOT_FIND, PATIENT_ROOT_FIND])
def test_pending_command_matches_pynetdicom(message_id: int, sop_class: str) -> None:
    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.Status = 0xFF00
    rsp.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    msg = C_FIND_RSP()
    msg.primitive_to_message(rsp)
    want = encode(msg.command_set, True, True)
    assert pending_command(sop_class, message_id) == want
