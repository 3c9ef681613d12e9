"""Helpers for the interop tests (a unique module name: ``conftest`` is taken many times)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from peers import P2pacsServe, StoreSCP


def dataset_bytes(data: bytes) -> bytes:
    """The bytes after a Part-10 file's meta information (group 0002, explicit VR LE)."""
    assert data[128:132] == b"DICM", "not a Part-10 file"
    pos = 132
    while data[pos : pos + 2] == b"\x02\x00":
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    return data[pos:]


@dataclass
class Stored:
    """What was sent to the served site: file per SOP Instance UID and parsed headers."""

    serve: P2pacsServe
    storescp: StoreSCP
    files: dict[str, Path]
    headers: dict[str, pydicom.Dataset]
    wire: dict[str, tuple[str, bytes]]  # (transfer syntax, dataset bytes) storescp +B got
