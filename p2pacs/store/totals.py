"""Running totals of what a store holds, kept in the same transactions as the entries they
count (so they never drift, and reading them costs the same at any archive size)."""

from __future__ import annotations

import struct
from typing import Any

import lmdb

__all__ = ["Totals"]

_PAIR = struct.Struct(">qq")  # (count, bytes)
_KEY = b"blobs"


class Totals:
    def __init__(self, db: Any):
        self._db = db  # a named sub-database handle

    def read(self, txn: lmdb.Transaction) -> tuple[int, int] | None:
        """(count, bytes), or None where the totals were never counted (an older archive)."""
        raw = txn.get(_KEY, db=self._db)
        if raw is None:
            return None
        count, size = _PAIR.unpack(raw)
        return int(count), int(size)

    def add(self, txn: lmdb.Transaction, count: int, size: int) -> None:
        """Adjust inside a write transaction. Totals never counted stay so (until
        ``BlobStore.totals`` counts them): adding to nothing would start from a wrong zero."""
        current = self.read(txn)
        if current is not None:
            txn.put(_KEY, _PAIR.pack(current[0] + count, current[1] + size), db=self._db)

    def start(self, txn: lmdb.Transaction, count: int, size: int) -> None:
        """Set them: at zero for a new store, or once an older store was counted."""
        txn.put(_KEY, _PAIR.pack(count, size), db=self._db)
