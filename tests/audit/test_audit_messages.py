"""Site events become the DICOM audit messages of PS3.15 A.5.3, with the structure of A.5.1:
event ID and type codes, action, outcome from the DICOM status, participants and objects.
Pure: no sockets."""

from __future__ import annotations

import time
from io import BytesIO

import pytest
from pydicom.filereader import read_dataset

from p2pacs.audit import messages as m
from p2pacs.audit.syslog import MSGID, frame, parse_frame
from p2pacs.audit.translate import Local, StudyInfo, translate
from p2pacs.events import (
    AssociationEvent,
    DicomRequest,
    Lifecycle,
    PeerTransfer,
    SecurityAlert,
    TransferBegun,
    UserAuthentication,
)

from audit_helpers import objects, parse, role

LOCAL = Local(site="lab", ae_title="P2PACS", host="10.0.0.5", enterprise="hospital-fed")
NOW = time.time()
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY = "1.2.3.4.5"
FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"


def lookup(uid: str) -> StudyInfo | None:
    return StudyInfo("PAT-7", ((CT, 3), (MR, 2))) if uid == STUDY else None


def one(event: object) -> object:
    out = translate(event, NOW, LOCAL, lookup)  # type: ignore[arg-type]
    assert len(out) == 1
    return parse(out[0])


def test_c_store_received_is_instances_transferred_create() -> None:
    msg = one(DicomRequest(
        "C-STORE", 0, 0.01, "MODALITY1", "10.0.0.9", study_uids=(STUDY,), patient_ids=("PAT-7",),
        sop_class_uid=CT, sop_uids=("1.2.3.4.5.6",), bytes=1000, completed=1,
    ))  # fmt: skip
    assert msg.event_id == "110104" and msg.action == "C" and msg.outcome == 0
    src, dst = role(msg, "110153"), role(msg, "110152")
    assert src["UserID"] == "MODALITY1" and src["UserIsRequestor"] == "true"
    assert src["NetworkAccessPointID"] == "10.0.0.9" and src["NetworkAccessPointTypeCode"] == "2"
    assert dst["UserID"] == "P2PACS" and dst["UserIsRequestor"] == "false"
    assert dst["NetworkAccessPointID"] == "10.0.0.5"
    (study,) = objects(msg, "110180/DCM")
    assert study["ParticipantObjectID"] == STUDY
    assert (
        study["ParticipantObjectTypeCode"] == "2" and study["ParticipantObjectTypeCodeRole"] == "3"
    )
    assert study["sop_classes"] == [(CT, 1)]
    (patient,) = objects(msg, "2/RFC-3881")
    assert patient["ParticipantObjectID"] == "PAT-7"
    assert patient["ParticipantObjectTypeCode"] == "1"
    assert patient["ParticipantObjectTypeCodeRole"] == "1"
    assert msg.source_id == "lab"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(0x0000, 0), (0xB000, 4), (0xFE00, 4), (0xA700, 8), (0xC210, 8), (0x0122, 8)],
)
def test_outcome_follows_the_dicom_status(status: int, outcome: int) -> None:
    msg = one(DicomRequest("C-STORE", status, 0.0, "M", "127.0.0.1"))
    assert msg.outcome == outcome


