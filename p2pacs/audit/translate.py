"""Which site event becomes which audit message, with which participants (PS3.15 A.5.3).

Pure: an event, the time it happened and what this site is, in; audit messages out. The one
outside input is ``StudyLookup``, the study's patient and SOP classes as indexed here, for the
retrievals and federation transfers whose events name only the study.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from p2pacs.audit import messages as m
from p2pacs.events import (
    AssociationEvent,
    DicomRequest,
    Event,
    Lifecycle,
    PeerTransfer,
    SecurityAlert,
    TransferBegun,
    UserAuthentication,
)

__all__ = ["Local", "StudyInfo", "StudyLookup", "audited", "query_dataset", "translate"]


@dataclass(frozen=True, slots=True)
class StudyInfo:
    """What this site holds of a study: its patient and instances per SOP class."""

    patient_id: str
    sop_classes: tuple[tuple[str, int], ...]


StudyLookup = Callable[[str], StudyInfo | None]


@dataclass(frozen=True, slots=True)
class Local:
    """This site as an audit participant and as the audit source."""

    site: str  # the site's name (AuditSourceID)
    ae_title: str
    host: str  # the address other nodes reach it by
    enterprise: str = ""  # the federation's name, when enrolled

    @property
    def source(self) -> m.Source:
        return m.Source(self.site, self.enterprise)

    def participant(self, requestor: bool, role: m.Code | None) -> m.Participant:
        return m.Participant(
            self.ae_title, requestor, role, self.host, alternative_id=str(os.getpid())
        )


# SecurityAlert.kind -> the alert's type code (PS3.16 CID 403) and outcome: refused
# connections and logins were blocked (minor); a tampered blob is a serious integrity failure
ALERT_KINDS: dict[str, tuple[m.Code, int]] = {
    "tls-refused": (m.NODE_AUTHENTICATION, m.OUTCOME_MINOR),
    "bad-mac": (m.NODE_AUTHENTICATION, m.OUTCOME_MINOR),
    "tampered-blob": (m.NODE_AUTHENTICATION, m.OUTCOME_SERIOUS),
    "auth-failed": (m.RESTRICTED_FUNCTION, m.OUTCOME_MINOR),
}
ALERT_SCHEMES = {"tls-refused": "tls", "bad-mac": "dht", "tampered-blob": "p2pacs"}


def query_dataset(keys: tuple[tuple[str, str], ...]) -> bytes:
    """The C-FIND identifier, encoded again from its keys (Explicit VR Little Endian) for
    ParticipantObjectQuery; a key pydicom cannot encode is left out, never fatal."""
    ds = Dataset()
    for keyword, value in keys:
        try:
            setattr(ds, keyword, value if value else None)
        except (ValueError, TypeError, AttributeError, OverflowError):
            continue
    out = []
    for elem in ds:  # one at a time, in tag order: a value its VR refuses drops only itself
        one = Dataset()
        one.add(elem)
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        try:
            write_dataset(buf, one)
        except (ValueError, TypeError, OverflowError, AttributeError):
            continue
        out.append(buf.getvalue())
    return b"".join(out)


def _peer(ae: str, address: str, requestor: bool, role: m.Code | None) -> m.Participant:
    return m.Participant(ae or "unknown", requestor, role, address)


def _studies(
    uids: tuple[str, ...], lookup: StudyLookup | None, *, count: int = 0, level: str = "STUDY"
) -> tuple[list[m.Study], list[str]]:
    """Study objects and patient IDs: SOP classes from the index for whole studies; for a part
    of one study (series or image level), only the number of instances sent."""
    studies, patients = [], []
    for uid in uids:
        info = lookup(uid) if lookup is not None else None
        if info is not None:
            patients.append(info.patient_id)
        if info is not None and level in ("STUDY", "PATIENT", "") and info.sop_classes:
            studies.append(m.Study(uid, info.sop_classes))
        elif len(uids) == 1 and count:
            studies.append(m.Study(uid, (("", count),)))
        else:
            studies.append(m.Study(uid))
    return studies, patients


AUDITED_SERVICES = ("C-STORE", "C-FIND", "C-MOVE", "C-GET")


def audited(event: Event) -> bool:
    """Whether ``translate`` makes a message of it: the cheap test the bus observer does
    before queueing, so associations and blobs served never take the queue's room."""
    if isinstance(event, DicomRequest):
        return event.service in AUDITED_SERVICES
    if isinstance(event, PeerTransfer):
        return event.direction == "in" and bool(event.study_uid)
    return not isinstance(event, AssociationEvent)


