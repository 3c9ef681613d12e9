"""Record storage: the records this node holds for others, its own published entries, and state.

Implements kademlia's ``IStorage`` seam on a multi-value layout: a DHT key maps to one record
per publisher. Two backends with one interface: LMDB (survives restart; wall-clock expiry with a
time index) and memory (for nodes started without a path, e.g. the 1,000-node benchmark). All
calls are made from the event-loop thread, which is therefore LMDB's single writer.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgpack
from kademlia.storage import IStorage

from dht.errors import LocalProtocolError, RecordError, StoreFullError
from dht.records import Record, decode_record, encode_record

__all__ = ["LmdbRecordStore", "MemoryRecordStore", "OwnEntry", "RecordStore"]

MAX_PUBLISHERS_PER_KEY = 64  # a study is held by R (default 2) sites; 64 leaves ample room
MAP_SIZE = 1 << 30  # bytes: default capacity of one node's LMDB (sparse on disk)
_EXP = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class OwnEntry:
    """An entry this node published, kept so it can be re-signed and republished before expiry."""

    dht_key: bytes
    sealed: bytes
    ttl: float
    flags: int
    expires_ms: int

    def pack(self) -> bytes:
        out: bytes = msgpack.packb(
            [self.dht_key, self.sealed, self.ttl, self.flags, self.expires_ms], use_bin_type=True
        )
        return out

    @classmethod
    def unpack(cls, data: bytes) -> OwnEntry:
        dkey, sealed, ttl, flags, exp = msgpack.unpackb(data, raw=False)
        return cls(bytes(dkey), bytes(sealed), float(ttl), int(flags), int(exp))


class RecordStore(IStorage):  # type: ignore[misc]  # kademlia is untyped
    """Multi-value record storage; subclasses provide the raw key/value operations."""

    def put(self, record: Record, now: float) -> bool:
        """Store a verified record if it beats the publisher's current one; True if it did."""
        if record.expired(now):
            return False
        current = self._get_raw(record.dht_key, record.publisher)
        if current is not None:
            old = decode_record(current)
            if old.seq >= record.seq and not old.expired(now):
                return False
            self._delete(record.dht_key, record.publisher, old.expires_ms)
        elif self._count_key(record.dht_key) >= MAX_PUBLISHERS_PER_KEY:
            return False
        raw = encode_record(record)
        try:
            self._put_raw(record, raw)
        except StoreFullError:
            if not self.cull(now):  # expired records make room first
                raise
            self._put_raw(record, raw)
        return True

    def records(self, dht_key: bytes, now: float) -> list[Record]:
        """The live records under a key, one per publisher, sorted by publisher."""
        out: list[Record] = []
        for raw in self._iter_key(dht_key):
            try:
                record = decode_record(raw)
            except RecordError:
                continue
            if not record.expired(now):
                out.append(record)
        return out

    # kademlia's IStorage seam: values are lists of encoded records under the 20-byte key.
    def __setitem__(self, key: bytes, value: bytes) -> None:
        raise LocalProtocolError("use RecordStore.put(record, now): records must be verified")

    def __getitem__(self, key: bytes) -> list[bytes]:
        values = list(self._iter_key(key))
        if not values:
            raise KeyError(key)
        return values

    def get(self, key: bytes, default: Any = None) -> Any:
        values = list(self._iter_key(key))
        return values or default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, list[bytes]]]:
        """Unused: republishing is the publisher's job here, not every holder's (see docs)."""
        return []

    def __iter__(self) -> Iterator[tuple[bytes, list[bytes]]]:
        raise LocalProtocolError("scanning the store is not supported; see records()")

    # backend operations
    def _get_raw(self, dht_key: bytes, publisher: bytes) -> bytes | None:
        raise NotImplementedError

    def _put_raw(self, record: Record, raw: bytes) -> None:
        raise NotImplementedError

    def _delete(self, dht_key: bytes, publisher: bytes, expires_ms: int) -> None:
        raise NotImplementedError

    def _iter_key(self, dht_key: bytes) -> Iterator[bytes]:
        raise NotImplementedError

    def _count_key(self, dht_key: bytes) -> int:
        return sum(1 for _ in self._iter_key(dht_key))

    def cull(self, now: float) -> int:
        """Drop expired records; return how many."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def own_entries(self) -> list[OwnEntry]:
        raise NotImplementedError

    def put_own(self, entry: OwnEntry) -> None:
        raise NotImplementedError

    def drop_own(self, dht_key: bytes) -> None:
        raise NotImplementedError

    def get_meta(self, name: str) -> bytes | None:
        raise NotImplementedError

    def set_meta(self, name: str, value: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (flush LMDB)."""