def test_c_find_is_a_query_with_the_identifier_in_base64() -> None:
    keys = (("QueryRetrieveLevel", "STUDY"), ("PatientID", "PAT-7"), ("StudyInstanceUID", ""))
    msg = one(DicomRequest(
        "C-FIND", 0, 0.01, "VIEWER", "viewer.example", patient_ids=("PAT-7",),
        sop_class_uid=FIND_MODEL, completed=1, level="STUDY", query=keys,
    ))  # fmt: skip
    assert msg.event_id == "110112" and msg.action == "E" and msg.outcome == 0
    querier = role(msg, "110153")
    assert querier["UserID"] == "VIEWER" and querier["UserIsRequestor"] == "true"
    assert querier["NetworkAccessPointTypeCode"] == "1"  # a host name
    assert role(msg, "110152")["UserIsRequestor"] == "false"
    (sop,) = objects(msg, "110181/DCM")
    assert sop["ParticipantObjectID"] == FIND_MODEL
    assert sop["details"] == {"TransferSyntax": m.EXPLICIT_VR_LE.encode()}
    query = sop["query"]
    assert isinstance(query, bytes)
    ds = read_dataset(BytesIO(query), is_implicit_VR=False, is_little_endian=True)
    assert ds.QueryRetrieveLevel == "STUDY" and ds.PatientID == "PAT-7"
    assert "StudyInstanceUID" in ds and not ds.StudyInstanceUID  # a return key, asked empty
    assert [o["ParticipantObjectID"] for o in objects(msg, "2/RFC-3881")] == ["PAT-7"]


def test_c_move_is_instances_transferred_read_with_the_requestor() -> None:
    msg = one(DicomRequest(
        "C-MOVE", 0, 0.5, "VIEWER", "10.0.0.7", study_uids=(STUDY,), completed=5,
        destination="WORKSTATION", level="STUDY",
    ))  # fmt: skip
    assert msg.event_id == "110104" and msg.action == "R" and msg.outcome == 0
    assert role(msg, "110153")["UserID"] == "P2PACS"
    assert role(msg, "110153")["UserIsRequestor"] == "false"
    assert role(msg, "110152")["UserID"] == "WORKSTATION"
    requestor = [p for p in msg.participants if not p["role"]]
    assert requestor[0]["UserID"] == "VIEWER" and requestor[0]["UserIsRequestor"] == "true"
    (study,) = objects(msg, "110180/DCM")
    assert study["sop_classes"] == [(CT, 3), (MR, 2)]  # from the index: the whole study
    assert [o["ParticipantObjectID"] for o in objects(msg, "2/RFC-3881")] == ["PAT-7"]


def test_c_get_of_a_series_counts_what_was_sent() -> None:
    msg = one(DicomRequest(
        "C-GET", 0xB000, 0.5, "VIEWER", "10.0.0.7", study_uids=(STUDY,), completed=2, failed=1,
        level="SERIES",
    ))  # fmt: skip
    assert msg.action == "R" and msg.outcome == 4
    assert role(msg, "110152")["UserID"] == "VIEWER"
    (study,) = objects(msg, "110180/DCM")
    assert study["sop_classes"] == [("", 2)]


def test_begin_transferring() -> None:
    msg = one(TransferBegun("C-MOVE", "VIEWER", "10.0.0.7", "WS", "STUDY", (STUDY,)))
    assert msg.event_id == "110102" and msg.action == "E"
    assert role(msg, "110153")["UserID"] == "P2PACS"
    assert role(msg, "110152")["UserID"] == "WS"
    assert objects(msg, "110180/DCM")[0]["ParticipantObjectID"] == STUDY
    assert objects(msg, "2/RFC-3881")[0]["ParticipantObjectID"] == "PAT-7"


def test_application_start_and_stop() -> None:
    for what, code in (("start", "110120"), ("stop", "110121")):
        msg = one(Lifecycle(what, "lab"))
        assert msg.event_id == "110100" and msg.types == [code] and msg.action == "E"
        app = role(msg, "110150")
        assert app["UserID"] == "P2PACS" and app["UserIsRequestor"] == "false"
        assert role(msg, "110151")["UserIsRequestor"] == "true"


