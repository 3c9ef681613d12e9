"""How blobs are laid out in LMDB: the keys and entries of the ``blobs`` and ``chunks``
sub-databases, pure functions over bytes (see ``blobs.py`` for the store built on them).

- ``blobs``: raw 32-byte digest -> (size, chunk size). A blob exists iff this entry exists.
  Chunk size ``IN_OBJECTS`` (0) means the bytes live in the site's object store.
- ``chunks``: digest + 4-byte chunk index -> at most ``chunk_size`` bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from p2pacs.errors import BlobNotFoundError

__all__ = [
    "ENTRY",
    "IN_OBJECTS",
    "BlobInfo",
    "chunk_count",
    "chunk_key",
    "digest_of",
    "unpack_entry",
]

ENTRY = struct.Struct(">QI")  # size in bytes, chunk size in bytes
_INDEX = struct.Struct(">I")  # chunk number
IN_OBJECTS = 0  # the chunk size recorded for a blob whose bytes are in the object store


def digest_of(h: str) -> bytes:
    """The raw 32-byte key of hex hash ``h``; ``BlobNotFoundError`` for anything else."""
    try:
        raw = bytes.fromhex(h)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise BlobNotFoundError(f"{h!r} is not a BLAKE3 hash (64 hex characters)")
    return raw


def chunk_key(digest: bytes, n: int) -> bytes:
    return digest + _INDEX.pack(n)


def chunk_count(size: int, chunk_size: int) -> int:
    """How many LMDB chunks a blob of ``size`` bytes has (an empty blob has one, empty)."""
    return max(1, -(-size // chunk_size))


def unpack_entry(raw: bytes | memoryview) -> tuple[int, int]:
    """(size, chunk size or ``IN_OBJECTS``) of a ``blobs`` entry."""
    size, chunk_size = ENTRY.unpack(raw)
    return int(size), int(chunk_size)


@dataclass(frozen=True, slots=True)
class BlobInfo:
    hash: str
    size: int
    chunk_size: int  # IN_OBJECTS (0): the bytes are in the object store

    @property
    def in_objects(self) -> bool:
        return self.chunk_size == IN_OBJECTS

    @property
    def chunks(self) -> int:
        if self.in_objects:
            return 1
        return chunk_count(self.size, self.chunk_size)
