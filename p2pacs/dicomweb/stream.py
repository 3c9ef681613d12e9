"""WADO-RS instance retrieve: the multipart body written to the socket with as little
copying and hashing as the blobs allow.

Instances are read in batches of about ``READ_AHEAD`` bytes in a worker thread (one thread
hop per batch, not per instance), one batch ahead of the socket, straight from LMDB's map into
a reused buffer (``BufferPool``: a fresh ``bytes`` per blob cost a page fault per 4 KiB, most
of the kernel time of a retrieve); each part's headers and file meta go out as one small write
and the dataset as a view of that buffer (no part is assembled by concatenation). When every
instance is sent as stored, the body's length is known before it starts, so the response
carries ``Content-Length`` and is not chunked (a chunked write joins each blob with its chunk
framing, one more copy of every byte). A blob is hash-checked when read, except one that this
process checked within the last ``VERIFIED_TTL`` seconds (``VerifiedBlobs``): a viewer opening
a study again does not pay for hashing it again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from p2pacs.archive import Archive
from p2pacs.dicom import build_prefix
from p2pacs.dicom.transcode import Plan, transcode
from p2pacs.dicomweb.wado import closing, part_header
from p2pacs.errors import CorruptBlobError, P2PacsError, StoreError
from p2pacs.index import InstanceRecord

__all__ = ["READ_AHEAD", "VERIFIED_TTL", "BufferPool", "VerifiedBlobs", "send_instances"]

log = logging.getLogger(__name__)

READ_AHEAD = 4 << 20  # bytes of instances read per worker job, one job ahead of the socket
POOL_BUFFERS = 4  # READ_AHEAD buffers kept for reuse (two per retrieve in progress)
# seconds a blob this process hash-checked is served again without re-hashing: hashing is a
# third to half the CPU of a retrieve (BLAKE3 ~3.5 GB/s on one core); short enough that stored
# bytes are re-checked at least this often when read, and the scrub re-hashes all of them
VERIFIED_TTL = 300.0
VERIFIED_ENTRIES = 65536  # blobs remembered as checked (~100 bytes each)


class VerifiedBlobs:
    """Blob hashes this process checked lately, oldest forgotten first. Thread-safe."""

    def __init__(self, ttl: float = VERIFIED_TTL, capacity: int = VERIFIED_ENTRIES):
        self.ttl = ttl
        self.capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def fresh(self, h: str) -> bool:
        """Whether ``h`` was checked within the last ``ttl`` seconds."""
        with self._lock:
            at = self._seen.get(h)
            if at is None:
                return False
            if time.monotonic() - at > self.ttl:
                del self._seen[h]
                return False
            return True

    def checked(self, h: str) -> None:
        with self._lock:
            self._seen[h] = time.monotonic()
            self._seen.move_to_end(h)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)


def read_blob_into(archive: Archive, verified: VerifiedBlobs, h: str, out: memoryview) -> int:
    """A blob's bytes copied into ``out`` (at least the blob's size); returns the size.
    Hash-checked (and repaired from a peer when corrupt, ``Archive.blob``) unless this process
    checked it within the TTL. Blocks: a worker thread."""
    fresh = verified.fresh(h)
    try:
        n = archive.blobs.read_into(h, out, verify=not fresh)
    except CorruptBlobError:  # repaired from a peer by Archive.blob, or raised again
        data = archive.blob(h)
        n = len(data)
        out[:n] = data
    if not fresh:
        verified.checked(h)
    return n


class BufferPool:
    """Read buffers of ``size`` bytes kept for reuse (at most ``keep``): a retrieve reads blobs
    into them and writes views of them to the socket, so what it sends comes from memory
    already mapped, not from a new allocation per blob. Thread-safe."""

    def __init__(self, size: int = READ_AHEAD, keep: int = POOL_BUFFERS):
        self.size, self.keep = size, keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, need: int) -> bytearray:
        if need <= self.size:
            with self._lock:
                if self._free:
                    return self._free.pop()
        return bytearray(max(need, self.size))

    def give(self, buf: bytearray) -> None:
        """Return a buffer nothing refers to any more (its bytes are sent or copied)."""
        if len(buf) == self.size:
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(buf)


@dataclass(frozen=True, slots=True)
class _Batch:
    """The instances ``items[i] for i in indices``: views of ``buffer`` (sent as stored),
    converted bytes, or why one could not be read."""

    indices: range
    buffer: bytearray
    parts: list[memoryview | bytes | P2PacsError]


def _prefix(rec: InstanceRecord, plan: Plan) -> bytes:
    v = rec.current
    if plan.as_stored(v.transfer_syntax):
        return v.prefix or build_prefix(rec.sop_class_uid, rec.sop_uid, v.transfer_syntax)
    return build_prefix(rec.sop_class_uid, rec.sop_uid, plan.target)


def _head(boundary: str, rec: InstanceRecord, plan: Plan, first: bool) -> bytes:
    ctype = f"application/dicom; transfer-syntax={plan.target}"
    return part_header(boundary, ctype, first) + _prefix(rec, plan)


def body_length(boundary: str, items: Sequence[tuple[InstanceRecord, Plan]]) -> int | None:
    """The multipart body's length when every instance goes as stored (blob sizes are in the
    index), else None (a conversion's size is known only once it is done)."""
    total = 0
    for i, (rec, plan) in enumerate(items):
        if not plan.as_stored(rec.current.transfer_syntax):
            return None
        total += len(_head(boundary, rec, plan, i == 0)) + rec.current.size
    return total + len(closing(boundary, not items))


def _batches(items: Sequence[tuple[InstanceRecord, Plan]]) -> list[range]:
    """Index ranges of ``items`` holding about ``READ_AHEAD`` bytes each (at least one); an
    instance to convert is a batch of its own (a conversion takes milliseconds, not
    microseconds: the next one runs while this one is sent, as for stored ones)."""
    out, start, size = [], 0, 0
    for i, (rec, plan) in enumerate(items):
        size += rec.current.size
        if size >= READ_AHEAD or not plan.as_stored(rec.current.transfer_syntax):
            out.append(range(start, i + 1))
            start, size = i + 1, 0
    if start < len(items):
        out.append(range(start, len(items)))
    return out


async def send_instances(
    request: web.Request,
    archive: Archive,
    verified: VerifiedBlobs,
    pool: BufferPool,
    items: Sequence[tuple[InstanceRecord, Plan]],
) -> web.StreamResponse:
    """Stream ``items`` as ``multipart/related; type="application/dicom"``.

    An instance that cannot be read or converted once the headers are out: with a
    Content-Length, the response is cut short (the connection closes before the announced
    length, so no client takes a partial study for a whole one); chunked (some instance
    converted), it is left out and logged, as before any conversion can be known to fail."""
    boundary = uuid.uuid4().hex
    length = body_length(boundary, items)
    resp = web.StreamResponse(
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        }
    )
    if length is not None:
        resp.content_length = length
    await resp.prepare(request)

    def read(indices: range) -> _Batch:
        need = sum(items[i][0].current.size for i in indices)
        buf = pool.take(need)
        view = memoryview(buf)
        parts: list[memoryview | bytes | P2PacsError] = []
        pos = 0
        for i in indices:
            rec, plan = items[i]
            v = rec.current
            try:
                n = read_blob_into(archive, verified, v.hash, view[pos:])
                if n != v.size:  # the announced Content-Length counts the index's sizes
                    raise StoreError(f"blob {v.hash[:16]} holds {n} bytes, the index {v.size}")
                if plan.as_stored(v.transfer_syntax):
                    parts.append(view[pos : pos + n])
                    pos += n
                else:
                    parts.append(transcode(view[pos : pos + n], v.transfer_syntax, plan))
            except P2PacsError as exc:
                parts.append(exc)
        return _Batch(indices, buf, parts)

    batches = _batches(items)

    def fetch(k: int) -> asyncio.Task[_Batch] | None:
        if k >= len(batches):
            return None
        return asyncio.create_task(asyncio.to_thread(read, batches[k]))

    first = True
    ahead = fetch(0)
    try:
        for k in range(len(batches)):
            current, ahead = ahead, fetch(k + 1)
            assert current is not None
            batch = await current
            for i, part in zip(batch.indices, batch.parts, strict=True):
                rec, plan = items[i]
                if isinstance(part, P2PacsError):
                    if length is not None:
                        log.error("WADO-RS cut short at %s: %s", rec.sop_uid, part)
                        resp.force_close()
                        _abort(request)
                        return resp
                    log.error("WADO-RS: %s left out: %s", rec.sop_uid, part)
                    continue
                await resp.write(_head(boundary, rec, plan, first))
                await resp.write(part)  # a view of the read buffer: not copied into a part
                first = False
            batch.parts.clear()
            transport = request.transport
            if transport is not None and transport.get_write_buffer_size() == 0:
                pool.give(batch.buffer)  # nothing written still refers to it
    finally:
        if ahead is not None:  # the client went away: the read in flight is not needed
            ahead.cancel()
    await resp.write(closing(boundary, first))
    await resp.write_eof()
    return resp


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
