"""The change log: which study each durable index update touched, in commit order.

Gateway worker processes write to the site's LMDB themselves, so the process running the
federation does not see their ingests as calls. Each worker's write job appends one entry here
in the same transaction as the index update it records; the key is a sequence number one above
the log's last key, read inside that write transaction, so LMDB's single-writer lock (held
across processes) makes the numbers strictly increasing whoever writes. The federation tails the
log from its first key (everything below was consumed and pruned), marks the studies dirty for
the publisher, and prunes what the publisher has published: the log holds only what is not yet
published, whatever the archive's size.
"""

from __future__ import annotations

import struct
from typing import Any

import lmdb

from p2pacs.store.db import SiteDB

__all__ = ["ChangeLog"]

_SEQ = struct.Struct(">Q")  # big-endian, so LMDB's byte order is the sequence order
TABLE = "changelog"


class ChangeLog:
    def __init__(self, db: SiteDB):
        self.db = db
        self._table: Any = db.db(TABLE)

    def append(self, txn: lmdb.Transaction, study_uid: str) -> int:
        """Record ``study_uid`` in the caller's write transaction; returns its sequence number."""
        with txn.cursor(db=self._table) as cur:
            seq = _SEQ.unpack(cur.key())[0] + 1 if cur.last() else 1
        txn.put(_SEQ.pack(seq), study_uid.encode(), db=self._table)
        return seq

    def read(self, after: int, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` entries with a sequence number above ``after``, oldest first."""
        out: list[tuple[int, str]] = []
        with self.db.read() as txn, txn.cursor(db=self._table) as cur:
            if not cur.set_range(_SEQ.pack(after + 1)):
                return out
            for key, value in cur:
                out.append((_SEQ.unpack(key)[0], bytes(value).decode()))
                if len(out) >= limit:
                    break
        return out

    def prune(self, txn: lmdb.Transaction, upto: int) -> int:
        """Delete every entry up to and including ``upto`` (in a write job); how many."""
        removed = 0
        with txn.cursor(db=self._table) as cur:
            positioned = cur.first()
            while positioned and _SEQ.unpack(cur.key())[0] <= upto:
                cur.delete()  # moves to the next entry; unpositioned after the last one
                removed += 1
                positioned = bool(cur.key())
        return removed

    def pending(self) -> int:
        """Entries not yet pruned."""
        with self.db.read() as txn:
            return int(txn.stat(self._table)["entries"])
