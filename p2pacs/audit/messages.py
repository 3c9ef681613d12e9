"""DICOM audit messages (PS3.15 A.5): the XML an IHE ATNA audit repository expects.

A pure core: values in, UTF-8 XML bytes out, built with ``xml.etree`` (never by concatenating
strings, so no value can break the markup). One builder per message of PS3.15 A.5.3 that a
site emits; each takes the participants and objects the standard requires for it. Element
order follows the schema of A.5.1: EventIdentification, ActiveParticipant+,
AuditSourceIdentification, ParticipantObjectIdentification*.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ACTION_CREATE",
    "ACTION_EXECUTE",
    "ACTION_READ",
    "OUTCOME_MAJOR",
    "OUTCOME_MINOR",
    "OUTCOME_SERIOUS",
    "OUTCOME_SUCCESS",
    "Code",
    "Participant",
    "Source",
    "Study",
    "application_activity",
    "begin_transferring",
    "instances_transferred",
    "outcome_of_status",
    "query",
    "security_alert",
    "user_authentication",
]


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value (PS3.15 A.5.1 CodedValueType): code, coding scheme, meaning."""

    code: str
    system: str
    meaning: str


# PS3.16 CID 400 Audit Event ID
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
BEGIN_TRANSFERRING = Code("110102", "DCM", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
# PS3.16 CID 401 Audit Event Type Code
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
# PS3.16 CID 402 Audit Active Participant Role ID Code
APPLICATION = Code("110150", "DCM", "Application")
APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
DESTINATION = Code("110152", "DCM", "Destination Role ID")
SOURCE = Code("110153", "DCM", "Source Role ID")
# PS3.16 CID 404 Audit Participant Object ID Type Code, and RFC 3881's own
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")
NODE_ID = Code("110182", "DCM", "Node ID")

ACTION_CREATE, ACTION_READ, ACTION_EXECUTE = "C", "R", "E"  # EventActionCode
OUTCOME_SUCCESS, OUTCOME_MINOR, OUTCOME_SERIOUS, OUTCOME_MAJOR = 0, 4, 8, 12
TYPE_PERSON, TYPE_SYSTEM = "1", "2"  # ParticipantObjectTypeCode
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE = "1", "3", "13"  # ...TypeCodeRole
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"  # the syntax ParticipantObjectQuery is encoded in

_WARNINGS = {0x0001, 0x0107, 0x0116, 0xFE00}  # PS3.7 C: warnings; 0xFE00: cancelled


def outcome_of_status(status: int) -> int:
    """EventOutcomeIndicator of a DIMSE final status: success 0, warning or cancel 4 (minor
    failure: some of it was done), failure 8 (serious: the request was refused or failed)."""
    if status == 0:
        return OUTCOME_SUCCESS
    if status in _WARNINGS or 0xB000 <= status <= 0xBFFF:
        return OUTCOME_MINOR
    return OUTCOME_SERIOUS


@dataclass(frozen=True, slots=True)
class Participant:
    """An ActiveParticipant: a process or person taking part (AE title, site name, user)."""

    user_id: str
    requestor: bool
    role: Code | None = None
    address: str = ""  # host name or IP address (NetworkAccessPointID)
    alternative_id: str = ""  # e.g. the process id of this application
    user_name: str = ""


@dataclass(frozen=True, slots=True)
class Source:
    """Who reports: this site (AuditSourceIdentification)."""

    source_id: str  # the site's name
    enterprise: str = ""  # AuditEnterpriseSiteID: the federation, when there is one
    type_code: str = "4"  # A.5.1.2.1: application server process


@dataclass(frozen=True, slots=True)
class Study:
    """A study participant object (Study Instance UID), with the SOP classes and number of
    instances it concerns: ``sop_classes`` maps a class UID ("" when not known) to a count."""

    uid: str
    sop_classes: tuple[tuple[str, int], ...] = ()


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning},
    )


