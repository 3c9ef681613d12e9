"""Content-addressed blob store on LMDB: blobs by BLAKE3, chunked, visible only when complete.

Layout (two named sub-databases of the site environment):
- ``blobs``: raw 32-byte digest -> (size, chunk size). A blob exists iff this entry exists.
- ``chunks``: digest + 4-byte chunk index -> at most ``chunk_size`` bytes.

A blob's entry is written in the same transaction as its last chunk, so a reader (or a process
restarted after ``kill -9``) sees either the whole blob or nothing. Chunking lets reads stream
and byte ranges be served without loading a large blob whole.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import blake3
import lmdb

from p2pacs import const
from p2pacs.errors import BlobNotFoundError, CorruptBlobError, IntegrityError, StoreError
from p2pacs.store.db import SiteDB

__all__ = ["BlobInfo", "BlobStore", "hash_bytes", "hashed_bytes", "new_hasher"]

_ENTRY = struct.Struct(">QI")  # size in bytes, chunk size in bytes
_INDEX = struct.Struct(">I")  # chunk number
_STREAM_WINDOW = 4  # chunk batches in flight during put_stream; bounds memory to a few MiB


_hashed = [0]  # bytes hashed by this process through hash_bytes / new_hasher
_hashed_lock = threading.Lock()


def _counted(n: int) -> None:
    with _hashed_lock:
        _hashed[0] += n


def hashed_bytes() -> int:
    """Bytes this process has hashed through ``hash_bytes``/``new_hasher`` (``status`` shows
    it: the single-pass test checks that a fetched byte is hashed once)."""
    return _hashed[0]


class _CountingHasher:
    """blake3's incremental hasher, counting the bytes it sees."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = blake3.blake3()

    def update(self, data: bytes | memoryview) -> None:
        _counted(len(data))
        self._h.update(data)

    def hexdigest(self) -> str:
        return str(self._h.hexdigest())


def new_hasher() -> _CountingHasher:
    return _CountingHasher()


def hash_bytes(data: bytes | memoryview) -> str:
    """Hex BLAKE3-256 of ``data``: the address of a blob."""
    _counted(len(data))
    return blake3.blake3(data).hexdigest()


def _digest(h: str) -> bytes:
    try:
        raw = bytes.fromhex(h)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise BlobNotFoundError(f"{h!r} is not a BLAKE3 hash (64 hex characters)")
    return raw


def _chunk_key(digest: bytes, n: int) -> bytes:
    return digest + _INDEX.pack(n)


@dataclass(frozen=True, slots=True)
class BlobInfo:
    hash: str
    size: int
    chunk_size: int

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))