@pytest.mark.parametrize(
    ("kind", "peer", "type_code", "outcome", "subject"),
    [
        ("tls-refused", "10.0.0.66", "110126", 4, "tls://10.0.0.66"),
        ("bad-mac", "10.0.0.66:4001", "110126", 4, "dht://10.0.0.66:4001"),
        ("tampered-blob", "site-b", "110126", 8, "p2pacs://site-b"),
        ("auth-failed", "10.0.0.8", "110132", 4, "10.0.0.8"),
    ],
)
def test_security_alerts(kind: str, peer: str, type_code: str, outcome: int, subject: str) -> None:
    msg = one(SecurityAlert(kind, peer, "what happened"))
    assert msg.event_id == "110113" and msg.types == [type_code] and msg.outcome == outcome
    reporter = msg.participants[0]
    assert reporter["UserID"] == "P2PACS" and reporter["UserIsRequestor"] == "false"
    assert (
        msg.participants[1]["UserID"] == peer and msg.participants[1]["UserIsRequestor"] == "true"
    )
    (obj,) = objects(msg, "12/RFC-3881")
    assert obj["ParticipantObjectID"] == subject
    assert obj["details"] == {"Alert Description": f"{kind}: what happened".encode()}


def test_user_authentication() -> None:
    ok = one(UserAuthentication("alice", "10.0.0.3", True))
    bad = one(UserAuthentication("mallory", "10.0.0.4", False, "wrong password"))
    assert ok.event_id == bad.event_id == "110114"
    assert ok.types == bad.types == ["110122"]
    assert (ok.outcome, bad.outcome) == (0, 4)
    assert bad.participants[0]["UserID"] == "mallory"
    assert bad.participants[0]["UserIsRequestor"] == "true"


def test_federation_fetch_in_names_the_study_and_the_holder() -> None:
    msg = one(PeerTransfer("in", "site-b,site-c", 12345, "recovery", STUDY))
    assert msg.event_id == "110104" and msg.action == "C"
    assert role(msg, "110153")["UserID"] == "site-b"
    assert role(msg, "110152")["UserID"] == "P2PACS"
    assert objects(msg, "110180/DCM")[0]["sop_classes"] == [(CT, 3), (MR, 2)]
    assert translate(PeerTransfer("out", "site-b", 99, "serve"), NOW, LOCAL) == []


def test_nothing_for_echo_and_associations() -> None:
    assert translate(DicomRequest("C-ECHO", 0, 0.0, "A", "h"), NOW, LOCAL) == []
    assert translate(AssociationEvent(True, "A", "h"), NOW, LOCAL) == []


def test_hostile_values_stay_data() -> None:
    """Markup and control characters in AE titles, IDs and details never break the XML."""
    msg = one(DicomRequest(
        "C-STORE", 0, 0.0, 'M"><x/>', "10.0.0.9", study_uids=(STUDY,),
        patient_ids=("<PAT>&\x01",), sop_class_uid=CT, completed=1,
    ))  # fmt: skip
    assert role(msg, "110153")["UserID"] == 'M"><x/>'
    assert objects(msg, "2/RFC-3881")[0]["ParticipantObjectID"] == "<PAT>&\ufffd"


def test_syslog_frame_round_trip() -> None:
    xml = translate(Lifecycle("start", "lab"), NOW, LOCAL)[0]
    data = frame(xml, at=NOW, hostname="host a", procid="42")
    assert data.startswith(b"<85>1 ")
    parsed = parse_frame(data)
    assert (parsed.app_name, parsed.msgid, parsed.structured_data) == ("p2pacs", MSGID, "-")
    assert parsed.hostname == "hosta" and parsed.procid == "42"
    assert parsed.message == xml


def test_query_keys_pydicom_cannot_encode_are_left_out() -> None:
    from p2pacs.audit.translate import query_dataset

    raw = query_dataset((("PatientID", "P1"), ("NumberOfStudyRelatedInstances", "many"),
                         ("StudyDate", "20240101-")))  # fmt: skip
    ds = read_dataset(BytesIO(raw), is_implicit_VR=False, is_little_endian=True)
    assert ds.PatientID == "P1" and ds.StudyDate == "20240101-"
    assert "NumberOfStudyRelatedInstances" not in ds
