"""Receive C-STORE data sets straight off the socket into one buffer; answer them cheaply.

pynetdicom reads a PDU 4 KiB at a time into a bytearray, copies it to ``bytes`` for
``EVT_DATA_RECV``, decodes it into a ``P_DATA_TF`` whose PDV items are more copies, turns that
into a ``P_DATA`` primitive, passes one DUL loop turn (event queue, state machine) per PDU, and
its DIMSE provider writes each fragment into a ``BytesIO``; the command set becomes a
``DIMSEMessage`` (a pydicom ``Dataset`` of every command element, built and decoded) and then a
primitive. Its C-STORE-RSP takes the same machinery the other way. For a 0.5 MB instance that
is ~130 ``recv`` calls, four copies and several hundred µs of object building per message.

``fast_receive`` (an ``EVT_ESTABLISHED`` handler) replaces the DUL's ``_read_pdu_data`` on
an acceptor's association. While the association is in Data Transfer (Sta6) over plain TCP
(a TLS socket keeps pynetdicom's path) and nothing watches received PDUs or messages beyond
pynetdicom's quiet standard handlers, a P-DATA-TF is read PDV by PDV (PS3.8 9.3.5: 6-byte
PDU header, then items of length, context ID, message control header and fragment), and the
whole DIMSE message is read in that one call (PS3.8 9.3.1: no fragment of another message
comes between). A C-STORE-RQ's command set is parsed here
(``store_request``) and its data set fragments are read with ``recv_into`` straight into the
buffer of a ``BytesIO`` grown ahead of the data (``DatasetBuffer``), so the handler's
``getvalue()`` is that buffer: the only copy is the kernel's. The primitive goes on the DIMSE
message queue exactly where pynetdicom puts it. Every other message (C-ECHO, C-FIND, C-GET,
N-ACTION…) is handed to pynetdicom's DIMSE provider fragment by fragment (``receive_primitive``,
what the state machine's DT-2 does), and every other PDU (A-RELEASE, A-ABORT…) to its state
machine as ``_read_pdu_data`` would. A PDV that does not fit its PDU, a data set fragment
before the command set is complete, a command fragment or another context in the middle of a
data set are invalid PDUs (Evt19: the association is aborted, nothing is stored); a connection
that closes mid-PDU is Evt17, as in pynetdicom. A peer that sends nothing for the network
timeout in the middle of a message loses that message, and pynetdicom's idle timer aborts the
association (pynetdicom itself would wait for ever in the middle of a PDU).

The C-STORE-RSP of a plain status (``store_response_command``) is encoded here, byte-identical
to pynetdicom's encoding, and queued for the DUL thread as one P-DATA primitive.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
from io import BytesIO
from typing import Any, cast

from pynetdicom import _config, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from p2pacs.errors import P2PacsError
from p2pacs.gateway.rawsend import watched

__all__ = [
    "DatasetBuffer",
    "InvalidPduError",
    "StoreRequest",
    "fast_receive",
    "pdv_header",
    "store_request",
    "store_response_command",
]

log = logging.getLogger(__name__)

_PDU = struct.Struct(">BBL")  # PDU type, reserved, PDU length (PS3.8 9.3.1)
_PDV = struct.Struct(">LBB")  # PDV item length, presentation context ID, control header
_ELEMENT = struct.Struct("<HHL")  # implicit VR little endian: group, element, value length
_U16 = struct.Struct("<H")
P_DATA_TF = 0x04
PDU_TYPES = frozenset(range(0x01, 0x08))  # A-ASSOCIATE-RQ … A-ABORT (PS3.8 9.3.1)
COMMAND, LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
NO_DATASET = 0x0101  # Command Data Set Type: no data set follows (PS3.7 E.1)
C_STORE_RQ_FIELD, C_STORE_RSP_FIELD = 0x0001, 0x8001  # Command Field (PS3.7 9.3.1)
MIN_CAPACITY = 64 * 1024  # bytes a data set buffer starts with when no size is known yet
READ_STEP = 4 << 20  # bytes read per step of a long fragment: memory follows what arrives,
# never what a (possibly hostile) length field announces


class ReceiveError(P2PacsError):
    """A DIMSE message could not be received; the association ends."""


class InvalidPduError(ReceiveError):
    """The peer sent a P-DATA-TF that breaks PS3.8 (the association is aborted: Evt19)."""


class TransportClosedError(ReceiveError):
    """The connection closed or failed in the middle of a PDU (Evt17)."""


class PeerStalledError(ReceiveError):
    """Nothing arrived for the association's network timeout in the middle of a message: the
    partial message is dropped and pynetdicom's idle timer, expired by then, aborts."""


