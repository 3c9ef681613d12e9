"""Publication: manifests, ``study/<uid>`` records and the site's catalogue, in batches.

Ingest marks a study dirty; one task wakes, waits a short batching window (a study arriving at
hundreds of instances per second is published once, not once per instance), stores each dirty
study's manifest as a blob, puts its ``study/<uid>`` entry on the DHT, then the catalogue blob
and the ``site/<id>`` record. Entries for studies still being recovered keep their previous
manifest hash, so a recovering site never advertises that it lost them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from p2pacs import failpoints
from p2pacs.archive import Archive
from p2pacs.const import RECORD_TTL
from p2pacs.errors import FederationError
from p2pacs.federation.catalogue import (
    SITE_NAMESPACE,
    STUDY_NAMESPACE,
    Catalogue,
    CatalogueEntry,
    SiteRecord,
    StudyHolding,
)
from p2pacs.federation.entry_table import EntryTable
from p2pacs.federation.manifest import Manifest, build_manifest

__all__ = ["CatalogueNotCopiedError", "Publisher"]


class CatalogueNotCopiedError(FederationError):
    """No member has a copy of the new catalogue yet, so the site record was not updated."""


log = logging.getLogger(__name__)

BATCH_WINDOW = 0.3  # seconds to gather instances of a study before publishing it once

PutFn = Callable[[str, str, bytes, float], Awaitable[int]]


class Publisher:
    """Keeps this site's manifests, catalogue and DHT records in step with its archive."""

    def __init__(
        self,
        archive: Archive,
        site_hex: str,
        put: PutFn,
        site_record: Callable[[], SiteRecord],
        *,
        record_ttl: float = RECORD_TTL,
    ):
        self.archive = archive
        self.site_hex = site_hex
        self._put = put
        self._site_record = site_record
        self.record_ttl = record_ttl
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self.entries: dict[str, CatalogueEntry] = {}
        # studies held before a wipe, not back yet: the recovery queue's, read-only here
        self.queued: Callable[[], Iterable[CatalogueEntry]] = tuple
        self.catalogue_hash = ""
        self.published = asyncio.Event()  # set after each completed round
        # set once the archive has a baseline (``continuity``): until then publishing
        # ``site/<id>`` could replace a wiped site's record with an empty catalogue
        self.site_ready = asyncio.Event()
        self.on_published: list[Callable[[list[str]], None]] = []
        # copies the catalogue to the members; returns how many took it
        self.on_catalogue: Callable[[str], Awaitable[int]] | None = None
        self.has_members: Callable[[], bool] = lambda: False
        self.on_site_record: Callable[[], Awaitable[None]] | None = None
        self._published = EntryTable(archive.db, "fed_published")  # what was last published
        self.loaded = asyncio.Event()  # set by ``catch_up``: nothing is published before
        self.studies_published = 0  # study records put on the DHT by this run

    async def catch_up(self) -> None:
        """At start, off the event loop: load what was last published and mark only the
        studies that changed since, so a restart costs one read pass, not one manifest and
        one DHT put per study held (and the catalogue never regresses to a partial one)."""
        index = self.archive.index

        def scan() -> tuple[dict[str, CatalogueEntry], list[str]]:
            entries = self._published.load()
            changed = [
                s.study_uid
                for s in index.studies()
                if (e := entries.get(s.study_uid)) is None or e.updated != s.updated
            ]
            return entries, changed

        entries, changed = await asyncio.to_thread(scan)
        self.entries = {**entries, **self.entries}
        self.loaded.set()
        if changed:
            log.info("%d studies changed since they were last published", len(changed))
        self.mark(changed)  # also publishes site/<id> once the site is ready

    def mark(self, study_uids: Iterable[str]) -> None:
        """Thread-unsafe: call on the loop (the node bridges ingest threads here)."""
        self._dirty.update(study_uids)
        self._wake.set()

    def manifest_of(self, study_uid: str) -> Manifest:
        return build_manifest(study_uid, self.archive.index.study_instances(study_uid))

    async def run(self) -> None:
        """Publish forever: wake on dirty studies, batch, publish."""
        await self.loaded.wait()
        while True:
            await self._wake.wait()
            await asyncio.sleep(BATCH_WINDOW)
            self._wake.clear()
            studies, self._dirty = sorted(self._dirty), set()
            try:
                await self.publish(studies)
            except CatalogueNotCopiedError as exc:  # members unreachable: quietly, until they are
                log.info("%s; will retry", exc)
                self._dirty.update(studies)
                await asyncio.sleep(1.0)
                self._wake.set()
            except Exception as exc:  # the DHT may be unreachable for a while: retry later
                log.warning("publication of %d studies failed (%s); will retry", len(studies), exc)
                self._dirty.update(studies)
                await asyncio.sleep(1.0)
                self._wake.set()

    async def publish(self, studies: list[str]) -> None:
        published: list[CatalogueEntry] = []
        for uid in studies:
            manifest = await asyncio.to_thread(self.manifest_of, uid)
            if not manifest.entries:
                continue
            data = manifest.encode()
            h = await self.archive.blobs.aput(data)
            study = self.archive.index.study(uid)
            date = str(study.attrs.get("StudyDate", "")) if study else ""
            entry = CatalogueEntry(
                uid, h, date, manifest.instances, manifest.total_bytes,
                study.updated if study else 0.0,
            )  # fmt: skip
            if self.entries.get(uid) != entry:
                holding = StudyHolding(h, manifest.instances, manifest.total_bytes)
                await self._put(STUDY_NAMESPACE, uid, holding.encode(), self.record_ttl)
                self.entries[uid] = entry
                published.append(entry)
                self.studies_published += 1
        if published:
            await asyncio.wrap_future(self._published.put(published))
        await self.publish_site()
        for listener in self.on_published:
            listener(studies)
        self.published.set()

    async def publish_site(self) -> None:
        """Store the catalogue blob (held + still-recovering studies) and put ``site/<id>``.

        Never before the archive has a baseline: that is the one rule that keeps a wiped site
        from replacing its catalogue with an empty one."""
        if not self.site_ready.is_set():
            return
        await self.loaded.wait()  # a catalogue without the studies published before: never
        await failpoints.async_hit("catalogue.publish", FederationError)
        merged = {**self.entries, **{e.study_uid: e for e in self.queued()}}  # keep old entries
        catalogue = Catalogue.of(self.site_hex, merged.values())
        self.catalogue_hash = await self.archive.blobs.aput(catalogue.encode())
        if self.on_catalogue is not None:  # copies at other sites first: a wiped site needs one
            taken = await self.on_catalogue(self.catalogue_hash)
            if not taken and self.has_members():
                raise CatalogueNotCopiedError(
                    f"no member took catalogue {self.catalogue_hash[:16]} yet; site/<id> keeps "
                    "naming the previous one until one does"
                )
        site = self._site_record().encode()
        await self._put(SITE_NAMESPACE, self.site_hex, site, self.record_ttl)
        if self.on_site_record is not None:  # members keep the signed record past its TTL
            await self.on_site_record()
