"""Content-addressed blob store: blobs by BLAKE3, entries in LMDB, visible only when complete.

The layout (``blobs``: digest -> size and chunk size; ``chunks``: the bytes) is in ``layout.py``,
the read side in ``reads.py``, hashing in ``hashing.py``; this module writes. A blob's entry is
written in the same transaction as its last chunk, so a reader (or a process restarted after
``kill -9``) sees either the whole blob or nothing. Chunking lets reads stream and byte ranges
be served without loading a large blob whole.

With an object store, a blob above ``inline_max`` is first PUT (and acknowledged), then its entry
is committed: a crash between the two leaves an object no entry names (an orphan, removed by
``sweep_objects``), never an entry without bytes. Where a blob lives is decided here, once, by
size; every caller (ingest, fetches from peers, scrub, serving peers) is the same for both.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future

import lmdb

from p2pacs import const
from p2pacs.errors import CorruptBlobError, IntegrityError, StoreError
from p2pacs.store.db import SiteDB
from p2pacs.store.hashing import hash_bytes, new_hasher
from p2pacs.store.layout import (
    ENTRY,
    IN_OBJECTS,
    chunk_count,
    chunk_key,
    digest_of,
    unpack_entry,
)
from p2pacs.store.objects import ObjectStore, hash_of_key, object_key
from p2pacs.store.reads import BlobReader
from p2pacs.store.totals import Totals

__all__ = ["BlobStore", "BlobWrite"]

_STREAM_WINDOW = 4  # chunk batches in flight during put_stream; bounds memory to a few MiB
_SPOOL = 8 << 20  # bytes of a streamed blob held in memory before it spills to a temporary file


class BlobWrite:
    """One blob made ready for the index transaction by ``BlobStore.prepare``: its bytes are
    already acknowledged by the object store (when they go there); ``apply`` writes what goes
    into LMDB inside the caller's write job; ``release`` once that job has settled."""

    __slots__ = ("_data", "_released", "_store", "hash", "local", "uploaded")

    def __init__(
        self, store: BlobStore, h: str, data: bytes | memoryview, local: bool, uploaded: bool
    ):
        self._store = store
        self._data = data
        self._released = False
        self.hash = h
        self.local = local
        self.uploaded = uploaded

    def apply(self, txn: lmdb.Transaction) -> bool:
        """Write the entry (and, for an LMDB blob, its chunks); False if it was stored already."""
        if self.local:
            return self._store.write_in(txn, self.hash, self._data)
        digest = digest_of(self.hash)
        if txn.get(digest, db=self._store._blobs) is not None:
            return False
        if not self.uploaded:  # it was stored when prepared, and deleted since (a repair)
            raise StoreError(f"blob {self.hash[:16]} was replaced while being stored; send again")
        self._store._put_entry(txn, digest, len(self._data), IN_OBJECTS)
        return True

    def release(self, *_: object) -> None:
        if not self._released:
            self._released = True
            if not self.local:
                self._store._unmark(self.hash)


