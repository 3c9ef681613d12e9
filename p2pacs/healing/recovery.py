"""Whole-site recovery: a wiped site rebuilds its archive from the other members.

Starting from its identity alone, the site reads its own ``site/<id>`` record, fetches the
catalogue it last published (every member keeps a copy), and queues every study it no longer
holds. The queue lives in the site database, so a recovery killed half-way resumes where it
stopped: blobs already stored are not fetched again. Studies come back newest first, and a
C-MOVE/C-GET for a study still queued is fetched on demand ahead of the queue (read-through).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import msgpack

from p2pacs.errors import P2PacsError, RecoveryError
from p2pacs.federation.catalogue import SITE_NAMESPACE, Catalogue, CatalogueEntry, SiteRecord
from p2pacs.federation.node import FederationNode

__all__ = ["Recovery", "RecoveryProgress"]

log = logging.getLogger(__name__)

PLAN_ATTEMPTS = 20  # DHT lookups of the site's own record before giving up on finding peers
PLAN_RETRY = 1.0  # seconds between them
PLAN_BACKOFF = 5.0  # seconds before planning again when the federation could not help
STUDIES_AT_ONCE = 3  # studies fetched concurrently while draining the queue


def _log_failure(write: Future[Any]) -> None:
    if write.exception() is not None:
        log.error("recovery queue not updated: %s", write.exception())


@dataclass(slots=True)
class RecoveryProgress:
    studies_total: int = 0
    studies_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    instances: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    current: str = ""


class Recovery:
    """The persistent recovery queue of one site and the task that drains it."""

    def __init__(self, node: FederationNode):
        self.node = node
        self.db = node.archive.db
        self._table = self.db.db("fed_pending")
        self.progress = RecoveryProgress()
        self.planned = asyncio.Event()
        self._wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.listeners: list[Callable[[RecoveryProgress], None]] = []
        self.error = ""  # why recovery could not start, while it cannot
        with self.db.read() as txn:
            for key, raw in txn.cursor(db=self._table):
                e = CatalogueEntry(bytes(key).decode(), *msgpack.unpackb(raw, raw=False))
                node.publisher.pending[e.study_uid] = e

    # --- planning -------------------------------------------------------------------------------

    async def plan(self) -> int:
        """Queue every study of the site's last published catalogue that is not held here."""
        node = self.node
        assert node.dht is not None
        record: SiteRecord | None = None
        for attempt in range(PLAN_ATTEMPTS):
            found = await node.dht.get_detailed(SITE_NAMESPACE, node.site_hex)
            entries = [e for e in found.entries if e.publisher == node.site_id]
            if entries:
                newest = max(entries, key=lambda e: e.seq)
                record = SiteRecord.decode(newest.value)
                break
            if found.queried > 0:
                break  # the nodes closest to the key answered: this site never published
            if not node.dht.contacts() and attempt > 2:
                break  # alone in the federation: nothing was published before
            await asyncio.sleep(PLAN_RETRY)
        queued = 0
        if record is not None and record.catalogue_hash:
            catalogue = await self._catalogue(record.catalogue_hash)
            for entry in catalogue.entries:
                if entry.study_uid in node.publisher.pending or self._complete(entry):
                    continue
                self._enqueue(entry)
                queued += 1
        self.planned.set()
        node.publisher.site_ready.set()
        node.publisher.mark([])  # publish site/<id> now that the catalogue keeps what is queued
        if queued:
            log.warning("site %s is missing %d studies it held: recovering them", node.name, queued)
            self._wake.set()
        return queued

    async def _catalogue(self, h: str) -> Catalogue:
        peers = self.node.live_peers()
        for _ in range(PLAN_ATTEMPTS):
            if peers:
                break
            await asyncio.sleep(PLAN_RETRY)
            await self.node.heartbeat()
            peers = self.node.live_peers()
        try:
            await self.node.fetch_blob(h, None, peers)
        except P2PacsError as exc:
            raise RecoveryError(
                f"cannot fetch this site's catalogue {h[:16]} from any member ({exc}); "
                "check that other sites are up and reachable, then run recover again"
            ) from exc
        return Catalogue.decode(await asyncio.to_thread(self.node.archive.blobs.get, h), h)

    def _complete(self, entry: CatalogueEntry) -> bool:
        held = self.node.publisher.entries.get(entry.study_uid)
        if held is not None and held.manifest_hash == entry.manifest_hash:
            return True
        if not self.node.archive.blobs.has(entry.manifest_hash):
            return False
        from p2pacs.federation.manifest import Manifest

        wanted = Manifest.decode(self.node.archive.blobs.get(entry.manifest_hash))
        return self.node.publisher.manifest_of(entry.study_uid).covers(wanted)

    def _enqueue(self, entry: CatalogueEntry) -> None:
        self.node.publisher.pending[entry.study_uid] = entry
        raw = msgpack.packb(
            [entry.manifest_hash, entry.study_date, entry.instances, entry.bytes, entry.updated],
            use_bin_type=True,
        )
        self.db.write(lambda txn: txn.put(entry.study_uid.encode(), raw, db=self._table))

    def _done(self, study_uid: str) -> None:
        """Take a study off the queue without waiting for the delete to be durable (the loop
        keeps fetching meanwhile): after a crash a study found complete is simply taken off
        again."""
        self.node.publisher.pending.pop(study_uid, None)
        write = self.db.submit(lambda txn: txn.delete(study_uid.encode(), db=self._table))
        write.add_done_callback(_log_failure)

    # --- draining -------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self.node.publisher.pending)

    async def run(self) -> None:
        """Plan (retrying until the federation answers), then drain the queue whenever it has
        work. A node task: it never ends the node because of a failure."""
        while not self.planned.is_set():
            try:
                await self.plan()
                self.error = ""
            except Exception as exc:
                self.error = str(exc)
                log.error("recovery cannot start yet: %s; retrying in %.0f s", exc, PLAN_BACKOFF)
                await asyncio.sleep(PLAN_BACKOFF)
        while True:
            if self.node.publisher.pending:
                self.idle.clear()
                try:
                    await self.drain()
                except Exception:
                    log.exception("recovery pass failed; retrying")
                    await asyncio.sleep(PLAN_BACKOFF)
                    continue
            self.idle.set()
            self._wake.clear()
            await self._wake.wait()

    async def drain(self) -> RecoveryProgress:
        """Fetch every queued study, newest first, ``STUDIES_AT_ONCE`` at a time: one study's
        lookups and manifests overlap another's blobs, so the transfer never idles between
        studies."""
        queue = Catalogue.of(
            self.node.site_hex, self.node.publisher.pending.values()
        ).newest_first()
        p = self.progress = RecoveryProgress(
            studies_total=len(queue), bytes_total=sum(e.bytes for e in queue)
        )
        partial: dict[str, int] = {}  # bytes so far of the studies being fetched
        finished = 0  # bytes of the studies done

        def update() -> None:
            p.bytes_done = finished + sum(partial.values())
            self._notify()

        def on_bytes(study_uid: str) -> Callable[[int], None]:
            def progress(done: int) -> None:
                partial[study_uid] = done
                update()

            return progress

        slots = asyncio.Semaphore(STUDIES_AT_ONCE)  # FIFO: studies start newest first

        async def one(entry: CatalogueEntry) -> None:
            nonlocal finished
            async with slots:
                if entry.study_uid in self.node.publisher.pending:  # else fetched on demand
                    p.current = entry.study_uid
                    await self._fetch(entry, on_bytes(entry.study_uid))
                partial.pop(entry.study_uid, None)
                finished += entry.bytes
                p.studies_done += 1
                update()

        await asyncio.gather(*(one(entry) for entry in queue))
        p.finished = time.time()
        p.current = ""
        self.node.publisher.mark([])
        await self.node.publisher.publish_site()
        self._notify()
        return p

    async def _fetch(self, entry: CatalogueEntry, progress: Callable[[int], None]) -> None:
        p = self.progress
        try:
            result = await self.node.fetch_study(
                entry.study_uid, extra_manifests=(entry.manifest_hash,), progress=progress
            )
            p.instances += result.instances
            if result.complete and self._complete(entry):
                self._done(entry.study_uid)
            else:
                p.failed[entry.study_uid] = f"{len(result.failed)} blobs not fetched"
        except P2PacsError as exc:
            p.failed[entry.study_uid] = str(exc)

    def on_demand(self, study_uid: str) -> None:
        """A study fetched by read-through while queued is complete: take it off the queue."""
        entry = self.node.publisher.pending.get(study_uid)
        if entry is not None and self._complete(entry):
            self._done(study_uid)

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener(self.progress)
