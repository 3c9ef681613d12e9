"""The site archive: instances stored by content hash and indexed, in one transaction each.

An instance is the dataset bytes exactly as received (never decoded or re-encoded), addressed by
their BLAKE3 hash; its file meta prefix is kept in the index beside the hash. Blob and index entry
are written in the same LMDB transaction, so an instance is either fully archived or absent, and
success is reported only after the commit is durable. On a site whose bytes live in an object
store (``store.backend = "s3"``) the blob is PUT and acknowledged first, then blob entry and index
entry commit together: success still means both are durable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import lmdb

from p2pacs import const
from p2pacs.dicom import build_prefix, extract_attributes, split_part10
from p2pacs.dicom.header import AttrValue
from p2pacs.dicom.validate import plain_dataset, validate_dataset
from p2pacs.errors import (
    BlobNotFoundError,
    CorruptBlobError,
    InvalidDicomError,
    StoreError,
    TrimRefusedError,
)
from p2pacs.events import EventBus
from p2pacs.index import DicomIndex, IndexUpdate, InstanceRecord, Version
from p2pacs.store import BlobStore, BlobWrite, ChangeLog, ObjectStore, SiteDB, hash_bytes

__all__ = ["Archive", "Ingested", "RemoteWrite"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ingested:
    """The outcome of archiving one instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    hash: str
    size: int
    new_instance: bool
    new_version: bool
    patient_id: str = ""  # for the audit trail (PS3.15 A.5.3.2 Patient participant)


RemoteWrite = Callable[[dict[str, AttrValue], Version, bytes | memoryview], Future[Ingested]]


