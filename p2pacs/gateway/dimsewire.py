"""DIMSE messages of the retrieve send path as bytes: command sets and P-DATA-TF framing.

A sans-I/O core for ``rawsend``: C-STORE-RQ and C-GET/C-MOVE-RSP command sets packed directly
(byte-identical to pynetdicom's pydicom encoding, PS3.7 E.1, implicit VR little endian), a plain
C-STORE-RSP parsed back, and P-DATA-TF PDUs built as headers plus views of the payload (PS3.8
9.3.5). No sockets, no threads: the tests compare every output with pynetdicom's encoder.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from io import BytesIO
from typing import Any

from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode as decode_dataset

__all__ = [
    "COMMAND",
    "LAST",
    "PDU_HEADER",
    "PDV_HEADER",
    "P_DATA_TF",
    "command_set",
    "pdata_frames",
    "plain_store_status",
    "store_request",
    "store_response",
]

# P-DATA-TF: PDU type 04H, reserved, PDU length; PDV item: item length, presentation context
# ID, message control header (PS3.8 9.3.5)
PDU_HEADER = struct.Struct(">BBL")
PDV_HEADER = struct.Struct(">LBB")
P_DATA_TF = 0x04
COMMAND, LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
MAX_UNLIMITED_PDV = 0xFFFFFFFF - 6  # bytes of one PDV when the peer set no maximum (0)

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
_STORE_RQ = _ELEMENTS[(C_STORE, False)][1]
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
    values: list[Any] = []
    for keyword, _, _ in elements:
        if keyword == "CommandField":
            values.append(field)
        elif keyword == "CommandDataSetType":
            values.append(0x0001 if data else 0x0101)
        else:
            values.append(getattr(primitive, keyword))
    return _pack(elements, values), data


def _pack(elements: tuple[tuple[str, int, str], ...], values: Sequence[Any]) -> bytes:
    """A command set of ``elements`` (keyword, element, VR) with ``values`` (None: left out),
    with its group length first."""
    parts = []
    for (_, element, vr), value in zip(elements, values, strict=True):
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
    return _ELEMENT.pack(0, 0, 4) + _U32.pack(len(body)) + body


def store_request(
    sop_class: str,
    sop_uid: str,
    message_id: int,
    *,
    priority: int = 2,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> bytes:
    """The command set of a C-STORE-RQ with a data set (PS3.7 9.3.1.1), as ``command_set``
    packs the same request from a ``C_STORE`` primitive, without building the primitive (whose
    validating setters cost more than the packing)."""
    values = (
        sop_class, 0x0001, message_id, priority, 0x0001, sop_uid, originator_aet, originator_id
    )  # fmt: skip
    return _pack(_STORE_RQ, values)


# elements a plain C-STORE-RSP holds: group length, affected SOP class, command field, message
# ID being responded to, data set type, status, affected SOP instance (PS3.7 9.3.1.2)
_PLAIN_STORE_RSP = frozenset({0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000})


def _store_fields(command: bytes | memoryview, message_id: int) -> dict[int, bytes] | None:
    """The elements of a C-STORE-RSP command set answering ``message_id`` without a data set,
    by element number; None for anything else."""
    fields: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos + 8 <= end:
        group, element, length = _ELEMENT.unpack_from(command, pos)
        pos += 8
        if group != 0 or pos + length > end:
            return None
        fields[element] = bytes(command[pos : pos + length])
        pos += length
    if pos != end or fields.get(0x0100) != b"\x01\x80" or len(fields.get(0x0900, b"")) != 2:
        return None
    if fields.get(0x0120) != _U16.pack(message_id) or fields.get(0x0800) != b"\x01\x01":
        return None
    return fields


def plain_store_status(command: bytes | memoryview, message_id: int) -> int | None:
    """The Status of a C-STORE-RSP to ``message_id`` holding nothing else worth reporting (no
    error comment, offending element…); None for any other command set."""
    fields = _store_fields(command, message_id)
    if fields is None or not fields.keys() <= _PLAIN_STORE_RSP:
        return None
    status: int = _U16.unpack(fields[0x0900])[0]
    return status


def store_response(command: bytes, message_id: int) -> C_STORE | None:
    """The C-STORE-RSP primitive for the command set ``command`` (implicit VR little endian) if
    it answers ``message_id`` without a data set; None for anything else (left to pynetdicom)."""
    fields = _store_fields(command, message_id)
    if fields is None:
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
        header = PDU_HEADER.pack(P_DATA_TF, 0, size + 6)
        out.append(header + PDV_HEADER.pack(size + 2, context_id, flags))
        out.extend(parts)
    return out
