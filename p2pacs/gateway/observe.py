"""Gateway events: each DIMSE request and association, told to the site's ``EventBus``.

Wrappers around the handlers, so the handlers stay about DICOM and the observers (metrics,
audit) see every request with the status it was answered with. Nothing here can change what
a requestor receives: the wrapped generators pass every item through unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from p2pacs.events import AssociationEvent, DicomRequest, EventBus, TransferBegun
from p2pacs.gateway import status
from p2pacs.gateway.find import FindAnswers
from p2pacs.gateway.rawsend import UnreadableInstance

__all__ = ["association_observers", "identifier_keys", "observed"]

Handler = Callable[[evt.Event], Iterator[Any]]

PENDING = (status.PENDING, 0xFF01)  # 0xFF01: pending, optional keys not supported


def identifier_keys(identifier: Dataset | None) -> tuple[tuple[str, str], ...]:
    """The identifier's keys with the values asked for, as text (sequences left out)."""
    if identifier is None:
        return ()
    keys = []
    for elem in identifier:
        if elem.VR == "SQ" or not elem.keyword:
            continue
        value = elem.value
        text = "\\".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        keys.append((elem.keyword, "" if value is None else text))
    return tuple(keys)


def _requestor(event: evt.Event) -> tuple[str, str]:
    req = event.assoc.requestor
    return req.ae_title.strip(), str(req.address)


def _values(keys: tuple[tuple[str, str], ...], keyword: str) -> tuple[str, ...]:
    return tuple(v for k, v in keys if k == keyword for v in v.split("\\") if v)


def observed(bus: EventBus, service: str, handler: Handler) -> Handler:
    """Wrap a C-FIND, C-MOVE or C-GET handler: emit one ``DicomRequest`` when it ends."""

    def wrapped(event: evt.Event) -> Iterator[Any]:
        return _watch(bus, service, event, handler(event))

    return wrapped


def _watch(bus: EventBus, service: str, event: evt.Event, items: Iterator[Any]) -> Iterator[Any]:
    started = time.perf_counter()
    try:
        identifier = event.identifier
    except Exception:  # undecodable: the handler itself answers that
        identifier = None
    final = status.SUCCESS
    sent = failed = 0
    # C-FIND: pending responses the handler wrote itself (``find._DirectResponses``)
    answers = items if isinstance(items, FindAnswers) else None
    if answers is not None:
        answers.on_first_direct = lambda: _begun(bus, service, event, identifier)
    try:
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int):
                code, payload = item
                direct = answers.direct if answers is not None else 0
                if code in PENDING and payload is not None and not sent + failed + direct:
                    _begun(bus, service, event, identifier)  # the first instance goes out
                if code in PENDING:
                    if payload is not None and service != "C-FIND":
                        if isinstance(payload, UnreadableInstance):
                            failed += 1
                        else:
                            sent += 1
                    elif service == "C-FIND":
                        sent += 1
                else:
                    final = code
            elif isinstance(item, tuple) and len(item) == 2 and item[0] is None:
                final = status.MOVE_DESTINATION_UNKNOWN
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()
        if answers is not None:
            sent += answers.direct
        if final == status.SUCCESS and failed and service != "C-FIND":
            # pynetdicom derives the final status from the sub-operations (PS3.4 C.4.2.1.5)
            final = status.WARNING_SUBOPS_FAILED if sent else status.OUT_OF_RESOURCES_SUBOPS
        ae, address = _requestor(event)
        keys = identifier_keys(identifier)
        bus.emit(
            DicomRequest(
                service=service,
                status=final,
                seconds=time.perf_counter() - started,
                calling_ae=ae,
                address=address,
                study_uids=_values(keys, "StudyInstanceUID"),
                patient_ids=_values(keys, "PatientID"),
                completed=sent,
                failed=failed,
                destination=str(event.move_destination).strip() if service == "C-MOVE" else "",
                level=dict(keys).get("QueryRetrieveLevel", ""),
                query=keys,
                sop_class_uid=str(getattr(event.request, "AffectedSOPClassUID", "") or ""),
            )
        )


def _begun(bus: EventBus, service: str, event: evt.Event, identifier: Dataset | None) -> None:
    """Begin Transferring (PS3.15 A.5.3.3): told once, before a C-MOVE/C-GET's first instance."""
    if service == "C-FIND":
        return
    keys = identifier_keys(identifier)
    bus.emit(
        TransferBegun(
            service,
            *_requestor(event),
            destination=str(event.move_destination).strip() if service == "C-MOVE" else "",
            level=dict(keys).get("QueryRetrieveLevel", ""),
            study_uids=_values(keys, "StudyInstanceUID"),
            patient_ids=_values(keys, "PatientID"),
        )
    )


def association_observers(bus: EventBus) -> list[tuple[Any, Callable[[evt.Event], None]]]:
    """pynetdicom handlers telling the bus when associations open and end."""

    def opened(event: evt.Event) -> None:
        bus.emit(AssociationEvent(True, *_requestor(event)))

    def ended(event: evt.Event) -> None:
        bus.emit(AssociationEvent(False, *_requestor(event)))

    return [(evt.EVT_ESTABLISHED, opened), (evt.EVT_RELEASED, ended), (evt.EVT_ABORTED, ended)]