def _when(at: float) -> str:
    """xsd:dateTime in UTC with milliseconds (the schema's EventDateTime)."""
    stamp = dt.datetime.fromtimestamp(at, dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _address_type(address: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"
    return "2"


class _Message:
    """One AuditMessage under construction, its parts added in the schema's order."""

    def __init__(
        self,
        event: Code,
        action: str,
        outcome: int,
        *,
        at: float,
        types: Sequence[Code] = (),
        description: str = "",
    ):
        self.root = ET.Element("AuditMessage")
        ident = ET.SubElement(
            self.root,
            "EventIdentification",
            {
                "EventActionCode": action,
                "EventDateTime": _when(at),
                "EventOutcomeIndicator": str(outcome),
            },
        )
        _code(ident, "EventID", event)
        for t in types:
            _code(ident, "EventTypeCode", t)
        if description:
            ET.SubElement(ident, "EventOutcomeDescription").text = _printable(description)

    def participant(self, p: Participant) -> None:
        attrs = {"UserID": p.user_id or "unknown"}
        if p.alternative_id:
            attrs["AlternativeUserID"] = p.alternative_id
        if p.user_name:
            attrs["UserName"] = p.user_name
        attrs["UserIsRequestor"] = "true" if p.requestor else "false"
        if p.address:
            attrs["NetworkAccessPointID"] = p.address
            attrs["NetworkAccessPointTypeCode"] = _address_type(p.address)
        elem = ET.SubElement(self.root, "ActiveParticipant", attrs)
        if p.role is not None:
            _code(elem, "RoleIDCode", p.role)

    def source(self, s: Source) -> None:
        attrs = {"AuditSourceID": s.source_id or "p2pacs"}
        if s.enterprise:
            attrs = {"AuditEnterpriseSiteID": s.enterprise, **attrs}
        elem = ET.SubElement(self.root, "AuditSourceIdentification", attrs)
        ET.SubElement(elem, "AuditSourceTypeCode", {"csd-code": s.type_code})

    def obj(
        self,
        object_id: str,
        id_type: Code,
        type_code: str,
        role: str,
        *,
        name: str = "",
        query: bytes | None = None,
        details: Iterable[tuple[str, bytes]] = (),
    ) -> ET.Element:
        elem = ET.SubElement(
            self.root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": object_id,
                "ParticipantObjectTypeCode": type_code,
                "ParticipantObjectTypeCodeRole": role,
            },
        )
        _code(elem, "ParticipantObjectIDTypeCode", id_type)
        if query is not None:
            ET.SubElement(elem, "ParticipantObjectQuery").text = base64.b64encode(query).decode()
        elif name:
            ET.SubElement(elem, "ParticipantObjectName").text = _printable(name)
        for kind, value in details:
            ET.SubElement(
                elem,
                "ParticipantObjectDetail",
                {"type": kind, "value": base64.b64encode(value).decode()},
            )
        return elem

    def patients(self, patient_ids: Iterable[str]) -> None:
        for pid in dict.fromkeys(p for p in patient_ids if p):
            self.obj(pid, PATIENT_NUMBER, TYPE_PERSON, ROLE_PATIENT)

    def studies(self, studies: Iterable[Study]) -> None:
        for study in studies:
            elem = self.obj(study.uid, STUDY_INSTANCE_UID, TYPE_SYSTEM, ROLE_REPORT)
            desc = ET.SubElement(elem, "ParticipantObjectDescription")
            for uid, count in study.sop_classes:
                attrs = {"UID": uid} if uid else {}
                attrs["NumberOfInstances"] = str(count)
                ET.SubElement(desc, "SOPClass", attrs)

    def encode(self) -> bytes:
        for elem in self.root.iter():  # values from the network: keep them well-formed XML
            for key, value in elem.attrib.items():
                elem.attrib[key] = _printable(value)
        # no XML declaration: UTF-8 is XML's default, and the declaration's line feed would be
        # escaped by receivers that escape control characters (rsyslog: "#012")
        data: bytes = ET.tostring(self.root, encoding="utf-8", xml_declaration=False)
        return data


def _printable(text: str) -> str:
    """XML 1.0 cannot carry most control characters, even escaped: replace them."""
    return "".join(c if c >= " " or c in "\t\n\r" else "\ufffd" for c in text)


# --- the messages of PS3.15 A.5.3 -------------------------------------------------------------


def application_activity(
    source: Source,
    application: Participant,
    *,
    started: bool,
    at: float,
    launcher: Participant | None = None,
) -> bytes:
    """A.5.3.1: the application started or stopped. ``application``: this site (role
    Application, not the requestor); ``launcher``: who started it, when known."""
    msg = _Message(
        APPLICATION_ACTIVITY,
        ACTION_EXECUTE,
        OUTCOME_SUCCESS,
        at=at,
        types=[APPLICATION_START if started else APPLICATION_STOP],
    )
    msg.participant(application)
    if launcher is not None:
        msg.participant(launcher)
    msg.source(source)
    return msg.encode()


def _transfer(
    event: Code,
    *,
    action: str,
    source: Source,
    sender: Participant,
    receiver: Participant,
    requestor: Participant | None,
    studies: Sequence[Study],
    patient_ids: Iterable[str],
    outcome: int,
    at: float,
    description: str,
) -> bytes:
    msg = _Message(event, action, outcome, at=at, description=description)
    msg.participant(sender)
    msg.participant(receiver)
    if requestor is not None:
        msg.participant(requestor)
    msg.source(source)
    msg.studies(studies)
    msg.patients(patient_ids)
    return msg.encode()


def instances_transferred(
    source: Source,
    *,
    sender: Participant,
    receiver: Participant,
    studies: Sequence[Study],
    patient_ids: Iterable[str],
    action: str,
    outcome: int,
    at: float,
    requestor: Participant | None = None,
    description: str = "",
) -> bytes:
    """A.5.3.5: instances moved from ``sender`` (role Source) to ``receiver`` (role
    Destination); ``requestor``: a third party that asked for it (C-MOVE). ``action``: C when
    the receiver stored them, R when the sender read them out."""
    return _transfer(
        INSTANCES_TRANSFERRED,
        action=action,
        source=source,
        sender=sender,
        receiver=receiver,
        requestor=requestor,
        studies=studies,
        patient_ids=patient_ids,
        outcome=outcome,
        at=at,
        description=description,
    )


def begin_transferring(
    source: Source,
    *,
    sender: Participant,
    receiver: Participant,
    studies: Sequence[Study],
    patient_ids: Iterable[str],
    at: float,
    requestor: Participant | None = None,
) -> bytes:
    """A.5.3.3: a transfer of instances starts (a C-MOVE or C-GET begins sending)."""
    return _transfer(
        BEGIN_TRANSFERRING,
        action=ACTION_EXECUTE,
        source=source,
        sender=sender,
        receiver=receiver,
        requestor=requestor,
        studies=studies,
        patient_ids=patient_ids,
        outcome=OUTCOME_SUCCESS,
        at=at,
        description="",
    )


def query(
    source: Source,
    *,
    querier: Participant,
    responder: Participant,
    sop_class_uid: str,
    query_dataset: bytes,
    patient_ids: Iterable[str],
    outcome: int,
    at: float,
    transfer_syntax: str = EXPLICIT_VR_LE,
) -> bytes:
    """A.5.3.12: a query (C-FIND). The SOP Queried object carries the query's SOP class, the
    identifier dataset (base64, in ``transfer_syntax``) and that syntax as a detail."""
    msg = _Message(QUERY, ACTION_EXECUTE, outcome, at=at)
    msg.participant(querier)
    msg.participant(responder)
    msg.source(source)
    msg.obj(
        sop_class_uid or "unknown",
        SOP_CLASS_UID,
        TYPE_SYSTEM,
        ROLE_REPORT,
        query=query_dataset,
        details=[("TransferSyntax", transfer_syntax.encode())],
    )
    msg.patients(patient_ids)
    return msg.encode()


def security_alert(
    source: Source,
    *,
    reporter: Participant,
    subject: str,
    kind: Code,
    description: str,
    outcome: int,
    at: float,
    performer: Participant | None = None,
) -> bytes:
    """A.5.3.11: something of security concern was detected. ``reporter``: this site (the
    detecting process); ``performer``: who did it, when known; ``subject``: the node or object
    concerned (a URI: ``tls://host``, ``dht://host:port``, ``blob:<hash>``...)."""
    msg = _Message(
        SECURITY_ALERT, ACTION_EXECUTE, outcome, at=at, types=[kind], description=description
    )
    msg.participant(reporter)
    if performer is not None:
        msg.participant(performer)
    msg.source(source)
    msg.obj(
        subject or "unknown",
        URI,
        TYPE_SYSTEM,
        ROLE_SECURITY_RESOURCE,
        details=[("Alert Description", description.encode())] if description else (),
    )
    return msg.encode()


def user_authentication(
    source: Source,
    *,
    user: Participant,
    authenticator: Participant,
    success: bool,
    at: float,
    login: bool = True,
    description: str = "",
) -> bytes:
    """A.5.3.13: a person logged in or out (``success`` False: the attempt failed)."""
    msg = _Message(
        USER_AUTHENTICATION,
        ACTION_EXECUTE,
        OUTCOME_SUCCESS if success else OUTCOME_MINOR,
        at=at,
        types=[LOGIN if login else LOGOUT],
        description=description,
    )
    msg.participant(user)
    msg.participant(authenticator)
    msg.source(source)
    return msg.encode()