def translate(
    event: Event, at: float, local: Local, lookup: StudyLookup | None = None
) -> list[bytes]:
    """The audit messages an event calls for (none for C-ECHO, associations, serving)."""
    src = local.source
    if isinstance(event, Lifecycle):
        launcher = m.Participant(getpass.getuser(), True, m.APPLICATION_LAUNCHER)
        app = local.participant(False, m.APPLICATION)
        started = event.what == "start"
        return [m.application_activity(src, app, started=started, at=at, launcher=launcher)]
    if isinstance(event, DicomRequest):
        return _dicom(event, at, local, lookup)
    if isinstance(event, TransferBegun):
        return [_begun(event, at, local, lookup)]
    if isinstance(event, PeerTransfer):
        return _federation(event, at, local, lookup)
    if isinstance(event, SecurityAlert):
        kind, outcome = ALERT_KINDS.get(event.kind, (m.NODE_AUTHENTICATION, m.OUTCOME_MINOR))
        scheme = ALERT_SCHEMES.get(event.kind, "")
        subject = f"{scheme}://{event.peer}" if scheme and event.peer else event.peer
        performer = _peer(event.peer, _host(event.peer), True, None) if event.peer else None
        return [
            m.security_alert(
                src,
                reporter=local.participant(False, None),
                subject=subject,
                kind=kind,
                description=f"{event.kind}: {event.detail}",
                outcome=outcome,
                at=at,
                performer=performer,
            )
        ]
    if isinstance(event, UserAuthentication):
        user = m.Participant(event.user or "unknown", True, None, event.address)
        return [
            m.user_authentication(
                src,
                user=user,
                authenticator=local.participant(False, None),
                success=event.success,
                at=at,
                description=event.detail,
            )
        ]
    return []


def _host(peer: str) -> str:
    """The host of ``host:port`` (or of a bare name); "" for a site name."""
    host, sep, port = peer.rpartition(":")
    return host.strip("[]") if sep and port.isdigit() else ""


def _dicom(event: DicomRequest, at: float, local: Local, lookup: StudyLookup | None) -> list[bytes]:
    src, outcome = local.source, m.outcome_of_status(event.status)
    caller = _peer(event.calling_ae, event.address, True, None)
    if event.service == "C-STORE":
        studies = [m.Study(uid, ((event.sop_class_uid, 1),)) for uid in event.study_uids]
        return [
            m.instances_transferred(
                src,
                sender=_peer(event.calling_ae, event.address, True, m.SOURCE),
                receiver=local.participant(False, m.DESTINATION),
                studies=studies,
                patient_ids=event.patient_ids,
                action=m.ACTION_CREATE,
                outcome=outcome,
                at=at,
                description=f"C-STORE status 0x{event.status:04X}" if event.status else "",
            )
        ]
    if event.service == "C-FIND":
        return [
            m.query(
                src,
                querier=_peer(event.calling_ae, event.address, True, m.SOURCE),
                responder=local.participant(False, m.DESTINATION),
                sop_class_uid=event.sop_class_uid,
                query_dataset=query_dataset(event.query),
                patient_ids=event.patient_ids,
                outcome=outcome,
                at=at,
            )
        ]
    if event.service in ("C-MOVE", "C-GET"):
        studies, patients = _studies(
            event.study_uids, lookup, count=event.completed, level=event.level
        )
        if event.service == "C-MOVE":
            receiver = _peer(event.destination, "", False, m.DESTINATION)
            requestor: m.Participant | None = caller
        else:
            receiver, requestor = _peer(event.calling_ae, event.address, True, m.DESTINATION), None
        return [
            m.instances_transferred(
                src,
                sender=local.participant(False, m.SOURCE),
                receiver=receiver,
                requestor=requestor,
                studies=studies,
                patient_ids=[*event.patient_ids, *patients],
                action=m.ACTION_READ,
                outcome=outcome,
                at=at,
                description=(
                    f"{event.service} status 0x{event.status:04X}: {event.completed} sent, "
                    f"{event.failed} failed, {event.warning} with warnings"
                ),
            )
        ]
    return []  # C-ECHO, storage commitment


def _begun(event: TransferBegun, at: float, local: Local, lookup: StudyLookup | None) -> bytes:
    studies, patients = _studies(event.study_uids, lookup, level=event.level)
    caller = _peer(event.calling_ae, event.address, True, None)
    if event.service == "C-MOVE":
        receiver = _peer(event.destination, "", False, m.DESTINATION)
        requestor: m.Participant | None = caller
    else:
        receiver, requestor = _peer(event.calling_ae, event.address, True, m.DESTINATION), None
    return m.begin_transferring(
        local.source,
        sender=local.participant(False, m.SOURCE),
        receiver=receiver,
        requestor=requestor,
        studies=studies,
        patient_ids=[*event.patient_ids, *patients],
        at=at,
    )


def _federation(
    event: PeerTransfer, at: float, local: Local, lookup: StudyLookup | None
) -> list[bytes]:
    """A study fetched from members (replication, recovery, read-through): this site stored
    it, so it reports the transfer (the serving site does not know which study a blob is
    part of, so it reports nothing per blob)."""
    if event.direction != "in" or not event.study_uid:
        return []
    studies, patients = _studies((event.study_uid,), lookup)
    peers = [p for p in event.peer.split(",") if p] or ["unknown"]
    return [
        m.instances_transferred(
            local.source,
            sender=m.Participant(peers[0], False, m.SOURCE),
            receiver=local.participant(True, m.DESTINATION),
            studies=studies,
            patient_ids=patients,
            action=m.ACTION_CREATE,
            outcome=m.OUTCOME_SUCCESS,
            at=at,
            description=(
                f"federation {event.purpose or 'fetch'} of {event.bytes} bytes from "
                f"{', '.join(peers)}"
            ),
        )
    ]
