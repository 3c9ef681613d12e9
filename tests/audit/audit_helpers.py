"""A checker of the DICOM audit message structure (PS3.15 A.5.1), written from the standard's
schema, and the message-specific rules of A.5.3 the site's messages must follow.

``check_schema`` raises AssertionError naming the first rule a message breaks; ``parse`` gives
the parts tests look at.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import xml.etree.ElementTree as ET
from dataclasses import dataclass

CODED = ("csd-code", "codeSystemName", "originalText")
ACTIONS = {"C", "R", "U", "D", "E"}
OUTCOMES = {"0", "4", "8", "12"}
NAP_TYPES = {"1", "2", "3", "4", "5"}
OBJECT_TYPES = {"1", "2", "3", "4"}
OBJECT_ROLES = {str(i) for i in range(1, 27)}
TOP_ORDER = ["EventIdentification", "ActiveParticipant", "AuditSourceIdentification",
             "ParticipantObjectIdentification"]  # fmt: skip
OBJECT_ORDER = ["ParticipantObjectIDTypeCode", "ParticipantObjectName|ParticipantObjectQuery",
                "ParticipantObjectDetail", "ParticipantObjectDescription"]  # fmt: skip


def _coded(elem: ET.Element, where: str) -> None:
    for attr in CODED:
        assert elem.get(attr), f"{where}: coded value without {attr}"
    assert set(elem.attrib) <= {*CODED, "displayName"}, f"{where}: attributes {elem.attrib}"


def _in_order(children: list[ET.Element], order: list[str], where: str) -> None:
    rank = {name: i for i, group in enumerate(order) for name in group.split("|")}
    last = -1
    for child in children:
        assert child.tag in rank, f"{where}: unexpected element {child.tag}"
        assert rank[child.tag] >= last, f"{where}: {child.tag} out of order"
        last = rank[child.tag]


def _boolean(text: str | None, where: str) -> None:
    assert text in ("true", "false", "1", "0"), f"{where}: {text!r} is not xsd:boolean"


def check_schema(xml: bytes) -> ET.Element:
    """The message against the A.5.1 schema; the root element when it holds."""
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage", root.tag
    children = list(root)
    _in_order(children, TOP_ORDER, "AuditMessage")
    tags = [c.tag for c in children]
    assert tags.count("EventIdentification") == 1
    assert tags.count("ActiveParticipant") >= 1
    assert tags.count("AuditSourceIdentification") == 1

    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventActionCode", "E") in ACTIONS
    assert ident.get("EventOutcomeIndicator") in OUTCOMES
    stamp = ident.get("EventDateTime", "")
    dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))  # xsd:dateTime
    _in_order(list(ident), ["EventID", "EventTypeCode", "EventOutcomeDescription"], "Event")
    assert len(ident.findall("EventID")) == 1
    for code in (*ident.findall("EventID"), *ident.findall("EventTypeCode")):
        _coded(code, "EventIdentification")

    for p in root.findall("ActiveParticipant"):
        assert p.get("UserID") is not None, "ActiveParticipant without UserID"
        _boolean(p.get("UserIsRequestor"), "UserIsRequestor")
        if p.get("NetworkAccessPointTypeCode") is not None:
            assert p.get("NetworkAccessPointTypeCode") in NAP_TYPES
        for child in p:
            assert child.tag in ("RoleIDCode", "MediaIdentifier"), child.tag
            if child.tag == "RoleIDCode":
                _coded(child, "RoleIDCode")

    src = root.find("AuditSourceIdentification")
    assert src is not None and src.get("AuditSourceID"), "AuditSourceID missing"
    for child in src:
        assert child.tag == "AuditSourceTypeCode" and child.get("csd-code"), child.tag

    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID"), "ParticipantObjectID missing"
        assert obj.get("ParticipantObjectTypeCode", "1") in OBJECT_TYPES
        assert obj.get("ParticipantObjectTypeCodeRole", "1") in OBJECT_ROLES
        _in_order(list(obj), OBJECT_ORDER, "ParticipantObjectIdentification")
        ids = obj.findall("ParticipantObjectIDTypeCode")
        assert len(ids) == 1
        _coded(ids[0], "ParticipantObjectIDTypeCode")
        assert (
            len(obj.findall("ParticipantObjectName")) + len(obj.findall("ParticipantObjectQuery"))
            <= 1
        )
        for q in obj.findall("ParticipantObjectQuery"):
            base64.b64decode(q.text or "", validate=True)
        for d in obj.findall("ParticipantObjectDetail"):
            assert d.get("type"), "ParticipantObjectDetail without type"
            try:
                base64.b64decode(d.get("value") or "", validate=True)
            except binascii.Error as exc:
                raise AssertionError(f"ParticipantObjectDetail value not base64: {exc}") from exc
        for desc in obj.findall("ParticipantObjectDescription"):
            for sop in desc:
                assert sop.tag in ("MPPS", "Accession", "SOPClass",
                                   "ParticipantObjectContainsStudy", "Encrypted",
                                   "Anonymized"), sop.tag  # fmt: skip
                if sop.tag == "SOPClass":
                    assert int(sop.get("NumberOfInstances", "x")) >= 0
    return root


@dataclass
class Message:
    event_id: str
    action: str
    outcome: int
    types: list[str]
    participants: list[dict[str, str]]  # attributes plus "role" (its csd-code)
    objects: list[dict[str, object]]  # attributes plus "id_type", "sop_classes", "query"
    source_id: str


def parse(xml: bytes) -> Message:
    """The message's parts, after ``check_schema``."""
    root = check_schema(xml)
    ident = root.find("EventIdentification")
    assert ident is not None
    event_id = ident.find("EventID")
    assert event_id is not None
    participants = []
    for p in root.findall("ActiveParticipant"):
        role = p.find("RoleIDCode")
        participants.append(
            {**p.attrib, "role": role.get("csd-code", "") if role is not None else ""}
        )
    objects: list[dict[str, object]] = []
    for o in root.findall("ParticipantObjectIdentification"):
        id_type = o.find("ParticipantObjectIDTypeCode")
        assert id_type is not None
        query = o.find("ParticipantObjectQuery")
        objects.append(
            {
                **o.attrib,
                "id_type": f"{id_type.get('csd-code')}/{id_type.get('codeSystemName')}",
                "sop_classes": [
                    (s.get("UID", ""), int(s.get("NumberOfInstances", "0")))
                    for s in o.iter("SOPClass")
                ],
                "query": base64.b64decode(query.text or "") if query is not None else None,
                "details": {
                    d.get("type"): base64.b64decode(d.get("value") or "")
                    for d in o.findall("ParticipantObjectDetail")
                },
            }
        )
    src = root.find("AuditSourceIdentification")
    assert src is not None
    return Message(
        event_id=event_id.get("csd-code", ""),
        action=ident.get("EventActionCode", ""),
        outcome=int(ident.get("EventOutcomeIndicator", "-1")),
        types=[t.get("csd-code", "") for t in ident.findall("EventTypeCode")],
        participants=participants,
        objects=objects,
        source_id=src.get("AuditSourceID", ""),
    )


def role(msg: Message, code: str) -> dict[str, str]:
    """The one participant with RoleIDCode ``code``."""
    found = [p for p in msg.participants if p["role"] == code]
    assert len(found) == 1, f"{len(found)} participants with role {code}: {msg.participants}"
    return found[0]


def objects(msg: Message, id_type: str) -> list[dict[str, object]]:
    return [o for o in msg.objects if o["id_type"] == id_type]
