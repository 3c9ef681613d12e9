"""BLAKE3, the address of every blob, counted: ``status`` shows how many bytes this process
has hashed, so a test can check that a fetched byte is hashed once, not twice."""

from __future__ import annotations

import threading

import blake3

__all__ = ["CountingHasher", "hash_bytes", "hashed_bytes", "new_hasher"]

_hashed = [0]  # bytes hashed by this process through hash_bytes / new_hasher
_hashed_lock = threading.Lock()


def _counted(n: int) -> None:
    with _hashed_lock:
        _hashed[0] += n


def hashed_bytes() -> int:
    """Bytes this process has hashed through ``hash_bytes``/``new_hasher`` (``status`` shows
    it: the single-pass test checks that a fetched byte is hashed once)."""
    return _hashed[0]


class CountingHasher:
    """blake3's incremental hasher, counting the bytes it sees."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = blake3.blake3()

    def update(self, data: bytes | memoryview) -> None:
        _counted(len(data))
        self._h.update(data)

    def hexdigest(self) -> str:
        return str(self._h.hexdigest())


def new_hasher() -> CountingHasher:
    return CountingHasher()


def hash_bytes(data: bytes | memoryview) -> str:
    """Hex BLAKE3-256 of ``data``: the address of a blob."""
    _counted(len(data))
    return blake3.blake3(data).hexdigest()
