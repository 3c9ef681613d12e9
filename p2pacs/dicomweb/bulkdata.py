"""WADO-RS bulk data (PS3.18 8.7.3.3, F.2.6) without sockets: the value behind a BulkDataURI
that ``/metadata`` gave (``wado.metadata_json``), read from the stored dataset.

A bulk data path names an element by the tags of the sequences above it, the 1-based numbers
of their items and its own tag, all as in the URI: ``7FE00010``, ``60003000``,
``54000100/2/54001010``. Values are sent little endian, as Explicit VR Little Endian holds
them (PS3.18 8.7.3.5.3); the pixel data of an instance stored compressed is decoded for that,
or, with ``transfer-syntax=*``, given as its stored frames, one part each.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian
from pydicom.valuerep import BYTES_VR

from p2pacs.dicom.transcode import Plan, transcode
from p2pacs.dicomweb.wado import PIXEL_TAGS, _read
from p2pacs.errors import P2PacsError

__all__ = ["BulkDataNotFoundError", "BulkPath", "bulk_value", "parse_path"]

MAX_ITEM = 1_000_000  # an item number beyond any real sequence: refused as a bad path
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_EXPLICIT = str(ExplicitVRLittleEndian)

# (sequence tag, 1-based item number) for each level down, then the element's tag
BulkPath = tuple[tuple[tuple[int, int], ...], int]


class BulkDataNotFoundError(P2PacsError):
    """The instance has no binary element at that path (404)."""


def parse_path(path: str) -> BulkPath:
    """A bulk data path (``TTTTTTTT[/N/TTTTTTTT]…``); ``ValueError`` says what is wrong."""
    parts = path.strip("/").split("/")
    if len(parts) % 2 != 1:
        raise ValueError("a bulk data path is tags and item numbers, ending with a tag")
    tags, items = parts[0::2], parts[1::2]
    for t in tags:
        if not _TAG.fullmatch(t):
            raise ValueError(f"{t[:20]!r} is not a tag of eight hex digits")
    numbers = []
    for n in items:
        if not n.isdigit() or not 1 <= int(n) <= MAX_ITEM:
            raise ValueError(f"{n[:20]!r} is not an item number (1, 2, …)")
        numbers.append(int(n))
    steps = tuple((int(t, 16), n) for t, n in zip(tags[:-1], numbers, strict=True))
    return steps, int(tags[-1], 16)


def _little_endian(raw: bytes | memoryview, ts: str) -> tuple[bytes | memoryview, str]:
    """The dataset in a little endian syntax: big endian is converted (binary values
    byte-swapped), anything else is read as it is (deflated is inflated by the reader)."""
    if ts == ExplicitVRBigEndian:
        return transcode(raw, ts, Plan(_EXPLICIT)), _EXPLICIT
    return raw, ts


def _pixels(raw: bytes | memoryview, ts: str, tag: int, as_stored: bool) -> list[bytes]:
    if as_stored and UID(ts).is_encapsulated and tag == 0x7FE00010:
        ds = _read(raw, ts, pixels=True)
        if "PixelData" not in ds:
            raise BulkDataNotFoundError("the instance has no pixel data")
        count = int(ds.get("NumberOfFrames", 1) or 1)
        return list(generate_frames(ds.PixelData, number_of_frames=count))
    if UID(ts).is_encapsulated:  # decoded to native pixels (TranscodeError if it cannot be)
        raw, ts = transcode(raw, ts, Plan(_EXPLICIT)), _EXPLICIT
    raw, ts = _little_endian(raw, ts)
    elem = _read(raw, ts, pixels=True).get(tag)
    if elem is None or elem.value is None:
        raise BulkDataNotFoundError(f"the instance has no ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    return [bytes(elem.value)]


def bulk_value(
    raw: bytes | memoryview, ts: str, path: BulkPath, *, as_stored: bool = False
) -> tuple[list[bytes], str]:
    """The parts of one bulk data value and their transfer syntax: one part (the value, little
    endian), or with ``as_stored`` the stored frames of encapsulated pixel data, one part each
    in the stored syntax. Raises ``BulkDataNotFoundError`` or ``TranscodeError``."""
    steps, tag = path
    if not steps and tag in PIXEL_TAGS:
        parts = _pixels(raw, ts, tag, as_stored)
        compressed = as_stored and UID(ts).is_encapsulated and tag == 0x7FE00010
        return parts, ts if compressed else _EXPLICIT
    raw, ts = _little_endian(raw, ts)
    ds: Dataset = _read(raw, ts, pixels=False)
    where = []
    for seq, n in steps:
        where.append(f"({seq >> 16:04X},{seq & 0xFFFF:04X}) item {n}")
        elem = ds.get(seq)
        if elem is None or elem.VR != "SQ" or not 1 <= n <= len(elem.value or ()):
            raise BulkDataNotFoundError(f"the instance has no {' '.join(where)}")
        ds = elem.value[n - 1]
    elem = ds.get(tag)
    name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    if elem is None:
        raise BulkDataNotFoundError(f"the instance has no {' '.join([*where, name])}")
    if elem.VR not in BYTES_VR:
        raise BulkDataNotFoundError(f"{name} is {elem.VR}, not bulk data")
    return [bytes(elem.value or b"")], _EXPLICIT
