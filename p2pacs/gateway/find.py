"""C-FIND: Patient Root and Study Root queries answered from the index (PS3.4 C.4.1)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_sent_handler, standard_pdu_sent_handler

from p2pacs.dicom import Level
from p2pacs.dicom.header import typed_value
from p2pacs.errors import P2PacsError
from p2pacs.gateway import status
from p2pacs.gateway.dimsewire import COMMAND, pdata_frames
from p2pacs.gateway.findwire import IdentifierEncoder, pending_command
from p2pacs.gateway.rawsend import sendall, sending, watched
from p2pacs.index import DicomIndex

__all__ = ["FindAnswers", "FindHandler", "Query", "answering", "parse_identifier"]

log = logging.getLogger(__name__)

MAX_QUEUED = 4  # C-FIND responses queued for pynetdicom's DUL thread before we wait
SENDER_WAIT = 60.0  # seconds to wait for the DUL to take a response (then carry on)
BATCH_RESPONSES = 32  # pending responses written with one sendmsg (fewer system calls)
BATCH_BYTES = 64 * 1024  # bytes of pending responses held before they are written

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


def _observed(assoc: Any) -> bool:
    """Whether anything beyond pynetdicom's quiet standard handlers watches sent messages or
    PDUs (then responses take pynetdicom's path, which triggers those events)."""
    return watched(
        assoc,
        evt.EVT_DATA_SENT,
        (
            (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
            (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
        ),
        logging.INFO,
    )


class _DirectResponses:
    """Pending C-FIND responses framed and written by the handler's own thread.

    The command set is encoded once per request and each identifier straight from its index
    record (``findwire``); the P-DATA-TF PDUs go out through the association's direct writer
    (``rawsend``: its write lock keeps them from interleaving with the DUL thread's PDUs), a few
    responses per ``sendmsg``, the first at once. The socket's own back-pressure replaces
    ``_wait_for_sender``: a requestor that stops reading blocks the write (up to the network
    timeout), and the DUL thread keeps reading meanwhile, so a C-CANCEL is seen between two
    records. A record the encoder cannot write (see ``findwire``) is yielded to pynetdicom as
    before, inside ``rawsend.sending`` so it too is written in order, after what is pending here.
    """

    def __init__(
        self,
        assoc: Any,
        writer: Any,
        context_id: int,
        command: bytes,
        *,
        encoder: IdentifierEncoder,
        answers: FindAnswers,
    ):
        self.assoc = assoc
        self.answers = answers
        self.writer = writer
        self.context_id = context_id
        self.max_pdu = int(assoc.dimse.maximum_pdu_size or 0)
        self.command = pdata_frames(context_id, [command], COMMAND, self.max_pdu)
        self.encoder = encoder
        self.frames: list[bytes | memoryview] = []
        self.held = 0  # responses in ``frames``
        self.bytes = 0
        self.sent = 0

    @classmethod
    def open(
        cls, event: evt.Event, level: Level, query: Query, answers: FindAnswers
    ) -> _DirectResponses | None:
        """Direct responses for this request, or None where pynetdicom's path must be taken
        (no direct writer on the association, observed events, a big-endian or deflated
        syntax, binary keys)."""
        assoc = event.assoc
        writer = getattr(assoc, "p2pacs_writer", None)
        if writer is None or _observed(assoc):
            return None
        request = event.request
        if request.MessageID is None or request.AffectedSOPClassUID is None:
            return None
        try:
            syntax = UID(str(event.context.transfer_syntax))
            command = pending_command(str(request.AffectedSOPClassUID), int(request.MessageID))
        except ValueError:  # a non-ASCII SOP class UID: let pynetdicom deal with it
            return None
        if not syntax.is_little_endian or syntax.is_deflated:
            return None
        encoder = IdentifierEncoder(level, query, implicit=syntax.is_implicit_VR)
        if not encoder.supported:
            return None
        context_id = int(event.context.context_id)
        return cls(assoc, writer, context_id, command, encoder=encoder, answers=answers)

    def add(self, record: Mapping[str, Any]) -> bool | None:
        """Hold (and in batches write) the pending response for ``record``: True if done here,
        False if pynetdicom must encode this one, None if the association is gone."""
        identifier = self.encoder.encode(record)
        if identifier is None:
            return False if self.flush() else None
        self.frames += self.command
        self.frames += pdata_frames(self.context_id, [identifier], 0, self.max_pdu)
        self.held += 1
        self.bytes += len(identifier)
        if self.sent == 0 or self.held >= BATCH_RESPONSES or self.bytes >= BATCH_BYTES:
            return self.flush() or None
        return True

    def flush(self) -> bool:
        """Write what is held; False if the association can no longer be written."""
        frames, held = self.frames, self.held
        self.frames, self.held, self.bytes = [], 0, 0
        if not frames:
            return True
        dul = self.assoc.dul
        sock = getattr(dul.socket, "socket", None)
        if sock is None or dul.state_machine.current_state != "Sta6":
            return False
        try:
            with self.writer.lock:
                sendall(sock, frames)
        except OSError as exc:
            log.warning("C-FIND: association closed while answering: %s", exc)
            dul.event_queue.put("Evt17")  # transport closed, as pynetdicom's send reports it
            return False
        self.sent += 1
        dul._idle_timer.restart()  # the association is in use, as pynetdicom's sends count
        self.answers.sent_directly(held)
        return True


class FindAnswers:
    """What ``FindHandler`` returns to pynetdicom: the handler's items (statuses, and pending
    identifiers pynetdicom encodes), plus the count of pending responses written directly
    (``direct``), which pynetdicom never sees; observers (``observe``) count those too and
    learn of the first through ``on_first_direct``."""

    def __init__(self) -> None:
        self.items: Iterator[Any] = iter(())
        self.direct = 0
        self.on_first_direct: Callable[[], None] | None = None

    def __iter__(self) -> FindAnswers:
        return self

    def __next__(self) -> Any:
        return next(self.items)

    def close(self) -> None:
        close = getattr(self.items, "close", None)
        if close is not None:
            close()

    def sent_directly(self, count: int) -> None:
        first = self.direct == 0
        self.direct += count
        if first and count and self.on_first_direct is not None:
            self.on_first_direct()


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

    def __call__(self, event: evt.Event) -> FindAnswers:
        answers = FindAnswers()
        answers.items = answering(log, "C-FIND", self._find(event, answers))
        return answers

    def _find(
        self, event: evt.Event, answers: FindAnswers
    ) -> Generator[tuple[int, Dataset | None], None, None]:
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
        direct = _DirectResponses.open(event, level, query, answers)
        writing: AbstractContextManager[None] = (
            sending(event.assoc) if direct is not None else nullcontext()
        )
        try:
            with writing:
                for record in records:
                    if direct is None:
                        _wait_for_sender(event)
                    if cancel():
                        break
                    if direct is not None:
                        done = direct.add(record)
                        if done is None:
                            return  # the association is gone
                        if done:
                            continue
                    yield status.PENDING, _response(level, query, record)
                if direct is not None and not direct.flush():
                    return
        finally:
            records.close()
        if cancel():
            yield status.CANCEL, None
