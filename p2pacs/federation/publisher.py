"""Publication: manifests, ``study/<uid>`` records and the site's catalogue, in batches.

Ingest marks a study dirty; one task wakes, waits a short batching window (a study arriving at
hundreds of instances per second is published once, not once per instance), builds each dirty
study's manifest, commits the manifests with the changed paths of the site's catalogue tree
(``cattree``: the cost follows the studies that changed, not the catalogue) in one durable
write, then has the members copy the new root and puts the ``site/<id>`` record naming it. No
record per study goes on the DHT: every member holds every member's tree, so "who holds this
study" is answered from the copies (``CatalogueStore.holders``), and the DHT carries one record
per site whatever the archive's size. Entries for studies still being recovered
keep their previous manifest hash, so a recovering site never advertises that it lost them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import lmdb

from p2pacs import failpoints
from p2pacs.archive import Archive
from p2pacs.const import RECORD_TTL
from p2pacs.errors import FederationError
from p2pacs.federation import cattree
from p2pacs.federation.catalogue import (
    SITE_NAMESPACE,
    CatalogueEntry,
    SiteRecord,
)
from p2pacs.federation.catstore import CatalogueStore, Committed, EntryChange
from p2pacs.federation.entry_table import EntryTable
from p2pacs.federation.manifest import Manifest, build_manifest
from p2pacs.looplag import bulk
from p2pacs.store import hash_bytes

__all__ = ["CatalogueNotCopiedError", "Publisher"]


class CatalogueNotCopiedError(FederationError):
    """No member has a copy of the new catalogue yet, so the site record was not updated."""


log = logging.getLogger(__name__)

BATCH_WINDOW = 0.3  # seconds to gather instances of a study before publishing it once

PutFn = Callable[[str, str, bytes, float], Awaitable[int]]
T = TypeVar("T")


class Publisher:
    """Keeps this site's manifests, catalogue tree and DHT records in step with its archive."""

    def __init__(
        self,
        archive: Archive,
        site_hex: str,
        put: PutFn,
        site_record: Callable[[], SiteRecord],
        store: CatalogueStore,
        *,
        record_ttl: float = RECORD_TTL,
    ):
        self.archive = archive
        self.site_hex = site_hex
        self._put = put
        self._site_record = site_record
        self.store = store
        self.record_ttl = record_ttl
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self.entries: dict[str, CatalogueEntry] = {}
        # a study held before a wipe and not back yet: the recovery queue's entry, read-only here
        self.queued: Callable[[str], CatalogueEntry | None] = lambda _uid: None
        self.catalogue_hash = ""  # the root of this site's catalogue tree
        self.catalogue_studies = 0  # studies the tree lists (recovering ones included)
        self.published = asyncio.Event()  # set after each completed round
        # set once the archive has a baseline (``continuity``): until then publishing
        # ``site/<id>`` could replace a wiped site's record with an empty catalogue
        self.site_ready = asyncio.Event()
        self.on_published: list[Callable[[list[str]], None]] = []
        self.on_committed: list[Callable[[Committed], None]] = []  # the tree changed
        # copies the catalogue to the members; returns how many took it
        self.on_catalogue: Callable[[str], Awaitable[int]] | None = None
        self.has_members: Callable[[], bool] = lambda: False
        self.on_site_record: Callable[[], Awaitable[None]] | None = None
        self._published = EntryTable(archive.db, "fed_published")  # what was last published
        self.loaded = asyncio.Event()  # set by ``catch_up``: nothing is published before
        self.studies_published = 0  # studies whose catalogue entry this run changed
        self._tree = asyncio.Lock()  # one change of the tree at a time

    async def catch_up(self) -> None:
        """At start, off the event loop: load what was last published and mark only the
        studies that changed since, so a restart costs one read pass, not one manifest and
        one DHT put per study held (and the catalogue never regresses to a partial one)."""
        index = self.archive.index

        def scan() -> tuple[dict[str, CatalogueEntry], list[str]]:
            with bulk():
                return scan_all()

        def scan_all() -> tuple[dict[str, CatalogueEntry], list[str]]:
            entries = self._published.load()
            changed = [
                s.study_uid
                for s in index.studies()
                if (e := entries.get(s.study_uid)) is None or e.updated != s.updated
            ]
            return entries, changed

        entries, changed = await asyncio.to_thread(scan)
        self.entries = {**entries, **self.entries}
        # one entry object per study held, alive for the whole run: out of the cyclic garbage
        # collector's reach, or each full collection walks them all while holding the GIL (a
        # stall of the event loop that grows with the archive)
        gc.freeze()
        async with self._tree:
            root = await asyncio.to_thread(self.store.root, self.store.own)
            if root == cattree.EMPTY and entries:  # published before the tree existed here
                await self._commit(list(entries), {})
            else:
                await self._adopt_root(root)
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

    def _prepare(self, studies: list[str]) -> list[tuple[CatalogueEntry, bytes]]:
        """Each study's new entry and manifest bytes (thread: reads the index)."""
        out = []
        for uid in studies:
            manifest = self.manifest_of(uid)
            if not manifest.entries:
                continue
            data = manifest.encode()
            study = self.archive.index.study(uid)
            date = str(study.attrs.get("StudyDate", "")) if study else ""
            entry = CatalogueEntry(
                uid, hash_bytes(data), date, manifest.instances, manifest.total_bytes,
                study.updated if study else 0.0,
            )  # fmt: skip
            out.append((entry, data))
        return out

    async def publish(self, studies: list[str]) -> None:
        prepared = await asyncio.to_thread(self._prepare, studies)
        fresh = [(e, data) for e, data in prepared if self.entries.get(e.study_uid) != e]
        async with self._tree:
            for e, _ in fresh:
                self.entries[e.study_uid] = e
            # the manifests are durable, with the tree naming them, before the root goes out
            await self._commit(studies, {e.manifest_hash: data for e, data in fresh})
        self.studies_published += len(fresh)
        if fresh:
            await asyncio.wrap_future(self._published.put([e for e, _ in fresh]))
        await self.publish_site()
        for listener in self.on_published:
            listener(studies)
        self.published.set()

    async def _commit(self, studies: list[str], manifests: dict[str, bytes]) -> None:
        """Bring the tree's entries of ``studies`` in line (recovering ones keep the queue's
        entry); one write with ``manifests``. Call holding ``_tree``."""
        wanted = {uid: self.queued(uid) or self.entries.get(uid) for uid in studies}
        # a study is never dropped here: only entries to set
        setting = {uid: e for uid, e in wanted.items() if e is not None}

        def work() -> Committed | None:
            store = self.store
            root = store.root(store.own)
            # one pass down the changed paths: what each entry was comes back with the update
            update = cattree.apply(store.nodes, root, setting)
            changes: list[EntryChange] = [(c.study_uid, c.old, c.new) for c in update.changes]
            if not changes and not manifests:
                return None
            return store.commit_own(update, root, changes, manifests)

        committed = await asyncio.to_thread(work)
        if committed is not None:
            await self._adopt_root(committed.root)
            for listener in self.on_committed:
                listener(committed)

    async def remove(
        self, study_uids: list[str], drop: Callable[[lmdb.Transaction], T]
    ) -> T | None:
        """Take studies out of this site's catalogue tree (a surplus copy trimmed: the one case
        an entry is removed) in the transaction that runs ``drop`` (which deletes their data),
        so the tree never lists a study the archive no longer holds, nor the other way round.
        Returns what ``drop`` returned; None, dropping nothing, if the tree lists none of them.
        The site record naming the new root goes out by the usual round (``mark``)."""
        await self.loaded.wait()
        async with self._tree:

            def work() -> tuple[Committed, T] | None:
                store = self.store
                root = store.root(store.own)
                update = cattree.apply(store.nodes, root, dict.fromkeys(study_uids))
                changes: list[EntryChange] = [(c.study_uid, c.old, c.new) for c in update.changes]
                if not changes:
                    return None
                out: list[T] = []

                def also(txn: lmdb.Transaction) -> None:
                    out.append(drop(txn))
                    self._published.delete_in(txn, study_uids)

                committed = store.commit_own(update, root, changes, {}, also=also)
                return committed, out[0]

            done = await asyncio.to_thread(work)
            if done is None:
                return None
            committed, result = done
            for uid in study_uids:
                self.entries.pop(uid, None)
            await self._adopt_root(committed.root)
        for listener in self.on_committed:
            listener(committed)
        self.mark([])  # puts site/<id> naming the new root, retried until a member took it
        return result

    async def adopt(self, root: str) -> None:
        """After a wipe: make the tree found in this site's last record its own again, with
        the studies published since applied on top (every node of ``root`` is held here)."""
        async with self._tree:

            def work() -> Committed:
                store = self.store
                mine = {uid: e for uid, e in self.entries.items()}
                update = cattree.apply(store.nodes, root, mine)
                store.store_nodes(update.new)  # then move from the current root to it
                return store.advance(store.own, update.root)

            committed = await asyncio.to_thread(work)
            await self._adopt_root(committed.root)
            for listener in self.on_committed:
                listener(committed)

    async def _adopt_root(self, root: str) -> None:
        self.catalogue_hash = root
        self.catalogue_studies = await asyncio.to_thread(cattree.count, self.store.nodes, root)

    async def publish_site(self) -> None:
        """Have the members copy the catalogue tree and put ``site/<id>`` naming its root.

        Never before the archive has a baseline: that is the one rule that keeps a wiped site
        from replacing its catalogue with an empty one."""
        if not self.site_ready.is_set():
            return
        await self.loaded.wait()  # a catalogue without the studies published before: never
        await failpoints.async_hit("catalogue.publish", FederationError)
        if self.on_catalogue is not None and self.catalogue_hash:
            # copies at other sites first: a wiped site needs one
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