class Archive:
    """Store + index of one site. Thread-safe; one per site directory per process."""

    def __init__(
        self,
        db_path: Path,
        *,
        map_size: int = const.DEFAULT_MAP_SIZE,
        sync: bool = True,
        objects: ObjectStore | None = None,
        offload: bool = False,
        inline_max: int = const.INLINE_MAX,
    ):
        """``objects``/``offload``/``inline_max``: see ``BlobStore`` (the ``[store]`` s3_*
        settings; ``Site.archive`` passes them)."""
        self.db = SiteDB(db_path, map_size=map_size, sync=sync)
        self.blobs = BlobStore(self.db, objects=objects, offload=offload, inline_max=inline_max)
        self.index = DicomIndex(self.db)
        self._listeners: list[Callable[[Ingested], None]] = []
        self._lock = threading.Lock()
        # set by an enrolled site: replaces a blob that fails its hash with a peer's good copy
        self.repair_hook: Callable[[str], bool] | None = None
        # the site's event bus (metrics, audit): every part holds the archive, so it lives here
        self.events = EventBus()
        # what gateway worker processes ingested, for the federation to tail (``write_checked``)
        self.changes = ChangeLog(self.db)
        # set in a gateway worker process: checked and hashed instances are written by the
        # site's main process, so one group commit serves every worker (gateway/worker.py)
        self.remote_write: RemoteWrite | None = None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def on_ingest(self, listener: Callable[[Ingested], None]) -> None:
        """Call ``listener`` (on the ingesting thread) after each durable ingest that changed
        something; used to publish studies and trigger replication."""
        with self._lock:
            self._listeners.append(listener)

    # --- ingest ---------------------------------------------------------------------------------

    def submit(
        self,
        dataset: bytes | memoryview,
        transfer_syntax: str,
        prefix: bytes | None = None,
        *,
        source_ae: str = "",
        received: float | None = None,
        hashed: str | None = None,
    ) -> Future[Ingested]:
        """Check the structure, parse the header and hash here (the caller's thread), then queue
        the durable write.

        Every way in (C-STORE, import, instances fetched from peers) comes through here, so
        nothing structurally broken is ever stored: ``validate_dataset`` walks every element,
        item and delimiter to the last byte before anything else reads the dataset.
        ``hashed``: the dataset's hash, already verified by the caller (a fetched instance).
        Raises ``InvalidDicomError`` (``MalformedDatasetError`` for a broken structure) at once
        for bytes that are not an archivable dataset.
        """
        attrs = self.check(dataset, transfer_syntax)
        h = hash_bytes(dataset) if hashed is None else hashed
        if prefix is None:
            prefix = build_prefix(
                str(attrs["SOPClassUID"]), str(attrs["SOPInstanceUID"]), transfer_syntax, source_ae
            )
        version = Version(h, len(dataset), transfer_syntax, prefix, received or time.time())
        return self._write(attrs, version, dataset)

    @staticmethod
    def check(dataset: bytes | memoryview, transfer_syntax: str) -> dict[str, AttrValue]:
        """Structure checked to the last byte, then the index attributes from the header (a
        deflated dataset inflated once for both). ``InvalidDicomError`` if not archivable."""
        plain, plain_syntax = plain_dataset(dataset, transfer_syntax)
        validate_dataset(plain, plain_syntax)
        return extract_attributes(plain, plain_syntax)

    def index_stored(self, attrs: dict[str, AttrValue], version: Version) -> Future[Ingested]:
        """Index a blob that is already stored and was ``check``ed when it arrived (a fetched
        version indexed after its elders): nothing is read back, hashed or parsed again."""
        return self._write(attrs, version, None)

    def write_checked(
        self,
        attrs: dict[str, AttrValue],
        version: Version,
        dataset: bytes | memoryview,
        *,
        log_change: bool,
    ) -> Future[Ingested]:
        """Write an instance a gateway worker has ``check``ed and hashed: blob and index entry
        in one durable write job, group-committed with everything else this process writes.
        ``log_change`` (an enrolled site): a change-log entry in the same transaction instead
        of ``on_ingest``, for the federation to tail (``federation/changes.py``)."""
        if len(dataset) != version.size:  # the worker's hash is trusted: reads re-check it
            raise InvalidDicomError(f"{len(dataset)} dataset bytes received for {version.size}")
        return self._write(attrs, version, dataset, log_change=log_change)

    def _write(
        self,
        attrs: dict[str, AttrValue],
        version: Version,
        dataset: bytes | memoryview | None,
        *,
        log_change: bool = False,
    ) -> Future[Ingested]:
        """Queue blob (unless stored already) and index entry as one durable write job; a blob
        bound for the object store is PUT (acknowledged) here first, on the caller's thread."""
        if self.remote_write is not None and dataset is not None:
            return self.remote_write(attrs, version, dataset)
        h = version.hash
        blob: BlobWrite | None = None
        if dataset is not None:
            blob = self.blobs.prepare(h, dataset)

        def job(txn: lmdb.Transaction) -> IndexUpdate:
            if blob is not None:
                blob.apply(txn)
            elif not self.blobs.has_in(txn, h):
                raise BlobNotFoundError(f"blob {h} is not stored; it cannot be indexed")
            update = self.index.add(txn, attrs, version)
            if update.new_version and log_change:
                self.changes.append(txn, update.study_uid)
            return update

        weight = version.size if blob is not None and blob.local else 0
        write = self.db.submit(job, weight=weight)
        result: Future[Ingested] = Future()

        def done(fut: Future[IndexUpdate]) -> None:
            if blob is not None:
                blob.release()
            exc = fut.exception()
            if exc is not None:
                result.set_exception(exc)
                return
            update = fut.result()
            ingested = Ingested(
                update.study_uid,
                str(attrs["SeriesInstanceUID"]),
                update.sop_uid,
                str(attrs["SOPClassUID"]),
                h,
                version.size,
                update.new_instance,
                update.new_version,
                str(attrs.get("PatientID", "")),
            )
            result.set_result(ingested)
            if update.new_version and not log_change:
                self._notify(ingested)

        write.add_done_callback(done)
        return result

    def ingest(
        self,
        dataset: bytes | memoryview,
        transfer_syntax: str,
        prefix: bytes | None = None,
        *,
        source_ae: str = "",
        received: float | None = None,
    ) -> Ingested:
        """Archive one dataset durably (see ``submit``)."""
        return self.submit(
            dataset, transfer_syntax, prefix, source_ae=source_ae, received=received
        ).result(const.WRITE_TIMEOUT)

    def submit_file_bytes(self, data: bytes) -> Future[Ingested]:
        part = split_part10(data)
        return self.submit(part.dataset, part.transfer_syntax, part.prefix)

    def import_file(self, path: Path) -> Ingested:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidDicomError(f"cannot read {path}: {exc.strerror}") from exc
        return self.submit_file_bytes(data).result(const.WRITE_TIMEOUT)

    def _notify(self, ingested: Ingested) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(ingested)
            except Exception:
                log.exception("ingest listener failed for %s", ingested.sop_uid)

    # --- dropping a surplus copy -------------------------------------------------------------

    def drop_study_in(
        self, txn: lmdb.Transaction, study_uid: str, checked: set[tuple[str, str]]
    ) -> tuple[int, int, int]:
        """Remove a study's index entries and instance blobs inside the caller's write
        transaction; returns (instances, blobs, bytes) removed.

        ``checked`` is every (SOP Instance UID, hash) the caller verified other sites hold:
        a version not in it (one that arrived since) raises ``TrimRefusedError`` and, the
        transaction being the caller's, nothing is removed. A blob is removed with the last
        instance version naming it. No other study's instance can name it: a blob's bytes hold
        its SOP Instance UID, and the index files each SOP Instance UID under one study only
        (``ix_sop``), the one being removed here; manifests and catalogue nodes are blobs of
        another kind (msgpack, never a dataset)."""
        removed = self.index.remove_study(txn, study_uid)
        extra = sorted({(sop, v.hash) for sop, v in removed} - checked)
        if extra:
            raise TrimRefusedError(
                f"study {study_uid} has {len(extra)} versions here that were not checked at "
                "other sites; kept"
            )
        instances = len({sop for sop, _ in removed})
        blobs = size = 0
        for h, n in {v.hash: v.size for _, v in removed}.items():
            if self.blobs.delete_in(txn, h):
                blobs += 1
                size += n
        return instances, blobs, size

    # --- export ---------------------------------------------------------------------------------

    def instance_bytes(self, record: InstanceRecord, version: Version | None = None) -> bytes:
        """The Part-10 file of an instance (its newest version by default), hash-checked."""
        v = version or record.current
        return v.prefix + self.blob(v.hash)

    def dataset_bytes(self, record: InstanceRecord) -> bytes:
        """The dataset bytes of the newest version, hash-checked."""
        return self.blob(record.current.hash)

    def blob(self, h: str) -> bytes:
        """A blob's bytes, hash-checked; a corrupt blob is repaired from a peer, never served."""
        try:
            return self.blobs.get(h)
        except CorruptBlobError:
            hook = self.repair_hook
            if hook is None or not hook(h):
                raise
            return self.blobs.get(h)

    def export_study(self, study_uid: str, out_dir: Path) -> list[Path]:
        """Write every instance of a study as ``SOPInstanceUID.dcm`` files, byte-identical to
        what was imported (or to what was received, with p2pacs's file meta)."""
        records = self.index.study_instances(study_uid)
        if not records:
            raise BlobNotFoundError(f"study {study_uid} is not held at this site")
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for rec in records:
            path = out_dir / f"{rec.sop_uid}.dcm"
            try:
                path.write_bytes(self.instance_bytes(rec))
            except OSError as exc:
                raise StoreError(f"cannot write {path}: {exc.strerror}") from exc
            paths.append(path)
        return paths

    def iter_files(self, paths: Iterable[Path]) -> Iterator[Path]:
        """Every regular file under ``paths`` (folders recursively), in a stable order."""
        for p in paths:
            if p.is_dir():
                yield from sorted(q for q in p.rglob("*") if q.is_file())
            else:
                yield p