# --- pure core -----------------------------------------------------------------------------------


def pdv_header(head: bytes | bytearray | memoryview, remaining: int) -> tuple[int, int, int]:
    """(fragment length, presentation context ID, message control header) of the PDV item
    whose 6-byte header is ``head``, with ``remaining`` bytes of its P-DATA-TF left including
    that header. ``InvalidPduError`` if the item cannot be one: shorter than its context ID and
    control header, or longer than what is left of the PDU (PS3.8 9.3.5.1)."""
    item, context_id, control = _PDV.unpack_from(head)
    if item < 2:
        raise InvalidPduError(f"PDV item of length {item} (at least 2)")
    if item + 4 > remaining:
        raise InvalidPduError(f"PDV item of {item + 4} bytes in the {remaining} left of its PDU")
    return item - 2, context_id, control


# elements of a plain C-STORE-RQ (PS3.7 9.3.1.1): group length, affected SOP class, command
# field, message ID, priority, data set type, affected SOP instance, move originator AE/ID
_UI, _US, _AE, _UL = "UI", "US", "AE", "UL"
_STORE_RQ_ELEMENTS: dict[int, tuple[str, str]] = {
    0x0000: ("CommandGroupLength", _UL),
    0x0002: ("AffectedSOPClassUID", _UI),
    0x0100: ("CommandField", _US),
    0x0110: ("MessageID", _US),
    0x0700: ("Priority", _US),
    0x0800: ("CommandDataSetType", _US),
    0x1000: ("AffectedSOPInstanceUID", _UI),
    0x1030: ("MoveOriginatorApplicationEntityTitle", _AE),
    0x1031: ("MoveOriginatorMessageID", _US),
}
_REQUIRED = frozenset({0x0002, 0x0100, 0x0110, 0x0800, 0x1000})


