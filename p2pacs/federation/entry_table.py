"""A persisted table of catalogue entries by study UID: what a site published (``publisher``)
and what it is still recovering (``healing.recovery``). One encoding, many entries per durable
write, reads in one transaction."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

import msgpack

from p2pacs.federation.catalogue import CatalogueEntry
from p2pacs.store import SiteDB

__all__ = ["EntryTable"]


class EntryTable:
    def __init__(self, db: SiteDB, name: str):
        self._db = db
        self._table = db.db(name)

    def load(self) -> dict[str, CatalogueEntry]:
        """Every entry (one read transaction; call off the event loop for a large table)."""
        out: dict[str, CatalogueEntry] = {}
        with self._db.read() as txn:
            for key, raw in txn.cursor(db=self._table):
                uid = bytes(key).decode()
                out[uid] = CatalogueEntry(uid, *msgpack.unpackb(raw, raw=False))
        return out

    def put(self, entries: Iterable[CatalogueEntry]) -> Future[None]:
        """Queue one durable write of ``entries``; the future settles when it is committed."""
        rows = [
            (
                e.study_uid.encode(),
                msgpack.packb(
                    [e.manifest_hash, e.study_date, e.instances, e.bytes, e.updated],
                    use_bin_type=True,
                ),
            )
            for e in entries
        ]
        table = self._table

        def job(txn: Any) -> None:
            for key, raw in rows:
                txn.put(key, raw, db=table)

        return self._db.submit(job)

    def delete(self, study_uid: str) -> Future[bool]:
        table = self._table
        return self._db.submit(lambda txn: bool(txn.delete(study_uid.encode(), db=table)))

    def delete_in(self, txn: Any, study_uids: Iterable[str]) -> None:
        """Remove entries inside the caller's write transaction."""
        for uid in study_uids:
            txn.delete(uid.encode(), db=self._table)