class BlobStore:
    """Blobs by content hash. Thread-safe; writes go through the site's single writer."""

    def __init__(self, db: SiteDB, chunk_size: int = const.CHUNK_SIZE):
        self._db = db
        self.chunk_size = chunk_size
        self._blobs = db.db("blobs")
        self._chunks = db.db("chunks")

    # --- writing -------------------------------------------------------------------------------

    def write_in(self, txn: lmdb.Transaction, h: str, data: bytes | memoryview) -> bool:
        """Write a blob inside an open write transaction; False if it was already stored.

        ``h`` must be ``hash_bytes(data)``, computed by the caller outside the writer thread.
        """
        digest = _digest(h)
        if txn.get(digest, db=self._blobs) is not None:
            return False
        view = memoryview(data)
        size = len(view)
        for n, start in enumerate(range(0, max(size, 1), self.chunk_size)):
            txn.put(_chunk_key(digest, n), view[start : start + self.chunk_size], db=self._chunks)
        txn.put(digest, _ENTRY.pack(size, self.chunk_size), db=self._blobs)
        return True

    def put(self, data: bytes | memoryview, *, hashed: str | None = None) -> str:
        """Store ``data`` durably and return its hash; identical content is stored once.

        ``hashed``: the caller has just checked that ``hash_bytes(data)`` is this (a fetched
        blob verified on arrival), so the bytes are not hashed a second time."""
        h = hash_bytes(data) if hashed is None else hashed
        if not self.has(h):
            self._db.write(lambda txn: self.write_in(txn, h, data), weight=len(data))
        return h

    def submit(self, data: bytes | memoryview, *, hashed: str) -> Future[bool]:
        """Queue a blob whose hash the caller has verified, without waiting: the future
        resolves (False if it was already stored) once the write is durable. Lets an event
        loop stream many blobs into the store with no thread parked per blob."""
        return self._db.submit(lambda txn: self.write_in(txn, hashed, data), weight=len(data))

    async def aput(self, data: bytes | memoryview) -> str:
        """``put`` for asyncio code: hashing and the durable wait run off the event loop."""
        return await asyncio.to_thread(self.put, data)

    def put_stream(self, chunks: Iterable[bytes], expected: str) -> str:
        """Store a blob arriving in pieces (e.g. from a peer) without holding it whole in memory.

        Pieces are regrouped into chunks and written in their own transactions under the expected
        hash, invisible until the final transaction checks the hash and writes the blob entry.
        Raises ``IntegrityError`` (and removes what it wrote) when the bytes don't match.
        """
        digest = _digest(expected)
        if self.has(expected):
            for _ in chunks:
                pass
            return expected
        hasher = new_hasher()
        pending: list[Future[None]] = []
        buf = bytearray()
        n = 0
        size = 0

        def flush(piece: bytes, index: int) -> None:
            def job(txn: lmdb.Transaction) -> None:
                txn.put(_chunk_key(digest, index), piece, db=self._chunks)

            pending.append(self._db.submit(job, weight=len(piece)))
            if len(pending) > _STREAM_WINDOW:
                pending.pop(0).result(const.WRITE_TIMEOUT)

        try:
            for piece in chunks:
                hasher.update(piece)
                size += len(piece)
                buf += piece
                while len(buf) >= self.chunk_size:
                    flush(bytes(buf[: self.chunk_size]), n)
                    del buf[: self.chunk_size]
                    n += 1
            if buf or n == 0:
                flush(bytes(buf), n)
                n += 1
            for fut in pending:
                fut.result(const.WRITE_TIMEOUT)
        except BaseException:
            self._drop_chunks(digest, n + 1)
            raise
        if hasher.hexdigest() != expected:
            self._drop_chunks(digest, n)
            raise IntegrityError(
                f"received bytes hash to {hasher.hexdigest()}, not {expected}; discarded"
            )

        def seal(txn: lmdb.Transaction) -> None:
            for i in range(n):
                if txn.get(_chunk_key(digest, i), db=self._chunks) is None:
                    raise StoreError(f"chunk {i} of {expected} is missing; fetch it again")
            txn.put(digest, _ENTRY.pack(size, self.chunk_size), db=self._blobs)

        self._db.write(seal)
        return expected

    def _drop_chunks(self, digest: bytes, count: int) -> None:
        def job(txn: lmdb.Transaction) -> None:
            if txn.get(digest, db=self._blobs) is not None:
                return
            for i in range(count):
                txn.delete(_chunk_key(digest, i), db=self._chunks)

        self._db.write(job)

    def delete(self, h: str) -> bool:
        """Remove a blob (used to replace a corrupt copy); False if it was not stored."""
        return self._db.write(lambda txn: self.delete_in(txn, h))

    def delete_in(self, txn: lmdb.Transaction, h: str) -> bool:
        """``delete`` inside an open write transaction (collecting superseded metadata checks
        that nothing refers to a blob and removes it in one transaction)."""
        digest = _digest(h)
        raw = txn.get(digest, db=self._blobs)
        if raw is None:
            return False
        size, chunk_size = _ENTRY.unpack(raw)
        txn.delete(digest, db=self._blobs)
        for i in range(max(1, -(-size // chunk_size))):
            txn.delete(_chunk_key(digest, i), db=self._chunks)
        return True

    def sweep(self) -> int:
        """Delete orphan chunks left by an interrupted ``put_stream``; returns how many."""

        def job(txn: lmdb.Transaction) -> int:
            orphans = [
                bytes(key)
                for key in txn.cursor(db=self._chunks).iternext(values=False)
                if txn.get(key[:32], db=self._blobs) is None
            ]
            for key in orphans:
                txn.delete(key, db=self._chunks)
            return len(orphans)

        return self._db.write(job)

    # --- reading -------------------------------------------------------------------------------

    def info(self, h: str) -> BlobInfo:
        digest = _digest(h)
        with self._db.read() as txn:
            raw = txn.get(digest, db=self._blobs)
        if raw is None:
            raise BlobNotFoundError(f"blob {h} is not stored at this site")
        size, chunk_size = _ENTRY.unpack(raw)
        return BlobInfo(h, size, chunk_size)

    def has_in(self, txn: lmdb.Transaction, h: str) -> bool:
        """``has`` inside an open transaction (a write job checking what it indexes)."""
        return txn.get(_digest(h), db=self._blobs) is not None

    def has(self, h: str) -> bool:
        try:
            digest = _digest(h)
        except BlobNotFoundError:
            return False
        with self._db.read() as txn:
            return txn.get(digest, db=self._blobs) is not None

    def sizes(self, hashes: Iterable[str]) -> dict[str, int]:
        """Size of each of ``hashes`` stored here (absent ones left out), one read transaction."""
        out = {}
        with self._db.read() as txn:
            for h in hashes:
                raw = txn.get(_digest(h), db=self._blobs)
                if raw is not None:
                    out[h] = _ENTRY.unpack(raw)[0]
        return out

    def missing(self, hashes: Iterable[str]) -> list[str]:
        """The hashes of ``hashes`` not stored here, in order (one read transaction)."""
        out = []
        with self._db.read() as txn:
            for h in hashes:
                if txn.get(_digest(h), db=self._blobs) is None:
                    out.append(h)
        return out

    def read_range(self, h: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of a blob chunk by chunk (each read is its own txn)."""
        info = self.info(h)
        digest = bytes.fromhex(h)
        end = info.size if end is None else min(end, info.size)
        if start < 0 or start > end:
            raise StoreError(f"invalid range {start}-{end} for blob {h} of {info.size} bytes")
        pos = start
        while pos < end:
            n, offset = divmod(pos, info.chunk_size)
            with self._db.read() as txn:
                chunk = txn.get(_chunk_key(digest, n), db=self._chunks)
                if chunk is None:
                    raise CorruptBlobError(f"blob {h} is missing chunk {n}; repair it from a peer")
                piece = bytes(chunk[offset : offset + (end - pos)])
            if not piece:
                raise CorruptBlobError(f"blob {h} is shorter than its recorded size; repair it")
            pos += len(piece)
            yield piece

    def get(self, h: str, *, verify: bool = True) -> bytes:
        """The whole blob. With ``verify`` (default) a blob that no longer matches its hash
        raises ``CorruptBlobError`` instead of being returned."""
        data = b"".join(self.read_range(h))
        if verify and hash_bytes(data) != h:
            raise CorruptBlobError(f"blob {h} fails its hash check; repair it from a peer")
        return data

    def verify_blob(self, h: str) -> bool:
        hasher = new_hasher()
        try:
            for piece in self.read_range(h):
                hasher.update(piece)
        except CorruptBlobError:
            return False
        return hasher.hexdigest() == h

    def hashes(self) -> Iterator[str]:
        """Every stored blob's hash, in hash order."""
        with self._db.read() as txn:
            keys = [bytes(k) for k in txn.cursor(db=self._blobs).iternext(keys=True, values=False)]
        for key in keys:
            yield key.hex()

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Re-hash every blob; return the hashes that no longer match (for repair)."""
        bad = []
        for h in self.hashes():
            if not self.verify_blob(h):
                bad.append(h)
            if progress is not None:
                progress(self.info(h).size if h not in bad else 0)
        return bad

    def totals(self) -> tuple[int, int]:
        """(number of blobs, total bytes)."""
        count = total = 0
        with self._db.read() as txn:
            for raw in txn.cursor(db=self._blobs).iternext(keys=False, values=True):
                count += 1
                total += _ENTRY.unpack(raw)[0]
        return count, total
