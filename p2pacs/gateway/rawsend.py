"""Send stored instances byte for byte, without copies on the way out.

pynetdicom's C-GET/C-MOVE service takes ``Dataset`` objects from the handler and re-encodes
them for each C-STORE sub-operation, which would change deflated, big-endian or unusual
encodings. ``StoredInstance`` is a ``Dataset`` with just the identifying elements plus the
stored bytes; the encoder used by ``Association.send_c_store`` is wrapped so that, when the
negotiated transfer syntax has the stored encoding, those bytes are sent unchanged. For any
other negotiated syntax the full dataset is decoded and encoded as pynetdicom normally would.

**Direct writes.** pynetdicom sends a DIMSE message by slicing the encoded bytes into
fragments, prefixing each (a copy), queueing them as P-DATA primitives for its DUL thread,
which encodes each into a P-DATA-TF PDU (another copy) and writes it; each fragment crosses
two threads and a poll loop. On associations where ``direct_writes`` is installed
(``EVT_ESTABLISHED``), every DIMSE message is instead framed and written by the thread that
sends it, in one ``sendmsg`` of PDU headers and views of the payload (PS3.8 9.3.5: one PDV
per P-DATA-TF, at most the peer's maximum PDU length, command fragments first). For a
``StoredInstance`` the payload is the verified blob (``Archive.blob``) itself: the only copy
left after the read is the kernel's. The command sets of C-STORE-RQ and C-GET/C-MOVE-RSP are
packed directly (``gateway.dimsewire``, byte-identical to pynetdicom's pydicom encoding), and
the C-STORE-RSP to a stored instance is read by the sending thread itself: the DUL thread, which
otherwise reads the socket and runs the state machine, waits on ``read_lock`` meanwhile, and
anything else read (a C-CANCEL, an A-ABORT, a fragmented response) is pushed back for it to
handle as usual. A stored instance's whole sub-operation (``_Writer.store``) skips pynetdicom's
``send_c_store``, which pauses the association's reactor before each request and waits for it
to pause (up to its 1 ms sleep: on a C-MOVE sub-association, up to 1 ms per instance); the
reactor is paused only when the response has to go through pynetdicom's reader after all.
The DUL thread writes only A-ASSOCIATE, A-RELEASE and A-ABORT PDUs, under the same write lock,
so PDUs never interleave. Outside the Data Transfer state
(Sta6), or when handlers other than pynetdicom's quiet standard ones watch DIMSE or PDU events,
messages take pynetdicom's own path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from typing import Any

import pynetdicom.association
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
)
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode as encode_dataset

from p2pacs.gateway.dimsewire import (
    COMMAND,
    LAST,
    P_DATA_TF,
    PDU_HEADER,
    PDV_HEADER,
    command_set,
    pdata_frames,
    plain_store_status,
    store_request,
    store_response,
)

__all__ = [
    "StoredInstance",
    "UnreadableInstance",
    "direct_writes",
    "direct_writes_when_sending",
    "install",
    "sending",
]

log = logging.getLogger(__name__)
_PYNETDICOM_LOG = logging.getLogger("pynetdicom")

_original_encode = getattr(pynetdicom.association, "encode")  # noqa: B009
_original_send_c_store = pynetdicom.association.Association.send_c_store

IOV_BATCH = 512  # buffers per sendmsg call (Linux IOV_MAX is 1024)
PAUSE_POLL = 0.0001  # seconds between checks that a reactor has paused (pynetdicom's own)


_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018  # SOP Class / Instance UID


class StoredInstance(Dataset):
    """Identifying elements and file meta of an instance, plus its encoded dataset bytes."""

    def __init__(
        self,
        sop_class: str,
        sop_uid: str,
        transfer_syntax: str,
        prefix: bytes,
        raw: bytes,
    ):
        super().__init__()
        ts = UID(transfer_syntax)
        # by tag, not keyword: one of these is built per sub-operation
        self[_SOP_CLASS] = DataElement(_SOP_CLASS, "UI", sop_class)
        self[_SOP_INSTANCE] = DataElement(_SOP_INSTANCE, "UI", sop_uid)
        self.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian)
        self.p2pacs_encoding = (ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        self.p2pacs_ids = (str(sop_class), str(sop_uid), str(transfer_syntax))
        self.p2pacs_meta: FileMetaDataset | None = None
        self.p2pacs_prefix = prefix
        self.p2pacs_raw = raw
        self.p2pacs_direct = False  # set while a direct writer's send_c_store sends this
        self.p2pacs_deferred = False  # set by _encode: the direct writer sends p2pacs_data

    @property
    def file_meta(self) -> FileMetaDataset:
        """Transfer Syntax UID only, made when first read: the direct path never reads it, and
        a ``FileMetaDataset`` costs ~40 µs to build and set."""
        meta = self.p2pacs_meta
        if meta is None:
            meta = FileMetaDataset()
            meta.TransferSyntaxUID = UID(self.p2pacs_ids[2])
            self.p2pacs_meta = meta
        return meta

    @file_meta.setter
    def file_meta(self, value: FileMetaDataset) -> None:
        self.p2pacs_meta = value

    @property
    def p2pacs_part10(self) -> tuple[bytes, bytes]:
        """(file meta prefix, dataset bytes)."""
        return self.p2pacs_prefix, self.p2pacs_raw


class UnreadableInstance(Dataset):
    """An instance whose stored bytes could not be read or verified, or converted to a syntax
    the peer accepted: ``send_c_store`` sends nothing for it and answers ``CANNOT_SEND``, so
    pynetdicom counts a failed sub-operation and lists the instance in Failed SOP Instance UID
    List (a ``None`` dataset would be skipped by pynetdicom without being counted)."""

    def __init__(self, sop_class: str, sop_uid: str):
        super().__init__()
        self.SOPClassUID = UID(sop_class)
        self.SOPInstanceUID = UID(sop_uid)


CANNOT_SEND = 0xC000  # C-STORE failure status (PS3.4 B.2.3 "Cannot understand" range)


def _encode(
    ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> Any:
    if isinstance(ds, StoredInstance):
        if ds.p2pacs_encoding == (is_implicit_vr, is_little_endian, deflated):
            if ds.p2pacs_direct:
                ds.p2pacs_deferred = True  # sent from the stored chunks by the direct writer
                return b""
            return ds.p2pacs_raw
        ds = dcmread(BytesIO(ds.p2pacs_prefix + ds.p2pacs_raw))
    return _original_encode(ds, is_implicit_vr, is_little_endian, deflated)


def _send_c_store(  # noqa: PLR0917 (pynetdicom's signature)
    self: Any,
    dataset: Any,
    msg_id: int = 1,
    priority: int = 2,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> Any:
    """``Association.send_c_store``; a ``StoredInstance`` on an association with direct
    writes is sent and answered by its writer (``_Writer.store``), or else handed to it inside
    pynetdicom's own ``send_c_store``, which then sends the stored chunks as they are."""
    if isinstance(dataset, UnreadableInstance):
        return status_dataset(CANNOT_SEND)
    args = (msg_id, priority, originator_aet, originator_id)
    writer = getattr(self, "p2pacs_writer", None)
    if writer is None or not isinstance(dataset, StoredInstance):
        return _original_send_c_store(self, dataset, *args)
    answered = writer.store(
        dataset,
        msg_id=msg_id,
        priority=priority,
        originator_aet=originator_aet,
        originator_id=originator_id,
    )
    if answered is not None:
        return answered
    writer.pending = dataset
    dataset.p2pacs_direct, dataset.p2pacs_deferred = True, False
    try:
        return _original_send_c_store(self, dataset, *args)
    finally:
        writer.release_read()
        writer.pending = None
        dataset.p2pacs_direct = dataset.p2pacs_deferred = False