class StoreRequest:
    """The parameters of a C-STORE-RQ's command set (``store_request``)."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, int | str]):
        self.fields = fields

    @property
    def has_dataset(self) -> bool:
        return self.fields["CommandDataSetType"] != NO_DATASET

    def primitive(self, dataset: BytesIO | None, context_id: int) -> C_STORE:
        """The ``C_STORE`` request primitive, as pynetdicom's ``message_to_primitive`` makes
        it (its setters check the UIDs and the AE title the same way)."""
        primitive = C_STORE()
        for keyword, value in self.fields.items():
            if keyword not in ("CommandGroupLength", "CommandField", "CommandDataSetType"):
                setattr(primitive, keyword, value)
        primitive.DataSet = dataset
        primitive._context_id = context_id
        return primitive


def store_request(command: bytes | bytearray) -> StoreRequest | None:
    """The C-STORE-RQ in ``command`` (implicit VR little endian, PS3.7 6.3.1) if it holds only
    a plain request's elements, each once and well formed; None for any other command set
    (another message, a rare element, anything odd), which pynetdicom then decodes."""
    fields: dict[str, int | str] = {}
    seen: set[int] = set()
    pos, end = 0, len(command)
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = _ELEMENT.unpack_from(command, pos)
        pos += 8
        spec = _STORE_RQ_ELEMENTS.get(element)
        if group != 0 or spec is None or element in seen or pos + length > end:
            return None
        seen.add(element)
        keyword, vr = spec
        raw = bytes(command[pos : pos + length])
        pos += length
        if vr == _US:
            if length != 2:
                return None
            fields[keyword] = _U16.unpack(raw)[0]
        elif vr == _UL:
            if length != 4:
                return None
        else:
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                return None
            fields[keyword] = text.rstrip("\0 ") if vr == _UI else text.strip()
    if not seen >= _REQUIRED or fields["CommandField"] != C_STORE_RQ_FIELD:
        return None
    return StoreRequest(fields)


def store_response_command(primitive: Any) -> bytes | None:
    """The encoded command set of a C-STORE-RSP holding only its plain elements (PS3.7
    9.3.1.2: affected SOP class and instance, message ID being responded to, status), exactly
    as pynetdicom encodes it; None for anything else (an error comment, an offending element…),
    which pynetdicom encodes instead."""
    if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
        return None
    for rare in ("ErrorComment", "OffendingElement"):
        if getattr(primitive, rare, None) is not None:
            return None
    status = primitive.Status
    if status is None:
        return None
    parts = []
    for element, vr, value in (
        (0x0002, _UI, primitive.AffectedSOPClassUID),
        (0x0100, _US, C_STORE_RSP_FIELD),
        (0x0120, _US, primitive.MessageIDBeingRespondedTo),
        (0x0800, _US, NO_DATASET),
        (0x0900, _US, status),
        (0x1000, _UI, primitive.AffectedSOPInstanceUID),
    ):
        if value is None:
            continue
        if vr == _US:
            raw = _U16.pack(int(value))
        else:
            raw = str(value).encode("ascii")
            if len(raw) % 2:
                raw += b"\0"
        parts.append(_ELEMENT.pack(0x0000, element, len(raw)) + raw)
    body = b"".join(parts)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(body)) + body


class DatasetBuffer:
    """One data set received in place: fragments are read into the buffer of a ``BytesIO``
    that is grown ahead of them (doubling) and cut to size at the end, so ``getvalue()`` on the
    result returns that buffer itself (CPython shares it while nothing else refers to it)."""

    def __init__(self, capacity: int):
        self.io = BytesIO()
        self.size = 0
        self.capacity = 0
        self._grow(max(1, capacity))

    def _grow(self, capacity: int) -> None:
        self.io.seek(capacity - 1)
        self.io.write(b"\0")  # extends the buffer; the gap is zero-filled, nothing copied in
        self.capacity = capacity

    def fill(self, n: int, read_into: Any) -> None:
        """Append ``n`` bytes, written into place by ``read_into(view)``."""
        if self.size + n > self.capacity:
            self._grow(max(self.size + n, 2 * self.capacity))
        with self.io.getbuffer() as whole:
            view = whole[self.size : self.size + n]
            try:
                read_into(view)
            finally:
                view.release()
        self.size += n

    def finish(self) -> BytesIO:
        self.io.truncate(self.size)
        self.io.seek(0)
        return self.io


# --- the reader on an association ----------------------------------------------------------------


def _readable(sock: Any, timeout: float) -> bool:
    """Whether ``sock`` has data within ``timeout`` seconds (poll: no FD_SETSIZE limit)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def _observed(assoc: Any) -> bool:
    """Whether anything watches received PDUs or messages, or sent messages, beyond
    pynetdicom's standard handlers with their logger quiet (then pynetdicom's path is taken,
    which triggers those events)."""
    return watched(
        assoc,
        evt.EVT_DATA_RECV,
        (
            (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
            (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
            (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
            (evt.EVT_FSM_TRANSITION, None),
        ),
        logging.INFO,
    )


class _Message:
    """The DIMSE message being read: its command fragments, then where its data set goes."""

    __slots__ = ("buffer", "command", "command_done", "context_id", "started", "store")

    def __init__(self) -> None:
        self.command = bytearray()
        self.command_done = False
        self.context_id = -1
        self.store: StoreRequest | None = None
        self.buffer: DatasetBuffer | None = None  # None: handed to pynetdicom's DIMSE provider
        self.started = False


def _pdv(context_id: int, value: bytes) -> tuple[int, bytes]:
    """A P-DATA primitive's PDV: pynetdicom's setter checks for a list, its annotation says
    tuple."""
    return cast("tuple[int, bytes]", [context_id, value])


class FastReader:
    """Replaces ``dul._read_pdu_data`` on one association (see the module docstring)."""

    def __init__(self, assoc: Any):
        self.assoc = assoc
        self.dul = assoc.dul
        self.dimse = assoc.dimse
        self._original = assoc.dul._read_pdu_data
        self._head = bytearray(6)
        self.last_size = 0  # bytes of the last data set: the next buffer's first capacity
        self.fast_messages = 0  # C-STOREs received in place (tests and benchmarks read this)
        self.passed_messages = 0  # messages handed to pynetdicom's DIMSE provider
        self.fast_responses = 0
        self._send_msg = assoc.dimse.send_msg
        assoc.dul._read_pdu_data = self.read_pdu_data
        assoc.dimse.send_msg = self.send_msg
        assoc.p2pacs_reader = self

    # --- reading ---

    def _eligible(self) -> bool:
        dul = self.dul
        if dul.state_machine.current_state != "Sta6" or dul.socket is None:
            return False
        sock = getattr(dul.socket, "socket", None)
        if sock is None or isinstance(sock, ssl.SSLSocket) or not dul.event_queue.empty():
            return False  # TLS (takes no recv flags, buffers records) keeps pynetdicom's path
        if self.dimse.message is not None:  # pynetdicom is in the middle of a message
            return False
        writer = getattr(self.assoc, "p2pacs_writer", None)  # rawsend's bytes read ahead
        if writer is not None and len(getattr(writer, "pushback", b"")):
            return False
        return not _observed(self.assoc)

    def read_pdu_data(self) -> None:
        if not self._eligible():
            self._original()
            return
        try:
            self._read_message()
        except TransportClosedError as exc:
            log.error("connection closed before the entire PDU was received: %s", exc)
            self.dul.event_queue.put("Evt17")
        except InvalidPduError as exc:
            log.error("invalid P-DATA-TF from %s, aborting: %s", self._peer(), exc)
            self.dul.event_queue.put("Evt19")
        except PeerStalledError as exc:  # no event: the idle timer's abort is the only one
            log.error("%s stalled in the middle of a message: %s", self._peer(), exc)

    def _peer(self) -> str:
        return str(self.assoc.requestor.ae_title).strip()

    def _recv_into(self, view: memoryview) -> None:
        """Fill ``view`` from the socket. A read that would block waits at most the
        association's network timeout for data (the socket itself has none: pynetdicom's idle
        timer cannot fire while its DUL thread is held here)."""
        sock = self.dul.socket.socket
        timeout = self.assoc.network_timeout
        got, n = 0, len(view)
        try:
            while got < n:
                try:
                    k = sock.recv_into(view[got:], 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if timeout is not None and not _readable(sock, timeout):
                        raise PeerStalledError(
                            f"nothing for {timeout:g} s, {got} of {n} bytes received"
                        ) from None
                    k = sock.recv_into(view[got:])
                if not k:
                    raise TransportClosedError(f"{got} of {n} bytes received")
                got += k
        except OSError as exc:  # a reset, a closed socket: pynetdicom sees it the same way
            raise TransportClosedError(f"{got} of {n} bytes received: {exc}") from exc

    def _recv(self, n: int) -> bytearray:
        buf = bytearray(min(n, READ_STEP))
        self._recv_into(memoryview(buf))
        while len(buf) < n:  # a long fragment: grown as its bytes arrive
            buf += self._recv(min(n - len(buf), READ_STEP))
        return buf

    def _pdu_header(self) -> tuple[int, int]:
        self._recv_into(memoryview(self._head))
        pdu_type, _, length = _PDU.unpack(self._head)
        return pdu_type, length

    def _read_message(self) -> None:
        """Read PDUs until the DIMSE message begun by the first one is complete."""
        pdu_type, length = self._pdu_header()
        message = _Message()
        while True:
            if pdu_type != P_DATA_TF:
                if message.started:
                    log.warning("PDU type 0x%02X in the middle of a message from %s; the "
                                "partial message is dropped", pdu_type, self._peer())  # fmt: skip
                self._hand_over(pdu_type, length)
                return
            message = self._read_pdvs(length, message)
            self.dul._idle_timer.restart()  # as the DUL does for every PDU it reads
            if not message.started or not self.dul.event_queue.empty():
                return  # complete, or pynetdicom found the message invalid (Evt19 queued)
            pdu_type, length = self._pdu_header()

    def _hand_over(self, pdu_type: int, length: int) -> None:
        """Any PDU but P-DATA-TF, to pynetdicom's state machine as ``_read_pdu_data`` does."""
        if pdu_type not in PDU_TYPES:
            log.error("Unknown PDU type received '0x%02X'", pdu_type)
            self.dul.event_queue.put("Evt19")
            return
        data = self._head + self._recv(length)
        try:
            pdu, event = self.dul._decode_pdu(data)
        except Exception as exc:
            log.error("Unable to decode the received PDU data: %s", exc)
            self.dul.event_queue.put("Evt19")
            return
        self.dul.event_queue.put(event)
        self.dul._recv_pdu.put(pdu)

    def _read_pdvs(self, length: int, message: _Message) -> _Message:
        """Every PDV of one P-DATA-TF; returns the message still being read (``started`` is
        False when the PDU ended with the message)."""
        remaining = length
        while remaining:
            if remaining < 6:
                raise InvalidPduError(f"{remaining} bytes left in a P-DATA-TF: no room for a PDV")
            self._recv_into(memoryview(self._head))
            size, context_id, control = pdv_header(self._head, remaining)
            remaining -= 6 + size
            message.started = True
            if control & COMMAND:
                if message.command_done:
                    raise InvalidPduError("a command fragment inside a data set")
                message.command += self._recv(size)
                if control & LAST:
                    message.context_id = context_id
                    message.command_done = True
                    if self._command_done(message):
                        message = _Message()
                continue
            if not message.command_done:
                raise InvalidPduError("a data set fragment before the command set was complete")
            if context_id != message.context_id:
                raise InvalidPduError(
                    f"a data set fragment on context {context_id} for a message on "
                    f"context {message.context_id}"
                )
            if message.buffer is not None:
                buffer = message.buffer
                for step in range(0, size, READ_STEP):
                    buffer.fill(min(READ_STEP, size - step), self._recv_into)
            else:
                self._pass(context_id, control, self._recv(size))
            if control & LAST:
                self._dataset_done(message)
                message = _Message()
        return message

    def _command_done(self, message: _Message) -> bool:
        """Decide where the data set goes; True if the message is complete already."""
        store = None if _config.STORE_RECV_CHUNKED_DATASET else store_request(message.command)
        if store is None or not store.has_dataset:
            self._pass(message.context_id, COMMAND | LAST, message.command)
            return self.dimse.message is None  # pynetdicom took the whole message
        message.store = store
        message.buffer = DatasetBuffer(max(MIN_CAPACITY, self.last_size))
        return False

    def _dataset_done(self, message: _Message) -> None:
        if message.store is None or message.buffer is None:
            return  # handed over fragment by fragment: pynetdicom queued it
        dataset = message.buffer.finish()
        self.last_size = message.buffer.size
        try:
            primitive = message.store.primitive(dataset, message.context_id)
        except (TypeError, ValueError) as exc:  # a UID or AE title its setters refuse
            raise InvalidPduError(f"C-STORE-RQ command set refused: {exc}") from exc
        self.fast_messages += 1
        self.dimse.msg_queue.put((message.context_id, primitive))

    def _pass(self, context_id: int, control: int, fragment: bytes | bytearray) -> None:
        """One fragment to pynetdicom's DIMSE provider, as the state machine's DT-2 would."""
        primitive = P_DATA()
        primitive.presentation_data_value_list = [_pdv(context_id, bytes([control]) + fragment)]
        try:
            self.dimse.receive_primitive(primitive)
        except Exception as exc:  # a command set pydicom cannot decode, an unknown command…
            raise InvalidPduError(f"DIMSE message not decodable: {exc}") from exc
        if self.dimse.message is None:
            self.passed_messages += 1

    # --- the C-STORE-RSP ---

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """``dimse.send_msg``: a plain C-STORE-RSP is encoded here and queued for the DUL
        thread as one P-DATA; everything else as before."""
        writer = getattr(self.assoc, "p2pacs_writer", None)
        command = store_response_command(primitive)
        if (
            command is None
            or (writer is not None and getattr(writer, "active", False))
            or self.dul.state_machine.current_state != "Sta6"
            or _observed(self.assoc)
        ):
            self._send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [_pdv(context_id, bytes([COMMAND | LAST]) + command)]
        self.fast_responses += 1
        self.dul.send_pdu(pdata)


def fast_receive(event: evt.Event) -> None:
    """``EVT_ESTABLISHED`` handler for the gateway's (acceptor) associations."""
    assoc = event.assoc
    if not assoc.is_acceptor or getattr(assoc, "p2pacs_reader", None) is not None:
        return
    if assoc.dul.socket is not None:
        FastReader(assoc)
