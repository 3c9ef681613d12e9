"""The read side of the blob store: entries, ranges, whole blobs and hash checks.

Every read is its own LMDB read transaction (or a ranged GET from the object store), from any
thread; nothing here writes. ``BlobStore`` (blobs.py) adds the writes on top.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import lmdb

from p2pacs.errors import BlobNotFoundError, CorruptBlobError, StoreError
from p2pacs.store.db import SiteDB
from p2pacs.store.hashing import new_hasher
from p2pacs.store.layout import BlobInfo, chunk_key, digest_of, unpack_entry
from p2pacs.store.objects import ObjectStore, object_key

__all__ = ["BlobReader"]


class BlobReader:
    """Blobs by content hash, read. Thread-safe."""

    def __init__(self, db: SiteDB, objects: ObjectStore | None):
        """``objects``: the site's object store, read wherever an entry points to it."""
        self._db = db
        self._blobs = db.db("blobs")
        self._chunks = db.db("chunks")
        self.objects = objects

    def _objects(self, h: str) -> ObjectStore:
        if self.objects is None:
            raise StoreError(
                f"blob {h[:16]} lives in the object store, but this site's config names none "
                "(store.s3_bucket): restore the [store] s3_* settings"
            )
        return self.objects

    def _key(self, h: str) -> str:
        return object_key(self._objects(h).prefix, h)

    def _entry(self, h: str) -> BlobInfo | None:
        with self._db.read() as txn:
            raw = txn.get(digest_of(h), db=self._blobs)
        if raw is None:
            return None
        return BlobInfo(h, *unpack_entry(raw))

    def info(self, h: str) -> BlobInfo:
        info = self._entry(h)
        if info is None:
            raise BlobNotFoundError(f"blob {h} is not stored at this site")
        return info

    def has_in(self, txn: lmdb.Transaction, h: str) -> bool:
        """``has`` inside an open transaction (a write job checking what it indexes)."""
        return txn.get(digest_of(h), db=self._blobs) is not None

    def has(self, h: str) -> bool:
        try:
            digest = digest_of(h)
        except BlobNotFoundError:
            return False
        with self._db.read() as txn:
            return txn.get(digest, db=self._blobs) is not None

    def sizes(self, hashes: Iterable[str]) -> dict[str, int]:
        """Size of each of ``hashes`` stored here (absent ones left out), one read transaction."""
        out = {}
        with self._db.read() as txn:
            for h in hashes:
                raw = txn.get(digest_of(h), db=self._blobs)
                if raw is not None:
                    out[h] = unpack_entry(raw)[0]
        return out

    def missing(self, hashes: Iterable[str]) -> list[str]:
        """The hashes of ``hashes`` not stored here, in order (one read transaction)."""
        out = []
        with self._db.read() as txn:
            for h in hashes:
                if txn.get(digest_of(h), db=self._blobs) is None:
                    out.append(h)
        return out

    def read_range(self, h: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of a blob chunk by chunk (each read is its own txn, or
        one ranged GET from the object store). Blocks on the object store: call it off the
        event loop."""
        info = self.info(h)
        digest = bytes.fromhex(h)
        end = info.size if end is None else min(end, info.size)
        if start < 0 or start > end:
            raise StoreError(f"invalid range {start}-{end} for blob {h} of {info.size} bytes")
        if info.in_objects:
            yield from self._objects(h).read_range(self._key(h), start, end)
            return
        pos = start
        while pos < end:
            n, offset = divmod(pos, info.chunk_size)
            with self._db.read() as txn:
                chunk = txn.get(chunk_key(digest, n), db=self._chunks)
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
        if not verify:
            return b"".join(self.read_range(h))
        hasher = new_hasher()  # hashed while it streams in
        pieces = []
        for piece in self.read_range(h):
            hasher.update(piece)
            pieces.append(piece)
        if hasher.hexdigest() != h:
            raise CorruptBlobError(f"blob {h} fails its hash check; repair it from a peer")
        return b"".join(pieces)

    def read_into(self, h: str, out: memoryview, *, verify: bool = True) -> int:
        """Copy a whole blob into ``out`` and return its size: one copy straight from LMDB's
        map (one read transaction, no allocation), so a sender that reuses its buffers touches
        no fresh memory per blob (a new 0.5 MB ``bytes`` costs ~128 page faults). With
        ``verify`` (default) a blob that no longer matches its hash raises
        ``CorruptBlobError``; ``StoreError`` when ``out`` is shorter than the blob."""
        info = self.info(h)
        if len(out) < info.size:
            raise StoreError(f"a buffer of {len(out)} bytes cannot hold blob {h[:16]}")
        pos = 0
        if info.in_objects:
            for piece in self.read_range(h):
                out[pos : pos + len(piece)] = piece
                pos += len(piece)
        else:
            digest = digest_of(h)
            with self._db.env.begin(write=False, buffers=True) as txn:
                for n in range(info.chunks):
                    chunk = txn.get(chunk_key(digest, n), db=self._chunks)
                    if chunk is None or pos + len(chunk) > info.size:
                        raise CorruptBlobError(f"blob {h} has a missing or long chunk {n}")
                    out[pos : pos + len(chunk)] = chunk
                    pos += len(chunk)
        if pos != info.size:
            raise CorruptBlobError(f"blob {h} is shorter than its recorded size; repair it")
        if verify:
            hasher = new_hasher()
            hasher.update(out[:pos])
            if hasher.hexdigest() != h:
                raise CorruptBlobError(f"blob {h} fails its hash check; repair it from a peer")
        return pos

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