def status_dataset(status: int) -> Dataset:
    """What ``send_c_store`` returns for a response holding only a Status (PS3.7 9.1.1.1.9).
    One dataset per status value, shared: pynetdicom's C-GET/C-MOVE service, the only caller
    of ``send_c_store`` on these associations, reads its Status and nothing else, and building
    a pydicom dataset per sub-operation cost ~25 µs."""
    ds = _STATUS_DATASETS.get(status)
    if ds is None:
        ds = Dataset()
        ds.Status = status
        _STATUS_DATASETS[status] = ds
    return ds


_STATUS_DATASETS: dict[int, Dataset] = {}


def install() -> None:
    """Route pynetdicom's C-STORE encoding and sending through this module (idempotent)."""
    setattr(pynetdicom.association, "encode", _encode)  # noqa: B010
    pynetdicom.association.Association.send_c_store = _send_c_store  # type: ignore[method-assign]


# --- direct writes ---------------------------------------------------------------------------


def _recv_into(sock: Any, buf: bytearray, size: int) -> bool:
    """Read until ``buf`` holds ``size`` bytes; False if the peer closed first."""
    while len(buf) < size:
        piece = sock.recv(size - len(buf))
        if not piece:
            return False
        buf += piece
    return True


def sendall(sock: Any, buffers: list[bytes | memoryview]) -> None:
    """Write every buffer in order with ``sendmsg`` (partial writes resumed without copies)."""
    bufs = [memoryview(b) for b in buffers]
    i = 0
    while i < len(bufs):
        sent = sock.sendmsg(bufs[i : i + IOV_BATCH])
        while sent:
            size = len(bufs[i])
            if sent >= size:
                sent -= size
                i += 1
            else:
                bufs[i] = bufs[i][sent:]
                sent = 0
        while i < len(bufs) and not len(bufs[i]):
            i += 1


