"""WADO-RS ``/metadata`` kept, not rebuilt: each instance version's DICOM JSON, encoded once,
in the archive's LMDB (sub-database ``dicomweb_meta``, key: the 32-byte blob digest).

Building one instance's JSON with pydicom costs ~0.6 ms of CPU under the GIL, so a 600-instance
series built on request would take ~0.4 s, however many threads. Instead it is built once per
blob: by ``MetadataWarmer`` right after ingest (a background thread of the serving site, fed by
``Archive.on_ingest``; C-STORE, STOW-RS and fetched instances alike), or on a request that finds
it missing (an archive filled while DICOMweb was not served), then read back with one LMDB read
transaction per request. A blob never changes under its hash, so an entry is never stale; a new
version is a new blob and a new entry. Instance blobs are kept for good, so entries are too
(~2 KB each, under 1 % of a CT instance).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from p2pacs.archive import Archive, Ingested
from p2pacs.dicomweb.wado import MetadataCache, metadata_json
from p2pacs.errors import P2PacsError

__all__ = ["MetadataStore", "MetadataWarmer"]

log = logging.getLogger(__name__)

DB_NAME = "dicomweb_meta"
# the first bytes of each kept entry: entries of an older format (without it; binary values
# left out, no BulkDataURI) are read as missing, built again and overwritten in place
FORMAT = b"\x02"
WARM_QUEUE = 8192  # ingested instances waiting for their metadata; beyond, built on request
WARM_BATCH = 128  # entries written per write job by the warmer


class MetadataStore:
    """Encoded metadata by blob hash: memory (LRU), then LMDB, then built from the blob."""

    def __init__(self, archive: Archive):
        self.archive = archive
        self._db = archive.db.db(DB_NAME)
        self.memory = MetadataCache()
        self.built = 0  # entries built from blobs by this process (tests, benchmarks)

    def stored(self, hashes: Iterable[str]) -> dict[str, bytes]:
        """The entries held for ``hashes`` (memory first, then one read transaction)."""
        out: dict[str, bytes] = {}
        wanted = []
        for h in hashes:
            cached = self.memory.get(h)
            if cached is None:
                wanted.append(h)
            else:
                out[h] = cached
        if wanted:
            with self.archive.db.read() as txn:
                for h in wanted:
                    value = txn.get(bytes.fromhex(h), db=self._db)
                    if value is not None and bytes(value[: len(FORMAT)]) == FORMAT:
                        out[h] = bytes(value[len(FORMAT) :])
                        self.memory.put(h, out[h])
        return out

    def build(self, h: str, transfer_syntax: str) -> bytes:
        """One instance's encoded metadata from its blob (read hash-checked)."""
        meta = metadata_json(self.archive.blob(h), transfer_syntax)
        encoded = json.dumps(meta, separators=(",", ":")).encode()
        self.built += 1
        self.memory.put(h, encoded)
        return encoded

    def keep(self, entries: dict[str, bytes]) -> Future[None]:
        """Write ``entries`` (one durable write job); the future says when they are kept."""

        def job(txn: Any) -> None:
            for h, value in entries.items():
                txn.put(bytes.fromhex(h), FORMAT + value, db=self._db)

        return self.archive.db.submit(job, weight=sum(len(v) for v in entries.values()))

    def get_many(self, versions: Sequence[tuple[str, str]]) -> list[bytes]:
        """The encoded metadata of each ``(hash, transfer syntax)``, in order; missing entries
        are built now and kept without waiting (a worker thread)."""
        held = self.stored(h for h, _ in versions)
        missing = {h: self.build(h, ts) for h, ts in versions if h not in held}
        if missing:
            held.update(missing)
            try:
                self.keep(missing).add_done_callback(_log_failure)
            except P2PacsError as exc:  # the database is closing: built, served, not kept
                log.info("metadata not kept: %s", exc)
        return [held[h] for h, _ in versions]


def _log_failure(future: Future[None]) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("metadata entries could not be kept: %s", exc)


class MetadataWarmer:
    """Builds the metadata of each ingested instance in the background, in batches."""

    def __init__(self, store: MetadataStore):
        self.store = store
        self._queue: queue.Queue[Ingested | None] = queue.Queue(WARM_QUEUE)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._busy = 0  # offered and not yet kept
        self.dropped = 0  # offers refused because the queue was full (built on request)

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="dicomweb-metadata", daemon=True
                )
                self._thread.start()

    def offer(self, ingested: Ingested) -> None:
        """``Archive.on_ingest`` listener (the ingesting thread): queue, never wait."""
        if self._thread is None:
            return
        with self._lock:
            self._busy += 1
        try:
            self._queue.put_nowait(ingested)
        except queue.Full:
            with self._lock:
                self._busy -= 1
            self.dropped += 1

    @property
    def idle(self) -> bool:
        """Nothing offered is still waiting to be kept."""
        with self._lock:
            return self._busy == 0

    def stop(self, timeout: float = 10.0) -> None:
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < WARM_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            try:
                self._warm(batch)
            except Exception:  # a warmer failure only means building on request later
                log.exception("building metadata of %d ingested instances failed", len(batch))
            finally:
                with self._lock:
                    self._busy -= len(batch)

    def _warm(self, batch: list[Ingested]) -> None:
        store = self.store
        held = store.stored(i.hash for i in batch)
        entries: dict[str, bytes] = {}
        for ingested in batch:
            if ingested.hash in held or ingested.hash in entries:
                continue
            rec = store.archive.index.instance(ingested.sop_uid)
            versions = rec.versions if rec is not None else []
            version = next((v for v in versions if v.hash == ingested.hash), None)
            if version is None:
                continue
            try:
                entries[ingested.hash] = store.build(version.hash, version.transfer_syntax)
            except Exception as exc:  # pydicom's too: that instance is built on request instead
                log.warning("metadata of %s not built: %s", ingested.sop_uid, exc)
        if entries:
            store.keep(entries).result()
