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
packed directly (``command_set``, byte-identical to pynetdicom's pydicom encoding), and the
C-STORE-RSP to a stored instance is read by the sending thread itself (``get_msg``): the DUL
thread, which otherwise reads the socket and runs the state machine, waits on ``read_lock``
meanwhile, and anything else read (a C-CANCEL, an A-ABORT, a fragmented response) is pushed
back for it to handle as usual. The DUL thread writes only A-ASSOCIATE, A-RELEASE and A-ABORT
PDUs, under the same write lock, so PDUs never interleave. Outside the Data Transfer state
(Sta6), or when handlers other than pynetdicom's quiet standard ones watch DIMSE or PDU events,
messages take pynetdicom's own path.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from typing import Any

import pynetdicom.association
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
)
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode as decode_dataset
from pynetdicom.dsutils import encode as encode_dataset

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

_PDU = struct.Struct(">BBL")  # P-DATA-TF: PDU type 04H, reserved, PDU length (PS3.8 9.3.5)
_PDV = struct.Struct(">LBB")  # PDV item: item length, presentation context ID, control header
P_DATA_TF = 0x04
COMMAND, LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
MAX_UNLIMITED_PDV = 0xFFFFFFFF - 6  # bytes of one PDV when the peer set no maximum (0)
IOV_BATCH = 512  # buffers per sendmsg call (Linux IOV_MAX is 1024)


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
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = ts
        self.SOPClassUID = UID(sop_class)
        self.SOPInstanceUID = UID(sop_uid)
        self.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian)
        self.p2pacs_encoding = (ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        self.p2pacs_prefix = prefix
        self.p2pacs_raw = raw
        self.p2pacs_direct = False  # set while a direct writer's send_c_store sends this
        self.p2pacs_deferred = False  # set by _encode: the direct writer sends p2pacs_data

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


def _send_c_store(self: Any, dataset: Any, *args: Any, **kwargs: Any) -> Any:
    """``Association.send_c_store``; a ``StoredInstance`` on an association with direct
    writes is handed to its writer, which sends the stored chunks as they are."""
    if isinstance(dataset, UnreadableInstance):
        refused = Dataset()
        refused.Status = CANNOT_SEND
        return refused
    writer = getattr(self, "p2pacs_writer", None)
    if writer is None or not isinstance(dataset, StoredInstance):
        return _original_send_c_store(self, dataset, *args, **kwargs)
    writer.pending = dataset
    dataset.p2pacs_direct, dataset.p2pacs_deferred = True, False
    try:
        return _original_send_c_store(self, dataset, *args, **kwargs)
    finally:
        writer.release_read()
        writer.pending = None
        dataset.p2pacs_direct = dataset.p2pacs_deferred = False


def install() -> None:
    """Route pynetdicom's C-STORE encoding and sending through this module (idempotent)."""
    setattr(pynetdicom.association, "encode", _encode)  # noqa: B010
    pynetdicom.association.Association.send_c_store = _send_c_store  # type: ignore[method-assign]


# --- command sets --------------------------------------------------------------------------

# command set elements of the messages sent for every sub-operation, in tag order, with their
# tag and VR (PS3.7 E.1); pynetdicom encodes the same elements through pydicom, ~0.1 ms a message
_US, _UI, _AE = "US", "UI", "AE"
_ELEMENTS: dict[tuple[type, bool], tuple[int, tuple[tuple[str, int, str], ...]]] = {
    (C_STORE, False): (
        0x0001,
        (
            ("AffectedSOPClassUID", 0x0002, _UI),
            ("CommandField", 0x0100, _US),
            ("MessageID", 0x0110, _US),
            ("Priority", 0x0700, _US),
            ("CommandDataSetType", 0x0800, _US),
            ("AffectedSOPInstanceUID", 0x1000, _UI),
            ("MoveOriginatorApplicationEntityTitle", 0x1030, _AE),
            ("MoveOriginatorMessageID", 0x1031, _US),
        ),
    ),
    **{
        (cls, True): (
            field,
            (
                ("AffectedSOPClassUID", 0x0002, _UI),
                ("CommandField", 0x0100, _US),
                ("MessageIDBeingRespondedTo", 0x0120, _US),
                ("CommandDataSetType", 0x0800, _US),
                ("Status", 0x0900, _US),
                ("NumberOfRemainingSuboperations", 0x1020, _US),
                ("NumberOfCompletedSuboperations", 0x1021, _US),
                ("NumberOfFailedSuboperations", 0x1022, _US),
                ("NumberOfWarningSuboperations", 0x1023, _US),
            ),
        )
        for cls, field in ((C_GET, 0x8010), (C_MOVE, 0x8021))
    },
}
_DATASET_OF = {C_STORE: "DataSet", C_GET: "Identifier", C_MOVE: "Identifier"}
_RARE = ("OffendingElement", "ErrorComment", "ErrorID", "FailedSOPInstanceUIDList")
_ELEMENT = struct.Struct("<HHL")  # implicit VR little endian: group, element, value length
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")


def command_set(primitive: Any) -> tuple[bytes, Any] | None:
    """The encoded command set (implicit VR little endian, PS3.7 6.3.1) of a C-STORE-RQ or a
    C-GET/C-MOVE-RSP and the data set the message carries (a ``BytesIO`` or None), exactly as
    pynetdicom encodes them; None for any other message or a rare element (error comment,
    offending element…), which pynetdicom encodes instead."""
    spec = _ELEMENTS.get((type(primitive), primitive.MessageIDBeingRespondedTo is not None))
    if spec is None or any(getattr(primitive, k, None) is not None for k in _RARE):
        return None
    field, elements = spec
    data = getattr(primitive, _DATASET_OF[type(primitive)], None)
    parts = []
    for keyword, element, vr in elements:
        if keyword == "CommandField":
            value: Any = field
        elif keyword == "CommandDataSetType":
            value = 0x0001 if data else 0x0101
        else:
            value = getattr(primitive, keyword)
            if value is None:
                continue
        if vr == _US:
            raw = _U16.pack(value)
        else:
            raw = str(value).encode("ascii")
            if len(raw) % 2:
                raw += b"\0" if vr == _UI else b" "
        parts.append(_ELEMENT.pack(0x0000, element, len(raw)) + raw)
    body = b"".join(parts)
    return _ELEMENT.pack(0, 0, 4) + _U32.pack(len(body)) + body, data


# elements a plain C-STORE-RSP holds: group length, affected SOP class, command field, message
# ID being responded to, data set type, status, affected SOP instance (PS3.7 9.3.1.2)
_PLAIN_STORE_RSP = frozenset({0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000})


def store_response(command: bytes, message_id: int) -> C_STORE | None:
    """The C-STORE-RSP primitive for the command set ``command`` (implicit VR little endian) if
    it answers ``message_id`` without a data set; None for anything else (left to pynetdicom)."""
    fields: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos + 8 <= end:
        group, element, length = _ELEMENT.unpack_from(command, pos)
        pos += 8
        if group != 0 or pos + length > end:
            return None
        fields[element] = command[pos : pos + length]
        pos += length
    if pos != end or fields.get(0x0100) != b"\x01\x80" or len(fields.get(0x0900, b"")) != 2:
        return None
    if fields.get(0x0120) != _U16.pack(message_id) or fields.get(0x0800) != b"\x01\x01":
        return None
    if fields.keys() <= _PLAIN_STORE_RSP:
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.Status = _U16.unpack(fields[0x0900])[0]
        return rsp
    msg = C_STORE_RSP()  # error comment, offending element…: decoded as pynetdicom does
    msg.command_set = decode_dataset(BytesIO(command), True, True)
    primitive = msg.message_to_primitive()
    return primitive if isinstance(primitive, C_STORE) else None


# --- direct writes ---------------------------------------------------------------------------


def pdata_frames(
    context_id: int, payload: Sequence[bytes | memoryview], control: int, max_pdu: int
) -> list[bytes | memoryview]:
    """P-DATA-TF PDUs carrying ``payload`` (one message's command or data set) as buffers to
    write in order: per PDU one 12-byte header (PDU and PDV headers) and views of the payload,
    never a copy. ``control`` is 0 (data) or ``COMMAND``; the last fragment gets ``LAST``.
    ``max_pdu`` is the peer's maximum PDU length (0: unlimited); each PDV holds at most
    ``max_pdu - 6`` bytes, as pynetdicom fragments."""
    limit = max_pdu - 6 if max_pdu else MAX_UNLIMITED_PDV
    if limit < 1:
        raise ValueError(f"maximum PDU length {max_pdu} leaves no room for data")
    fragments: list[tuple[list[memoryview], int]] = []
    pieces: list[memoryview] = []
    n = 0
    for chunk in payload:
        view = memoryview(chunk)
        pos, end = 0, len(view)
        while pos < end:
            take = min(limit - n, end - pos)
            pieces.append(view[pos : pos + take])
            n += take
            pos += take
            if n == limit:
                fragments.append((pieces, n))
                pieces, n = [], 0
    if n:
        fragments.append((pieces, n))
    out: list[bytes | memoryview] = []
    last = len(fragments) - 1
    for i, (parts, size) in enumerate(fragments):
        flags = control | (LAST if i == last else 0)
        out.append(_PDU.pack(P_DATA_TF, 0, size + 6) + _PDV.pack(size + 2, context_id, flags))
        out.extend(parts)
    return out


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
        assoc.p2pacs_writer = self

    def _observed(self) -> bool:
        """Whether anything watches EVT_DIMSE_SENT: a handler of our own, or pynetdicom's
        standard one with its logger enabled (it logs each message at INFO)."""
        handlers = self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        if any(h[0] is not standard_dimse_sent_handler for h in handlers):
            return True
        return bool(handlers) and _PYNETDICOM_LOG.isEnabledFor(logging.INFO)

    def _read_observed(self) -> bool:
        """Whether anything watches received PDUs and messages beyond pynetdicom's quiet
        standard handlers (then responses take pynetdicom's path, which triggers them)."""
        get = self.assoc.get_handlers
        if get(evt.EVT_DATA_RECV):
            return True
        for event, standard in (
            (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
            (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
        ):
            handlers = get(event)
            if any(h[0] is not standard for h in handlers):
                return True
            if handlers and _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG):
                return True
        return False

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
        sock = getattr(self.dul.socket, "socket", None)
        if sock is None:
            return None
        data = bytearray()
        try:
            if not _recv_into(sock, data, 6):
                return self._push(data)
            _, _, length = _PDU.unpack_from(data)
            if data[0] != P_DATA_TF or length > 0x10000 or not _recv_into(sock, data, 6 + length):
                return self._push(data)
        except OSError:  # timeout or closed: pynetdicom's reader sees it the same way
            return self._push(data)
        self.dul._idle_timer.restart()  # as the DUL does for every PDU it reads
        if length < 6:
            return self._push(data)
        item, cx, control = _PDV.unpack_from(data, 6)
        if item + 4 != length or cx != context_id or control != COMMAND | LAST:
            return self._push(data)
        rsp = store_response(bytes(data[12:]), message_id)
        return rsp if rsp is not None else self._push(data)

    def _push(self, data: bytearray) -> C_STORE | None:
        """Leave ``data`` for the DUL thread to read; None (no response read here)."""
        self.pushback += data
        return None

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
    (the gateway's associations: C-FIND responses keep pynetdicom's queue, whose depth is
    how the C-FIND handler notices a slow reader, see ``find.MAX_QUEUED``)."""
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