def watched(assoc: Any, raw_event: Any, events: Sequence[tuple[Any, Any]], level: int) -> bool:
    """Whether anything beyond pynetdicom's quiet standard handlers watches the association:
    a handler of ``raw_event`` (raw bytes), or for each ``(event, standard)`` a handler other
    than pynetdicom's ``standard`` one, or that one with the ``pynetdicom`` logger enabled for
    ``level``. Direct paths (send, receive, C-FIND responses) skip those events, so where
    anything watches them, pynetdicom's own path is taken, which triggers them."""
    get = assoc.get_handlers
    if raw_event is not None and get(raw_event):
        return True
    for event, standard in events:
        handlers = get(event)
        if any(h[0] is not standard for h in handlers):
            return True
        if handlers and _PYNETDICOM_LOG.isEnabledFor(level):
            return True
    return False


class _Writer:
    """Frames and writes the DIMSE messages of one association (see the module docstring)."""

    def __init__(self, assoc: Any, *, active: bool):
        self.assoc = assoc
        self.active = active  # False: every message takes pynetdicom's path
        self.dul = assoc.dul
        self.dimse = assoc.dimse
        self.lock = threading.Lock()
        self.pending: StoredInstance | None = None
        self._queued_send_msg: Callable[[Any, int], None] = assoc.dimse.send_msg
        transport = assoc.dul.socket
        dul_send = transport.send

        def locked_send(data: bytes) -> None:  # the DUL thread's own writes (ACSE PDUs)
            with self.lock:
                dul_send(data)

        transport.send = locked_send
        assoc.dimse.send_msg = self.send_msg
        # reads: the DUL thread reads under read_lock; bytes read here that are not the awaited
        # C-STORE-RSP go back to it through ``pushback``
        self.read_lock = threading.Lock()
        self.pushback = bytearray()
        # (message ID, context ID, sending thread) of the C-STORE-RQ whose response is read here
        self.awaiting: tuple[int, int, int] | None = None
        dul_recv = transport.recv
        is_transport_event = assoc.dul._is_transport_event

        def recv(nr_bytes: int) -> bytearray:
            if not self.pushback:
                return bytearray(dul_recv(nr_bytes))
            out = self.pushback[:nr_bytes]
            del self.pushback[:nr_bytes]
            if len(out) < nr_bytes:
                out += dul_recv(nr_bytes - len(out))
            return out

        def guarded_is_transport_event() -> bool:
            with self.read_lock:
                if self.pushback:
                    self.dul._read_pdu_data()
                    return True
                return bool(is_transport_event())

        transport.recv = recv
        assoc.dul._is_transport_event = guarded_is_transport_event
        self._queued_get_msg: Callable[..., Any] = assoc.dimse.get_msg
        assoc.dimse.get_msg = self.get_msg
        # (SOP class, transfer syntax) -> ID of the accepted context with exactly that syntax
        self._contexts: dict[tuple[str, str], int | None] = {}
        assoc.p2pacs_writer = self

    def _observed(self) -> bool:
        """Whether anything watches EVT_DIMSE_SENT (pynetdicom's standard handler logs each
        message at INFO)."""
        sent = ((evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),)
        return watched(self.assoc, None, sent, logging.INFO)

    def _read_observed(self) -> bool:
        """Whether anything watches received PDUs and messages beyond pynetdicom's quiet
        standard handlers (then responses take pynetdicom's path, which triggers them)."""
        return watched(
            self.assoc,
            evt.EVT_DATA_RECV,
            (
                (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
                (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
            ),
            logging.DEBUG,
        )

    def store(
        self,
        ds: StoredInstance,
        *,
        msg_id: int,
        priority: int,
        originator_aet: str | None,
        originator_id: int | None,
    ) -> Dataset | None:
        """One C-STORE sub-operation of ``ds``, sent as stored and answered in this thread;
        its status as ``send_c_store`` returns it, or None where this path does not apply
        (observers, a syntax other than the stored one, a message half received…).

        pynetdicom's ``send_c_store`` first pauses the association's reactor and waits until
        it is paused, because the reactor could otherwise take the response off the DIMSE
        queue first; its reactor sleeps 1 ms a turn, so on a C-MOVE sub-association each
        C-STORE waited up to 1 ms for nothing. Here the response never reaches that queue: it
        is read under ``read_lock``, which keeps the DUL thread from reading meanwhile, so
        there is nothing for the reactor to take. Only when the response cannot be read here
        (pushed back for the DUL thread) is the reactor paused, before the DUL thread can
        see it, and the response awaited as pynetdicom does."""
        sock = getattr(self.dul.socket, "socket", None)
        if (
            not self.active
            or sock is None
            or self.dul.state_machine.current_state != "Sta6"
            or self.dimse.message is not None
            or not self.dimse.msg_queue.empty()
            or self._observed()
            or self._read_observed()
        ):
            return None
        sop_class, sop_uid, ts = ds.p2pacs_ids
        context_id = self._context(sop_class, ts)
        if context_id is None:
            return None
        command = store_request(
            sop_class,
            sop_uid,
            msg_id,
            priority=priority,
            originator_aet=originator_aet,
            originator_id=originator_id,
        )
        max_pdu = int(self.dimse.maximum_pdu_size or 0)
        frames = pdata_frames(context_id, [command], COMMAND, max_pdu)
        frames += pdata_frames(context_id, [ds.p2pacs_raw], 0, max_pdu)
        self.read_lock.acquire()
        holding = True  # released on every way out, or the DUL thread would never read again
        try:
            data = None
            try:
                with self.lock:
                    sendall(sock, frames)
            except OSError as exc:  # as pynetdicom's AssociationSocket.send: transport closed
                log.warning("association closed while sending: %s", exc)
                self.dul.event_queue.put("Evt17")
            else:
                data = self._read_command_pdu(context_id)
            rsp = None
            if data is not None:
                status = plain_store_status(memoryview(data)[12:], msg_id)
                if status is not None:
                    return status_dataset(status)
                rsp = store_response(bytes(data[12:]), msg_id)
                if rsp is None:
                    self._push(data)
            if rsp is None:
                holding = False
                rsp = self._await_queued()
                if rsp is None:
                    self.assoc._handle_no_response()
                    return Dataset()
        finally:
            if holding:
                self.read_lock.release()
        status_ds: Dataset = self.assoc._check_received_status(rsp)
        return status_ds

    def _context(self, sop_class: str, ts: str) -> int | None:
        """The accepted context (as SCU) for ``sop_class`` with exactly the syntax ``ts``."""
        key = (sop_class, ts)
        if key not in self._contexts:
            found = None
            for cx in self.assoc.accepted_contexts:
                if cx.abstract_syntax == sop_class and cx.as_scu and cx.transfer_syntax[0] == ts:
                    found = int(cx.context_id)
                    break
            self._contexts[key] = found
        return self._contexts[key]

    def _await_queued(self) -> Any:
        """The response pynetdicom's DUL thread will decode from what was pushed back (or
        None: closed, timed out). Called holding ``read_lock``: the reactor is paused first,
        as pynetdicom's ``send_c_store`` pauses it, so it cannot take the response."""
        assoc = self.assoc
        # a C-GET's sub-operations run in the association's own thread, its reactor
        paused_here = threading.current_thread() is not assoc
        try:
            if paused_here:
                assoc._reactor_checkpoint.clear()
                while not assoc._is_paused:
                    time.sleep(PAUSE_POLL)
        finally:
            self.read_lock.release()
        try:
            _, rsp = self._queued_get_msg(True)
        finally:
            if paused_here:
                assoc._reactor_checkpoint.set()
        return rsp

    def get_msg(self, block: bool = False) -> Any:
        """``dimse.get_msg``: the response to a stored instance just sent is read here."""
        awaiting = self.awaiting
        # other threads (a requestor's reactor polls without blocking) take pynetdicom's path
        if awaiting is None or not block or awaiting[2] != threading.get_ident():
            return self._queued_get_msg(block)
        self.awaiting = None
        try:
            rsp = self._read_store_response(awaiting[0], awaiting[1])
        finally:
            self.read_lock.release()
        if rsp is not None:
            return awaiting[1], rsp
        return self._queued_get_msg(block)

    def release_read(self) -> None:
        """Give reading back to the DUL thread if a send did not reach ``get_msg``."""
        awaiting = self.awaiting
        if awaiting is not None and awaiting[2] == threading.get_ident():
            self.awaiting = None
            self.read_lock.release()

    def _read_store_response(self, message_id: int, context_id: int) -> C_STORE | None:
        """Read one PDU: the C-STORE-RSP to ``message_id`` in one PDV, or None with what was
        read pushed back for the DUL thread (a C-CANCEL, an A-ABORT, a fragmented command…)."""
        data = self._read_command_pdu(context_id)
        if data is None:
            return None
        rsp = store_response(bytes(data[12:]), message_id)
        if rsp is None:
            self._push(data)
        return rsp

    def _read_command_pdu(self, context_id: int) -> bytearray | None:
        """Read one PDU: a P-DATA-TF holding one whole command in one PDV on ``context_id``
        (returned with its 12 header bytes), or None with what was read pushed back."""
        sock = getattr(self.dul.socket, "socket", None)
        if sock is None:
            return None
        data = bytearray()
        try:
            whole = _recv_into(sock, data, 6)
            if whole:
                _, _, length = PDU_HEADER.unpack_from(data)
                whole = data[0] == P_DATA_TF and length <= 0x10000
                whole = whole and _recv_into(sock, data, 6 + length)
        except OSError:  # timeout or closed: pynetdicom's reader sees it the same way
            whole = False
        if whole:
            self.dul._idle_timer.restart()  # as the DUL does for every PDU it reads
            if length >= 6:
                item, cx, control = PDV_HEADER.unpack_from(data, 6)
                if item + 4 == length and cx == context_id and control == COMMAND | LAST:
                    return data
        self._push(data)
        return None

    def _push(self, data: bytearray) -> None:
        """Leave ``data`` for the DUL thread to read (no response read here)."""
        self.pushback += data

    def send_msg(self, primitive: Any, context_id: int) -> None:
        pending = self.pending
        stored = (
            pending
            if pending is not None and pending.p2pacs_deferred and isinstance(primitive, C_STORE)
            else None
        )
        transport = self.dul.socket
        sock = getattr(transport, "socket", None)
        if not self.active or self.dul.state_machine.current_state != "Sta6" or sock is None:
            if stored is not None:  # pynetdicom's own path needs the bytes in the primitive
                primitive.DataSet = BytesIO(stored.p2pacs_raw)
            self._queued_send_msg(primitive, context_id)
            return
        fast = None if self._observed() else command_set(primitive)
        if fast is not None:
            command, dataset = fast
        else:
            if primitive.MessageIDBeingRespondedTo is None:
                msg = _RQ_TO_MESSAGE[primitive.__class__]()
            else:
                msg = _RSP_TO_MESSAGE[primitive.__class__]()
            msg.primitive_to_message(primitive)
            msg.context_id = context_id
            if getattr(msg, "_data_set_path", None) is not None:  # a file pynetdicom streams
                self._queued_send_msg(primitive, context_id)
                return
            evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": msg})
            encoded = encode_dataset(msg.command_set, True, True)
            if encoded is None:
                raise ValueError(f"cannot encode the command set of {type(msg).__name__}")
            command = encoded
            dataset = msg.data_set
        max_pdu = int(self.dimse.maximum_pdu_size or 0)
        frames = pdata_frames(context_id, [command], COMMAND, max_pdu)
        if stored is not None:
            data: Sequence[bytes | memoryview] = [stored.p2pacs_raw]
        elif dataset is not None:
            data = [dataset.getvalue()]
        else:
            data = []
        if any(len(c) for c in data):
            frames += pdata_frames(context_id, data, 0, max_pdu)
        read_here = (
            stored is not None
            and fast is not None
            and self.dimse.message is None
            and self.dimse.msg_queue.empty()
            and not self._read_observed()
        )
        if read_here:  # hold reading from before the request goes out until its response
            self.read_lock.acquire()
            self.awaiting = (int(primitive.MessageID), context_id, threading.get_ident())
        try:
            with self.lock:
                sendall(sock, frames)
        except OSError as exc:
            self.release_read()  # as pynetdicom's AssociationSocket.send: transport closed
            log.warning("association closed while sending: %s", exc)
            self.dul.event_queue.put("Evt17")


def direct_writes(event: evt.Event) -> None:
    """``EVT_ESTABLISHED`` handler: frame and write this association's DIMSE messages in the
    sending thread (see the module docstring). For associations that only send C-STOREs (a
    C-MOVE's sub-association)."""
    assoc = event.assoc
    if getattr(assoc, "p2pacs_writer", None) is None and assoc.dul.socket is not None:
        _Writer(assoc, active=True)


def direct_writes_when_sending(event: evt.Event) -> None:
    """``EVT_ESTABLISHED`` handler: prepare direct writes, used only inside ``sending``
    (the gateway's associations, for C-GET/C-MOVE sub-operations; C-FIND's direct responses
    take the writer's lock themselves, ``find._DirectResponses``)."""
    assoc = event.assoc
    if getattr(assoc, "p2pacs_writer", None) is None and assoc.dul.socket is not None:
        _Writer(assoc, active=False)


@contextmanager
def sending(assoc: Any) -> Iterator[None]:
    """Write directly on ``assoc`` for the duration (C-GET sub-operations and the pending
    responses of a C-GET or C-MOVE). Nothing of an earlier request waits in pynetdicom's queue
    then: a requestor sends its next request only after the final response to the last one."""
    writer = getattr(assoc, "p2pacs_writer", None)
    if writer is None or writer.active:
        yield
        return
    writer.active = True
    try:
        yield
    finally:
        writer.active = False