class BlobStore(BlobReader):
    """Blobs by content hash. Thread-safe; writes go through the site's single writer."""

    def __init__(
        self,
        db: SiteDB,
        chunk_size: int = const.CHUNK_SIZE,
        *,
        objects: ObjectStore | None = None,
        offload: bool = False,
        inline_max: int = const.INLINE_MAX,
    ):
        """``objects``: the site's object store, read wherever an entry points to it;
        ``offload``: new blobs above ``inline_max`` bytes are put there (``backend = "s3"``)."""
        super().__init__(db, objects)
        self.chunk_size = chunk_size
        self.offload = offload and objects is not None
        self.inline_max = inline_max
        self._inflight: Counter[str] = Counter()  # object PUTs whose entry is not committed yet
        self._inflight_lock = threading.Lock()
        self._totals = Totals(db.db("blob_totals"))
        with db.read() as txn:
            new = self._totals.read(txn) is None and txn.stat(self._blobs)["entries"] == 0
        if new:  # counted from the first blob on (an older archive is counted once, later)
            db.write(lambda txn: self._totals.start(txn, 0, 0))

    # --- where bytes go -------------------------------------------------------------------------

    def goes_out(self, size: int) -> bool:
        """Whether a new blob of ``size`` bytes is put in the object store."""
        return self.offload and size > self.inline_max

    def _unmark(self, h: str) -> None:
        with self._inflight_lock:
            self._inflight[h] -= 1
            if self._inflight[h] <= 0:
                del self._inflight[h]

    def _upload(self, h: str, put: Callable[[ObjectStore, str], None]) -> bool:
        """Mark ``h`` in flight (so no sweep or delete removes its object), then PUT it unless
        it is stored already; True if it was PUT. The mark stays until ``_unmark``."""
        objects = self._objects(h)
        with self._inflight_lock:
            self._inflight[h] += 1
        try:
            if self.has(h):
                return False
            put(objects, object_key(objects.prefix, h))
            return True
        except BaseException:
            self._unmark(h)
            raise

    def prepare(self, h: str, data: bytes | memoryview) -> BlobWrite:
        """Ready blob ``h`` (= ``hash_bytes(data)``) for an index transaction: a blob bound for
        the object store is PUT now, on the caller's thread, and acknowledged before this
        returns. Raises ``ObjectStoreUnavailableError`` when the store does not answer."""
        if not self.goes_out(len(data)):
            return BlobWrite(self, h, data, local=True, uploaded=False)
        uploaded = self._upload(h, lambda objects, key: objects.put(key, data))
        return BlobWrite(self, h, data, local=False, uploaded=uploaded)

    # --- writing -------------------------------------------------------------------------------

    def write_in(self, txn: lmdb.Transaction, h: str, data: bytes | memoryview) -> bool:
        """Write a blob's bytes into LMDB inside an open write transaction; False if it was
        already stored. (``prepare`` decides between LMDB and the object store.)

        ``h`` must be ``hash_bytes(data)``, computed by the caller outside the writer thread.
        """
        digest = digest_of(h)
        if txn.get(digest, db=self._blobs) is not None:
            return False
        view = memoryview(data)
        size = len(view)
        for n, start in enumerate(range(0, max(size, 1), self.chunk_size)):
            txn.put(chunk_key(digest, n), view[start : start + self.chunk_size], db=self._chunks)
        self._put_entry(txn, digest, size, self.chunk_size)
        return True

    def put(self, data: bytes | memoryview, *, hashed: str | None = None) -> str:
        """Store ``data`` durably and return its hash; identical content is stored once.

        ``hashed``: the caller has just checked that ``hash_bytes(data)`` is this (a fetched
        blob verified on arrival), so the bytes are not hashed a second time."""
        h = hash_bytes(data) if hashed is None else hashed
        if not self.has(h):
            write = self.prepare(h, data)
            try:
                self._db.write(write.apply, weight=len(data) if write.local else 0)
            finally:
                write.release()
        return h

    def submit(self, data: bytes | memoryview, *, hashed: str) -> Future[bool]:
        """Queue a blob whose hash the caller has verified: the future resolves (False if it
        was already stored) once the write is durable. Lets an event loop stream many blobs
        into the store with no thread parked per blob. A blob bound for the object store is
        PUT first, on the calling thread (a worker's, never the event loop's)."""
        write = self.prepare(hashed, data)
        future = self._db.submit(write.apply, weight=len(data) if write.local else 0)
        future.add_done_callback(write.release)
        return future

    async def aput(self, data: bytes | memoryview) -> str:
        """``put`` for asyncio code: hashing and the durable wait run off the event loop."""
        return await asyncio.to_thread(self.put, data)

    def put_stream(self, chunks: Iterable[bytes], expected: str) -> str:
        """Store a blob arriving in pieces (e.g. from a peer) without holding it whole in memory.

        Pieces are regrouped into chunks and written in their own transactions under the expected
        hash, invisible until the final transaction checks the hash and writes the blob entry.
        Raises ``IntegrityError`` (and removes what it wrote) when the bytes don't match.
        """
        digest = digest_of(expected)
        if self.has(expected):
            for _ in chunks:
                pass
            return expected
        if self.offload:
            return self._put_stream_spooled(chunks, expected)
        hasher = new_hasher()
        pending: list[Future[None]] = []
        buf = bytearray()
        n = 0
        size = 0

        def flush(piece: bytes, index: int) -> None:
            def job(txn: lmdb.Transaction) -> None:
                txn.put(chunk_key(digest, index), piece, db=self._chunks)

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
                if txn.get(chunk_key(digest, i), db=self._chunks) is None:
                    raise StoreError(f"chunk {i} of {expected} is missing; fetch it again")
            self._put_entry(txn, digest, size, self.chunk_size)

        self._db.write(seal)
        return expected

    def _put_stream_spooled(self, chunks: Iterable[bytes], expected: str) -> str:
        """``put_stream`` for a site that puts blobs in the object store: spooled (memory, then
        a temporary file) while hashed, checked, then PUT (multipart when large), then indexed."""
        hasher = new_hasher()
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL) as spool:
            size = 0
            for piece in chunks:
                hasher.update(piece)
                spool.write(piece)
                size += len(piece)
            if hasher.hexdigest() != expected:
                raise IntegrityError(
                    f"received bytes hash to {hasher.hexdigest()}, not {expected}; discarded"
                )
            spool.seek(0)
            if not self.goes_out(size):
                self.put(spool.read(), hashed=expected)
                return expected

            def put(objects: ObjectStore, key: str) -> None:
                objects.put_file(key, spool, size)

            uploaded = self._upload(expected, put)
        write = BlobWrite(self, expected, b"", local=False, uploaded=uploaded)
        digest = digest_of(expected)

        def seal(txn: lmdb.Transaction) -> None:
            if txn.get(digest, db=self._blobs) is not None:
                return
            if not write.uploaded:
                raise StoreError(f"blob {expected[:16]} was replaced while being stored; refetch")
            self._put_entry(txn, digest, size, IN_OBJECTS)

        try:
            self._db.write(seal)
        finally:
            write.release()
        return expected

    def _drop_chunks(self, digest: bytes, count: int) -> None:
        def job(txn: lmdb.Transaction) -> None:
            if txn.get(digest, db=self._blobs) is not None:
                return
            self._delete_chunks(txn, digest, count)

        self._db.write(job)

    def delete(self, h: str) -> bool:
        """Remove a blob (used to replace a corrupt copy); False if it was not stored. An object
        store's copy goes after the entry, so a crash in between leaves an orphan object."""
        digest = digest_of(h)
        chunk_size: int | None = self._db.write(lambda txn: self._remove_in(txn, digest))
        if chunk_size == IN_OBJECTS:
            self._drop_object(h)
        return chunk_size is not None

    def delete_in(self, txn: lmdb.Transaction, h: str) -> bool:
        """Remove a blob's entry (and its LMDB chunks) inside an open write transaction, so
        collecting superseded metadata checks that nothing refers to a blob and removes it in
        one transaction. An object store's copy is left to ``sweep_objects`` (no entry names
        it any more), as after a crash between an entry's removal and its object's."""
        return self._remove_in(txn, digest_of(h)) is not None

    def _remove_in(self, txn: lmdb.Transaction, digest: bytes) -> int | None:
        """Remove an entry and its LMDB chunks; its chunk size (``IN_OBJECTS``: its bytes are
        in the object store), None if there was none."""
        entry = self._delete_entry(txn, digest)
        if entry is None:
            return None
        size, chunk_size = entry
        if chunk_size != IN_OBJECTS:
            self._delete_chunks(txn, digest, chunk_count(size, chunk_size))
        return chunk_size

    def _drop_object(self, h: str) -> bool:
        """Delete ``h``'s object unless an entry names it or a PUT of it is in flight (checked
        and done under the in-flight lock, so a concurrent ingest of the same bytes, which marks
        itself in flight before its PUT, never loses its object)."""
        with self._inflight_lock:
            info = self._entry(h)
            if h in self._inflight or (info is not None and info.in_objects):
                return False
            self._objects(h).delete(self._key(h))
            return True

    def sweep_objects(
        self, grace: float = const.ORPHAN_GRACE, stop: Callable[[], bool] | None = None
    ) -> int:
        """Delete objects under this site's prefix that no entry names and that are older than
        ``grace`` seconds (left by a crash between a PUT and its index commit, or by a move
        back to LMDB); returns how many. Blocks: run it on a thread."""
        if self.objects is None:
            return 0
        removed = 0
        now = time.time()
        prefix = self.objects.prefix
        for key, modified in self.objects.list():
            if stop is not None and stop():
                break
            h = hash_of_key(prefix, key)
            if h is None or now - modified < grace:
                continue
            if self._drop_object(h):
                removed += 1
        return removed

    def move(self, h: str, to_objects: bool) -> bool:
        """Move one blob's bytes between LMDB and the object store, verified: hash-checked as
        read at the source, and read back and re-hashed at the destination before the old
        copy is dropped (a blob that fails either check raises ``CorruptBlobError`` and stays
        where it was). False when it is already there. The entry switches in one transaction,
        so a crash at any point leaves the blob readable (and at most an orphan object)."""
        info = self.info(h)
        if info.in_objects == to_objects:
            return False
        data = self.get(h)  # hash-checked
        digest = digest_of(h)
        if to_objects:
            objects = self._objects(h)
            with self._inflight_lock:
                self._inflight[h] += 1
            try:
                objects.put(self._key(h), data)
                hasher = new_hasher()
                for piece in objects.read_range(self._key(h), 0, info.size):
                    hasher.update(piece)
                if hasher.hexdigest() != h:
                    raise CorruptBlobError(f"blob {h[:16]} reads back wrong from the object store")

                def switch(txn: lmdb.Transaction) -> None:
                    raw = txn.get(digest, db=self._blobs)
                    if raw is None or unpack_entry(raw)[1] == IN_OBJECTS:
                        return
                    self._put_entry(txn, digest, info.size, IN_OBJECTS)
                    self._delete_chunks(txn, digest, info.chunks)

                self._db.write(switch, weight=info.size)
            finally:
                self._unmark(h)
            return True

        def back(txn: lmdb.Transaction) -> None:
            raw = txn.get(digest, db=self._blobs)
            if raw is None or unpack_entry(raw)[1] != IN_OBJECTS:
                return
            self._delete_entry(txn, digest)
            self.write_in(txn, h, data)

        self._db.write(back, weight=info.size)
        if not self.verify_blob(h):  # read back from LMDB: point at the object again

            def undo(txn: lmdb.Transaction) -> None:
                self._delete_chunks(txn, digest, chunk_count(info.size, self.chunk_size))
                self._put_entry(txn, digest, info.size, IN_OBJECTS)

            self._db.write(undo)
            raise CorruptBlobError(f"blob {h[:16]} reads back wrong from LMDB; left in place")
        self._drop_object(h)
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

    def totals(self) -> tuple[int, int]:
        """(number of blobs, total bytes): two counters kept with every entry written or
        removed, so ``status`` and every metrics scrape cost the same at any archive size. An
        archive written before the counters existed is counted once, by the writer."""
        with self._db.read() as txn:
            found = self._totals.read(txn)
        if found is not None:
            return found

        def count(txn: lmdb.Transaction) -> tuple[int, int]:
            again = self._totals.read(txn)
            if again is not None:
                return again
            blobs = total = 0
            for raw in txn.cursor(db=self._blobs).iternext(keys=False, values=True):
                blobs += 1
                total += unpack_entry(raw)[0]
            self._totals.start(txn, blobs, total)
            return blobs, total

        return self._db.write(count)

    # --- entries and their counters (write transactions only) -----------------------------------

    def _put_entry(self, txn: lmdb.Transaction, digest: bytes, size: int, where: int) -> None:
        old = txn.get(digest, db=self._blobs)
        txn.put(digest, ENTRY.pack(size, where), db=self._blobs)
        if old is None:
            self._totals.add(txn, 1, size)
        else:
            self._totals.add(txn, 0, size - unpack_entry(old)[0])

    def _delete_chunks(self, txn: lmdb.Transaction, digest: bytes, count: int) -> None:
        for i in range(count):
            txn.delete(chunk_key(digest, i), db=self._chunks)

    def _delete_entry(self, txn: lmdb.Transaction, digest: bytes) -> tuple[int, int] | None:
        """Remove an entry; its (size, chunk size or IN_OBJECTS), None if there was none."""
        raw = txn.get(digest, db=self._blobs)
        if raw is None:
            return None
        txn.delete(digest, db=self._blobs)
        size, where = unpack_entry(raw)
        self._totals.add(txn, -1, -size)
        return size, where
