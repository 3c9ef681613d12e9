"""The seam between the blob store and wherever instance bytes live outside LMDB.

``BlobStore`` keeps every blob's entry (size, where it lives) in LMDB and, for a site whose
``store.backend`` is ``"s3"``, puts the bytes of large blobs in an ``ObjectStore``. Any S3
client that can do these few things fits; ``p2pacs.store.s3.S3ObjectStore`` is the one used.

Object keys are the blob's content hash under a two-level fan-out (``ab/cd/abcd…``): S3-style
stores partition and rate-limit by key prefix, so spreading keys evenly keeps one hot prefix from
throttling ingest, and a listing can be walked prefix by prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Protocol

__all__ = ["ObjectInfo", "ObjectStore", "hash_of_key", "object_key"]


def object_key(prefix: str, h: str) -> str:
    """The key of blob ``h`` (64 hex characters) under ``prefix``."""
    return f"{prefix}{h[:2]}/{h[2:4]}/{h}"


def hash_of_key(prefix: str, key: str) -> str | None:
    """The blob hash a key names, or None for a key that is not one of ours."""
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix) :].split("/")
    if len(parts) != 3:
        return None
    a, b, h = parts
    if len(h) != 64 or h[:2] != a or h[2:4] != b:
        return None
    try:
        bytes.fromhex(h)
    except ValueError:
        return None
    return h


class ObjectInfo(Protocol):
    key: str
    modified: float  # seconds since the epoch, the store's own clock


class ObjectStore(Protocol):
    """Bytes by key in a bucket. Every method blocks (call it off the event loop) and raises
    ``ObjectStoreUnavailableError`` when the store does not answer, ``CorruptBlobError`` when an
    object is missing or shorter than asked, ``StoreError`` for anything else it refuses."""

    prefix: str

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Store ``data``; returns once the store acknowledged it (multipart when large)."""

    def put_file(self, key: str, file: IO[bytes], size: int) -> None:
        """Store ``size`` bytes read from ``file`` (positioned at 0), multipart when large."""

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of an object, in pieces of at most a chunk."""

    def delete(self, key: str) -> None:
        """Remove an object (no error when it is already gone)."""

    def list(self) -> Iterator[tuple[str, float]]:
        """(key, modified time) of every object under ``prefix``."""

    def check(self) -> None:
        """Raise unless the bucket answers now (the health probe)."""

    def health(self) -> dict[str, object]:
        """What ``status`` shows: endpoint, bucket, reachable, since, last error (no secrets)."""