class MemoryRecordStore(RecordStore):
    """Dictionaries; nothing survives the process."""

    def __init__(self) -> None:
        self._records: dict[bytes, dict[bytes, tuple[int, bytes]]] = {}
        self._own: dict[bytes, OwnEntry] = {}
        self._meta: dict[str, bytes] = {}

    def _get_raw(self, dht_key: bytes, publisher: bytes) -> bytes | None:
        item = self._records.get(dht_key, {}).get(publisher)
        return None if item is None else item[1]

    def _put_raw(self, record: Record, raw: bytes) -> None:
        self._records.setdefault(record.dht_key, {})[record.publisher] = (record.expires_ms, raw)

    def _delete(self, dht_key: bytes, publisher: bytes, expires_ms: int) -> None:
        entries = self._records.get(dht_key)
        if entries is not None:
            entries.pop(publisher, None)
            if not entries:
                del self._records[dht_key]

    def _iter_key(self, dht_key: bytes) -> Iterator[bytes]:
        entries = self._records.get(dht_key, {})
        for publisher in sorted(entries):
            yield entries[publisher][1]

    def cull(self, now: float) -> int:
        now_ms = int(now * 1000)
        dropped = 0
        for dkey in list(self._records):
            entries = self._records[dkey]
            for pub in [p for p, (exp, _) in entries.items() if exp <= now_ms]:
                del entries[pub]
                dropped += 1
            if not entries:
                del self._records[dkey]
        return dropped

    def __len__(self) -> int:
        return sum(len(v) for v in self._records.values())

    def own_entries(self) -> list[OwnEntry]:
        return list(self._own.values())

    def put_own(self, entry: OwnEntry) -> None:
        self._own[entry.dht_key] = entry

    def drop_own(self, dht_key: bytes) -> None:
        self._own.pop(dht_key, None)

    def get_meta(self, name: str) -> bytes | None:
        return self._meta.get(name)

    def set_meta(self, name: str, value: bytes) -> None:
        self._meta[name] = value


class LmdbRecordStore(RecordStore):
    """LMDB environment of its own, named sub-databases, a time index for wall-clock expiry.

    ``sync=False``: a commit survives a process crash but not a power cut. Records held for others
    are soft state (their publishers republish them); own entries are flushed on ``close``.
    """

    def __init__(self, path: Path, capacity: int = MAP_SIZE) -> None:
        self.capacity = capacity
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(str(path), max_dbs=4, map_size=capacity, sync=False)
        except (OSError, lmdb.Error) as exc:
            raise LocalProtocolError(f"cannot open DHT storage at {path}: {exc}") from exc
        self._rec = self._env.open_db(b"records")
        self._exp = self._env.open_db(b"expiry")
        self._own = self._env.open_db(b"own")
        self._meta = self._env.open_db(b"meta")

    @contextlib.contextmanager
    def _write(self, db: Any = None) -> Iterator[Any]:
        """A write transaction; a full map (at any write or the commit) is ``StoreFullError``."""
        try:
            with self._env.begin(write=True, db=db) as txn:
                yield txn
        except lmdb.MapFullError:
            raise StoreFullError(
                f"the DHT record store is full ({self.capacity} bytes); raise its capacity"
            ) from None

    def _get_raw(self, dht_key: bytes, publisher: bytes) -> bytes | None:
        with self._env.begin(db=self._rec) as txn:
            raw = txn.get(dht_key + publisher)
        return None if raw is None else bytes(raw)

    def _put_raw(self, record: Record, raw: bytes) -> None:
        with self._write() as txn:
            txn.put(record.dht_key + record.publisher, raw, db=self._rec)
            txn.put(
                _EXP.pack(record.expires_ms) + record.dht_key + record.publisher, b"", db=self._exp
            )

    def _delete(self, dht_key: bytes, publisher: bytes, expires_ms: int) -> None:
        with self._write() as txn:
            txn.delete(dht_key + publisher, db=self._rec)
            txn.delete(_EXP.pack(expires_ms) + dht_key + publisher, db=self._exp)

    def _iter_key(self, dht_key: bytes) -> Iterator[bytes]:
        with self._env.begin(db=self._rec) as txn:
            cursor = txn.cursor()
            values: list[bytes] = []
            if cursor.set_range(dht_key):
                for key, value in cursor:
                    if not bytes(key).startswith(dht_key):
                        break
                    values.append(bytes(value))
        yield from values

    def cull(self, now: float) -> int:
        bound = _EXP.pack(int(now * 1000))
        dropped = 0
        with self._write() as txn:
            cursor = txn.cursor(db=self._exp)
            doomed: list[bytes] = []
            if cursor.first():
                for raw_key, _ in cursor:
                    key = bytes(raw_key)
                    if key[: _EXP.size] > bound:
                        break
                    doomed.append(key)
            for key in doomed:
                txn.delete(key, db=self._exp)
                if txn.delete(key[_EXP.size :], db=self._rec):
                    dropped += 1
        return dropped

    def __len__(self) -> int:
        with self._env.begin(db=self._rec) as txn:
            return int(txn.stat(self._rec)["entries"])

    def own_entries(self) -> list[OwnEntry]:
        with self._env.begin(db=self._own) as txn:
            return [OwnEntry.unpack(bytes(v)) for _, v in txn.cursor()]

    def put_own(self, entry: OwnEntry) -> None:
        with self._write(self._own) as txn:
            txn.put(entry.dht_key, entry.pack())

    def drop_own(self, dht_key: bytes) -> None:
        with self._write(self._own) as txn:
            txn.delete(dht_key)

    def get_meta(self, name: str) -> bytes | None:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(name.encode())
        return None if raw is None else bytes(raw)

    def set_meta(self, name: str, value: bytes) -> None:
        with self._write(self._meta) as txn:
            txn.put(name.encode(), value)

    def close(self) -> None:
        try:
            self._env.sync(True)
        finally:
            self._env.close()
