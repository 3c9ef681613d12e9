"""C-FIND: Patient Root and Study Root queries answered from the index (PS3.4 C.4.1)."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import evt

from p2pacs.dicom import Level
from p2pacs.dicom.header import typed_value
from p2pacs.errors import P2PacsError
from p2pacs.gateway import status
from p2pacs.index import DicomIndex

__all__ = ["FindHandler", "Query", "answering", "parse_identifier"]

log = logging.getLogger(__name__)

MAX_QUEUED = 4  # C-FIND responses queued for pynetdicom's DUL thread before we wait
SENDER_WAIT = 60.0  # seconds to wait for the DUL to take a response (then carry on)

Query = dict[str, str | list[str] | None]
_SKIP = {"QueryRetrieveLevel", "SpecificCharacterSet"}


def parse_identifier(identifier: Dataset) -> tuple[Level, Query]:
    """The level and the keyword -> match string map of a C-FIND/MOVE/GET identifier."""
    try:
        level = Level(str(identifier.QueryRetrieveLevel).strip().upper())
    except (AttributeError, ValueError):
        raise ValueError("the identifier has no valid QueryRetrieveLevel") from None
    query: Query = {}
    for elem in identifier:
        keyword = elem.keyword
        if not keyword or keyword in _SKIP or elem.VR == "SQ":
            continue
        value = elem.value
        if value is None or value == "":
            query[keyword] = ""
        elif isinstance(value, MultiValue):
            query[keyword] = [str(v) for v in value]
        else:
            query[keyword] = str(value)
    return level, query


def _is_ascii(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_is_ascii(v) for v in value)
    return str(value).isascii()


def _response(level: Level, query: Query, record: dict[str, Any]) -> Dataset:
    ds = Dataset()
    if not all(_is_ascii(record.get(k, "")) for k in query):
        # the index keeps decoded text: send it as UTF-8 and say so (PS3.4 C.4.1.1.3.1);
        # without it pydicom would fall back to Latin-1 bytes under the default repertoire
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level.value
    for keyword in query:
        value = record.get(keyword, "")
        try:
            vr = dictionary_VR(keyword)
        except KeyError:
            continue
        setattr(ds, keyword, typed_value(vr, value))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
        if keyword in record and keyword not in ds and keyword in query:
            setattr(ds, keyword, record[keyword])
    return ds


def _wait_for_sender(event: evt.Event) -> None:
    """Keep at most MAX_QUEUED responses waiting for pynetdicom's DUL thread.

    pynetdicom queues every response without limit, and its DUL thread only reads the socket
    when it has nothing left to send: a query with many matches would sit in memory in full,
    and a C-CANCEL behind it would be read only after the last match was sent. Waiting here
    bounds the queue and lets the DUL read the C-CANCEL between responses.
    """
    queue = getattr(getattr(event.assoc, "dul", None), "to_provider_queue", None)
    if queue is None:
        return
    deadline = time.monotonic() + SENDER_WAIT
    while queue.qsize() > MAX_QUEUED and event.assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0005)


def answering(
    logger: logging.Logger,
    service: str,
    handler: Generator[Any, None, None],
    prefix: Sequence[Any] = (),
) -> Iterator[Any]:
    """Yield what a C-FIND/C-MOVE/C-GET ``handler`` yields; if it raises, end with 0xC001.

    An exception never reaches pynetdicom (it would answer with a code of its own and log the
    traceback in its own logger): a ``P2PacsError`` is logged as an error, anything else with
    its traceback, and the request ends with "Unable to process" (PS3.4 C.4.1.1.4, C.4.2.1.4,
    C.4.3.1.4). ``prefix`` is what pynetdicom reads before any status (C-GET: the number of
    sub-operations; C-MOVE: the destination, then that number): whatever part of it the
    handler had not yielded yet goes out first, so the status still reaches the requestor.
    """
    sent = 0
    try:
        for item in handler:
            yield item
            sent += 1
    except P2PacsError as exc:
        logger.error("%s failed: %s", service, exc)
    except Exception:
        logger.exception("%s failed unexpectedly", service)
    else:
        return
    finally:
        handler.close()  # pynetdicom may stop early: let the handler end its index reads now
    yield from prefix[sent:]
    yield status.UNABLE_TO_PROCESS, None


class _Cancel:
    """Has a C-CANCEL for this request arrived? pynetdicom's ``event.is_cancelled`` forgets the
    C-CANCEL once it has said so, and both the index walk and this handler ask: keep the yes."""

    def __init__(self, event: evt.Event):
        self._event = event
        self._seen = False

    def __call__(self) -> bool:
        self._seen = self._seen or bool(self._event.is_cancelled)
        return self._seen


class FindHandler:
    def __init__(self, index: DicomIndex):
        self.index = index

    def __call__(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        return answering(log, "C-FIND", self._find(event))

    def _find(self, event: evt.Event) -> Generator[tuple[int, Dataset | None], None, None]:
        try:
            level, query = parse_identifier(event.identifier)
        except Exception as exc:  # the requestor's identifier, decoded lazily by pydicom
            log.warning("C-FIND with a bad identifier: %s", exc)
            yield status.IDENTIFIER_DOES_NOT_MATCH, None
            return
        # the index reads lazily from one snapshot and polls the cancel flag while it walks
        # records that do not match; closing it (here, or when pynetdicom stops early and
        # ``answering`` closes this generator) ends the snapshot at once
        cancel = _Cancel(event)
        records = self.index.find(level, query, cancel)
        try:
            for record in records:
                _wait_for_sender(event)
                if cancel():
                    break
                yield status.PENDING, _response(level, query, record)
        finally:
            records.close()
        if cancel():
            yield status.CANCEL, None
