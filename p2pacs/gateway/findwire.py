"""C-FIND responses as bytes: the pending response's command set and identifiers from index
records, encoded without pydicom (pure; no sockets).

pynetdicom builds each pending C-FIND response from a pydicom ``Dataset``: the handler makes the
dataset, pynetdicom encodes it with pydicom's writer, builds the response primitive, converts it
to a message, encodes its command set with pydicom again and queues the fragments for its DUL
thread. For a query with hundreds of matches that is most of the time (py-spy: pydicom's
encoding ~35 %, the DIMSE send path ~30 %). Every pending response to one request has the same
command set (PS3.7 9.3.2.2: affected SOP class, command field, message ID being responded to,
data set type, status FF00H), so it is encoded once per request (``pending_command``); the
identifier holds only text attributes from the index, which ``IdentifierEncoder`` writes
directly in the negotiated little-endian syntax. Anything else (a binary VR, a non-ASCII value
that needs a Specific Character Set, a value too long for its length field) gives ``None`` and
is left to pydicom, so the bytes are always those pydicom would write (tested against it).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

from p2pacs.dicom import Level

__all__ = ["IdentifierEncoder", "pending_command"]

PENDING = 0xFF00  # C-FIND pending status (PS3.4 C.4.1.1.4)
C_FIND_RSP = 0x8020  # command field (PS3.7 E.1)
DATA_SET_PRESENT = 0x0001  # CommandDataSetType: any value but 0101H (PS3.7 E.1)

_IMPLICIT = struct.Struct("<HHL")  # group, element, 32-bit length (PS3.5 7.1.3)
_EXPLICIT_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length (PS3.5 7.1.2)
_EXPLICIT_LONG = struct.Struct("<HH2s2xL")  # group, element, VR, reserved, 32-bit length
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")

# VRs whose values are character strings (PS3.5 6.2); the index holds only these for queries
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
     "UR", "UT"}
)  # fmt: skip
_LONG_VRS = frozenset({"UC", "UR", "UT"})  # explicit VR with a 32-bit length (PS3.5 Table 7.1-1)
_MAX_SHORT = 0xFFFE  # longest even value a 16-bit length field holds
QUERY_RETRIEVE_LEVEL = 0x00080052


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return _IMPLICIT.pack(group, element, len(value)) + value
    if vr in _LONG_VRS:
        return _EXPLICIT_LONG.pack(group, element, vr.encode(), len(value)) + value
    return _EXPLICIT_SHORT.pack(group, element, vr.encode(), len(value)) + value


def _text(value: Any, vr: str) -> bytes | None:
    """A text value as pydicom writes it (multiple values joined by a backslash, padded to an
    even length: UI with NUL, the others with a space); None if not ASCII."""
    if value is None:
        return b""
    text = "\\".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
    if not text.isascii():
        return None
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


class IdentifierEncoder:
    """Encodes the C-FIND response identifier for one query: QueryRetrieveLevel and every
    query key with a dictionary VR, valued from an index record (the gateway's ``_response``,
    in ascending tag order as PS3.5 7.1 requires)."""

    def __init__(self, level: Level, keys: Iterable[str], *, implicit: bool):
        self.implicit = implicit
        self.plan: list[tuple[int, str, str]] = []  # (tag, VR, keyword)
        self.supported = True
        for keyword in keys:
            tag = tag_for_keyword(keyword)
            if tag is None or tag == QUERY_RETRIEVE_LEVEL:
                continue  # unknown keywords are not answered; the level is written below
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
            if vr not in _TEXT_VRS:
                self.supported = False  # binary values: pydicom converts and writes them
            self.plan.append((tag, vr, keyword))
        self.plan.sort()
        level_value = _text(level.value, "CS")
        assert level_value is not None
        self._level = _element(QUERY_RETRIEVE_LEVEL, "CS", level_value, implicit)

    def encode(self, record: Mapping[str, Any]) -> bytes | None:
        """The identifier's bytes, or None if pydicom must write this one (see the module)."""
        if not self.supported:
            return None
        parts: list[bytes] = []
        level_done = False
        for tag, vr, keyword in self.plan:
            if not level_done and tag > QUERY_RETRIEVE_LEVEL:
                parts.append(self._level)
                level_done = True
            raw = _text(record.get(keyword, ""), vr)
            if raw is None or (vr not in _LONG_VRS and len(raw) > _MAX_SHORT):
                return None
            parts.append(_element(tag, vr, raw, self.implicit))
        if not level_done:
            parts.append(self._level)
        return b"".join(parts)


def pending_command(sop_class_uid: str, message_id: int) -> bytes:
    """The command set of every pending C-FIND-RSP to request ``message_id`` (implicit VR little
    endian, PS3.7 6.3.1 and 9.3.2.2), byte for byte what pynetdicom encodes."""
    uid = _text(sop_class_uid, "UI")
    if uid is None:
        raise ValueError(f"SOP class UID {sop_class_uid!r} is not ASCII")
    body = b"".join(
        (
            _IMPLICIT.pack(0, 0x0002, len(uid)) + uid,
            _IMPLICIT.pack(0, 0x0100, 2) + _U16.pack(C_FIND_RSP),
            _IMPLICIT.pack(0, 0x0120, 2) + _U16.pack(message_id),
            _IMPLICIT.pack(0, 0x0800, 2) + _U16.pack(DATA_SET_PRESENT),
            _IMPLICIT.pack(0, 0x0900, 2) + _U16.pack(PENDING),
        )
    )
    return _IMPLICIT.pack(0, 0, 4) + _U32.pack(len(body)) + body
