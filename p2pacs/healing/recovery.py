"""Whole-site recovery: a wiped site rebuilds its archive from the other members.

Starting from its identity alone, the site finds its own last signed ``site/<id>`` record (on
the DHT, or in the copy every member keeps past the record's TTL), fetches the catalogue it
names (every member keeps a copy), and queues every study it no longer holds. Fetching starts
then: the members' trees (who holds each study) are copied meanwhile, those placement puts
beside the first studies first, and each study waits only for the copies that name a holder
of it (or for all of them to have been tried once). Until it has found
that record it publishes no catalogue (``p2pacs.federation.continuity``): the absence of a record
is never taken to mean the site is new. The queue lives in the site database, so a recovery
killed half-way resumes where it stopped: blobs already stored are not fetched again. Studies
come back newest first, and a C-MOVE/C-GET for a study still queued is fetched on demand ahead of
the queue (read-through). A study that fails is retried with backoff for as long as the node
runs; once it has failed for ``recover_give_up`` seconds, ``recover`` reports it and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from p2pacs import const, failpoints
from p2pacs.errors import P2PacsError, RecoveryError, StoreFullError
from p2pacs.federation import cattree
from p2pacs.federation.catalogue import CatalogueEntry, SiteRecord, newest_first
from p2pacs.federation.continuity import Baseline, Evidence, mark_baseline, read_baseline
from p2pacs.federation.entry_table import EntryTable
from p2pacs.federation.node import FederationNode
from p2pacs.federation.publisher import CatalogueNotCopiedError
from p2pacs.healing.placement import likely_holders_first
from p2pacs.looplag import bulk

__all__ = ["Recovery", "RecoveryProgress", "retry_delay"]

log = logging.getLogger(__name__)

PLAN_RETRY = 0.25  # seconds between looks for live members while fetching the catalogue
PLAN_ATTEMPTS = 20  # of those
PLAN_BACKOFF = 2.0  # seconds between looks for this site's last record, once the first failed
PLAN_FIRST_RETRY = 0.2  # seconds before the second look: at start the DHT is still joining
STUDIES_AT_ONCE = 3  # studies fetched concurrently while draining the queue
RETRY_FIRST = 1.0  # seconds before a failed study is tried again; doubles per failure
RETRY_MAX = 60.0  # seconds: the longest wait between two tries of a failed study
HOLDERS_FIRST = 64  # queued studies (newest first) whose likely holders' trees are copied first
TREES_AT_ONCE = 4  # members' trees copied together after a wipe: the first ones land sooner


def retry_delay(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row of one study."""
    return min(RETRY_FIRST * 2.0 ** min(max(failures - 1, 0), 16), RETRY_MAX)


def _age(entry: CatalogueEntry) -> tuple[str, float]:
    """The recovery order's key (``newest_first``: largest first)."""
    return entry.study_date, entry.updated


def _log_failure(write: Future[Any]) -> None:
    if write.exception() is not None:
        log.error("recovery queue not updated: %s", write.exception())


@dataclass(slots=True)
class Failing:
    """A queued study whose last fetch failed."""

    since: float  # first failure of this run of failures
    failures: int
    next_try: float
    reason: str


@dataclass(slots=True)
class RecoveryProgress:
    studies_total: int = 0
    studies_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    instances: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # given up on (recover reports them)
    retrying: int = 0  # failed at least once, still being retried
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    current: str = ""
    recent_day: str = ""  # the newest StudyDate queued at planning
    recent_day_s: float | None = None  # seconds from process start until that day was back


class Recovery:
    """The persistent recovery queue of one site and the task that drains it: the queue's one
    owner. Others read it (``queue``) or await its state (``planned``, ``changed``)."""

    def __init__(self, node: FederationNode):
        self.node = node
        self.db = node.archive.db
        self._pending = EntryTable(self.db, "fed_pending")  # the queue, as persisted
        self.give_up = node.config.recover_give_up
        self.progress = RecoveryProgress()
        self.planned = asyncio.Event()
        self.changed = asyncio.Event()  # set on every change of progress or state
        self._wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.listeners: list[Callable[[RecoveryProgress], None]] = []
        self.error = ""  # why recovery could not start, while it cannot
        self.error_since = 0.0
        self.full = ""  # why the archive is full, while recovery is paused for it
        self._paused_until = 0.0
        self.baseline: Baseline | None = read_baseline(self.db)
        self.failing: dict[str, Failing] = {}
        self._recent_left: set[str] = set()  # studies of the newest day not back yet
        # the queue: studies this site held before a wipe, not back yet. Recovery owns it; the
        # publisher keeps their old entries in the catalogue and the node treats them as not
        # held, both through read-only views
        self.queue: dict[str, CatalogueEntry] = {}
        node.publisher.queued = self.queue.get
        node.queued = self.queue.get
        self._bytes_finished = 0
        self.queue.update(self._pending.load())  # small: the studies not back yet
        self._count_queue()
        # after a wipe: set once every member's tree has been tried (who holds what is known
        # as far as it can be); until then a study waits for a copy naming one of its holders
        self.holders_known = asyncio.Event()
        self.holders_known.set()
        self._copied = asyncio.Event()  # replaced by a fresh one at each member tree copied
        node.copier.on_committed.append(self._on_tree_copied)

    def _count_queue(self) -> None:
        queue = self.queue.values()
        self.progress.studies_total = self.progress.studies_done + len(queue)
        self.progress.bytes_total = self._bytes_finished + sum(e.bytes for e in queue)

    @property
    def awaiting(self) -> bool:
        """True while this archive has no baseline: its catalogue must not be published."""
        return self.baseline is None or not self.baseline.known

    # --- planning -------------------------------------------------------------------------------

    async def plan(self) -> int:
        """Find this site's past and queue every study of it that is not held here.

        An archive with a baseline (enrolled here, or already holding studies) knows its past:
        nothing to look up. A wiped one looks for its own last signed site record and fails
        (to be retried) until one is found; finding none is never taken for a new site."""
        node = self.node
        queued = 0
        if self.awaiting:
            if not node.live_peers():  # at start: meet the members now, not at the next beat
                await node.heartbeat()
            found = await node.own_site_records()
            if not found:
                raise RecoveryError(self._no_record())
            newest = max(found, key=lambda e: e.seq)
            record = SiteRecord.decode(newest.value)
            if record.catalogue_hash:
                await self._catalogue(record.catalogue_hash)
                queued = await self._enqueue_missing(record.catalogue_hash)
                # who holds each study comes from the members' trees: ``run`` copies them while
                # the queue drains (``_copy_member_trees``)
                self.holders_known.clear()
            detail = f"seq {newest.seq}, catalogue {record.catalogue_hash[:16] or 'empty'}"
            self.baseline = await asyncio.to_thread(mark_baseline, self.db, Evidence.RECORD, detail)
            log.info("found this site's last site record (%s)", detail)
        self._count_queue()
        snapshot = list(self.queue.values())  # looked at off the loop

        def newest_day() -> tuple[str, set[str]]:
            day = max((e.study_date for e in snapshot if e.study_date), default="")
            return day, {e.study_uid for e in snapshot if e.study_date == day}

        self.progress.recent_day, self._recent_left = await asyncio.to_thread(newest_day)
        self.planned.set()
        node.publisher.site_ready.set()
        node.publisher.mark([])  # publish site/<id> now that the catalogue keeps what is queued
        if queued:
            log.warning("site %s is missing %d studies it held: recovering them", node.name, queued)
            self._wake.set()
        self._notify()
        return queued

    def _no_record(self) -> str:
        """Why a wiped site's last record was not found: nobody answers (naming where it
        looked), or members answer without it."""
        node = self.node
        answering = sorted(m.name for m in node.live_members())
        if not answering and not (node.dht is not None and node.dht.contacts()):
            tried = ", ".join(f"{h}:{p}" for h, p in node.bootstrap_addresses())
            where = f"bootstrap {tried}" if tried else "no address: [federation] bootstrap is empty"
            if node.discovery is not None:
                where += " and mDNS"
            return (
                f"no member answers (tried {where}): this site's archive is empty and it needs "
                "a member to find its last site record; check that the other sites are up and "
                "reachable from here"
            )
        names = ", ".join(answering) or "DHT contacts"
        return (
            f"no member holds this site's last site record ({names} answered without it): "
            "nothing is published until one does; if this site never held anything, start it "
            "once with 'serve --new-site'"
        )

    def waiting(self) -> str:
        """While the plan has not succeeded: what recovery is waiting for, in one line."""
        if self.planned.is_set():
            return ""
        if self.error:
            return self.error
        return "looking for this site's last site record"

    async def _catalogue(self, h: str) -> None:
        """Fetch this site's last catalogue tree from the members and make it its own again."""
        peers = self.node.live_peers()
        for _ in range(PLAN_ATTEMPTS):
            if peers:
                break
            await self.node.heartbeat()
            peers = self.node.live_peers()
            if not peers:
                await asyncio.sleep(PLAN_RETRY)
        try:
            await self.node.copier.adopt(h, peers)
            await self.node.publisher.adopt(h)
        except P2PacsError as exc:
            raise RecoveryError(
                f"cannot fetch this site's catalogue {h[:16]} from any member ({exc}); "
                "check that other sites are up and reachable, then run recover again"
            ) from exc

    async def _enqueue_missing(self, root: str) -> int:
        """Queue the catalogue's studies not held whole here: compared and written off the
        event loop, in one durable write, however long the catalogue."""
        pending = set(self.queue)
        held = dict(self.node.publisher.entries)

        def plan_and_write() -> list[CatalogueEntry]:
            with bulk():
                return plan_and_write_all()

        def plan_and_write_all() -> list[CatalogueEntry]:
            todo = [
                e
                for e in cattree.entries(self.node.catalogues.nodes, root)
                if e.study_uid not in pending and not self._complete(e, held.get(e.study_uid))
            ]
            self._pending.put(todo).result(const.WRITE_TIMEOUT)
            return todo

        todo = await asyncio.to_thread(plan_and_write)
        self.queue.update(await asyncio.to_thread(lambda: {e.study_uid: e for e in todo}))
        gc.freeze()  # the queue lives for the recovery: keep full collections off it (publisher)
        return len(todo)

    async def _copy_member_trees(self) -> None:
        """Copy every live member's tree once, the likely holders of the first studies first,
        then let every study go (one not listed by then is looked for by ``fetch_study``'s own
        fresh round, and the node keeps copying trees as members publish). Never raises."""
        node = self.node
        try:
            queued = list(self.queue.values())  # a snapshot: sorted off the loop
            newest = await asyncio.to_thread(heapq.nlargest, HOLDERS_FIRST, queued, _age)
            first = [e.study_uid for e in newest]
            order = likely_holders_first(
                first, node.live_site_ids(), node.site_id, node.config.replication
            )
            failed = await node.copy_member_catalogues(first=order, at_once=TREES_AT_ONCE)
            if failed:
                log.warning("%d members' catalogues not copied yet; retried", failed)
        except Exception:
            log.exception("copying the members' catalogues failed; fetches look for holders")
        finally:
            self.holders_known.set()
            self._on_tree_copied(None)

    def _on_tree_copied(self, _committed: object) -> None:
        copied, self._copied = self._copied, asyncio.Event()
        copied.set()

    async def _holder_known(self, study_uid: str) -> None:
        """Wait until a member's tree copied here lists ``study_uid`` (or every tree has been
        tried): a fetch before that would find no holder and wait for every copy instead."""
        node = self.node
        while not self.holders_known.is_set():
            copied = self._copied  # taken before the read: a copy landing after it wakes us
            found = await asyncio.to_thread(node.catalogues.holders, [study_uid])
            if set(found.get(study_uid, {})) - {node.site_id}:
                return
            await copied.wait()

    def _complete(self, entry: CatalogueEntry, held: CatalogueEntry | None) -> bool:
        """Whether this site holds every version ``entry``'s manifest lists (any thread)."""
        if held is not None and held.manifest_hash == entry.manifest_hash:
            return True
        wanted = self.node.local_manifest(entry.manifest_hash)
        if wanted is None:
            return False
        return self.node.publisher.manifest_of(entry.study_uid).covers(wanted)

    def _done(self, study_uid: str) -> None:
        """Take a study off the queue without waiting for the delete to be durable (the loop
        keeps fetching meanwhile): after a crash a study found complete is simply taken off
        again."""
        entry = self.queue.pop(study_uid, None)
        self.failing.pop(study_uid, None)
        self.full = ""  # a study was stored whole: there is room again
        self.progress.failed.pop(study_uid, None)
        if entry is not None:
            self.progress.studies_done += 1
            self._bytes_finished += entry.bytes
        if study_uid in self._recent_left:
            self._recent_left.discard(study_uid)
            if not self._recent_left:
                self.progress.recent_day_s = round(time.time() - self.node.started_at, 3)
        write = self._pending.delete(study_uid)
        write.add_done_callback(_log_failure)

    # --- draining -------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self.queue)

    def given_up(self, now: float | None = None) -> dict[str, str]:
        """Queued studies that have kept failing for ``give_up`` seconds, with the last reason."""
        now = time.time() if now is None else now
        return {
            uid: f.reason
            for uid, f in self.failing.items()
            if uid in self.queue and now - f.since >= self.give_up
        }

    def stuck(self) -> bool:
        """Planning has failed for ``give_up`` seconds, or the archive is full: ``recover``
        reports why instead of waiting on."""
        late = bool(self.error) and time.time() - self.error_since >= self.give_up
        return late or bool(self.full)

    def next_deadline(self) -> float | None:
        """Seconds until ``settled``/``stuck`` can change with no event (a failing study or a
        failing plan reaching ``give_up``); None if only an event can change them."""
        now = time.time()
        starts = [f.since for uid, f in self.failing.items() if uid in self.queue]
        if self.error:
            starts.append(self.error_since)
        ahead = [s + self.give_up - now for s in starts if s + self.give_up > now]
        return max(0.0, min(ahead)) if ahead else None

    async def wait_until(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()``, woken by every change and by the next give-up deadline."""
        while not done():
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), self.next_deadline())

    def snapshot(self) -> dict[str, Any]:
        """The recovery part of ``status``."""
        p = self.progress
        return {
            "studies_total": p.studies_total,
            "studies_done": p.studies_done,
            "bytes_total": p.bytes_total,
            "bytes_done": p.bytes_done,
            "recent_day": p.recent_day,
            "recent_day_s": p.recent_day_s,
            "retrying": len(self.failing),
            "given_up": self.given_up(),
            "awaiting_record": self.awaiting,
            "member_trees_copied": self.holders_known.is_set(),
            "baseline": self.baseline.evidence.value if self.baseline else None,
            "error": self.error,
            "full": self.full,
            "started": p.started,
        }

    def settled(self) -> bool:
        """Nothing left that ``recover`` should wait for: every queued study is given up on, or
        the archive is full (recovery is paused until space returns)."""
        return self.planned.is_set() and (bool(self.full) or len(self.given_up()) >= self.pending)

    async def run(self) -> None:
        """Plan (retrying until the federation answers), then drain the queue whenever it has
        work, retrying failed studies with backoff, while the members' trees are copied after
        a wipe. A node task: a failure never ends it."""
        async with asyncio.TaskGroup() as tg:
            await self._plan_until_done()
            if not self.holders_known.is_set():
                tg.create_task(self._copy_member_trees(), name="recovery-member-trees")
            await self._drain_forever()

    async def _plan_until_done(self) -> None:
        backoff = PLAN_FIRST_RETRY
        while not self.planned.is_set():
            try:
                await self.plan()
                self.error, self.error_since = "", 0.0
            except StoreFullError as exc:
                self.error_since = self.error_since or time.time()
                self.error = self._pause_full(exc)
                await asyncio.sleep(RETRY_MAX)
            except Exception as exc:
                self.error_since = self.error_since or time.time()
                self.error = str(exc)
                self._notify()
                log.error("recovery cannot start yet: %s; retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, PLAN_BACKOFF)

    async def _drain_forever(self) -> None:
        while True:
            due = await self._due()
            if due:
                self.idle.clear()
                try:
                    await self.drain(due)
                except Exception:
                    log.exception("recovery pass failed; retrying")
                    await asyncio.sleep(PLAN_BACKOFF)
                continue
            if not self.queue:
                self.idle.set()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._until_next_try())

    def _pause_full(self, exc: StoreFullError) -> str:
        """Stop fetching while the archive is full (every study would fail the same way after
        its bytes crossed the network); try again every ``RETRY_MAX`` seconds, so recovery
        resumes on its own once space returns (disk freed, or a larger map after a restart)."""
        if not self.full:
            log.error(
                "recovery paused: the archive is full (%s); what is stored is still served; "
                "free disk space or raise [store] map_size and restart, then it resumes",
                exc,
            )
        self.full = f"the archive is full: {exc}"
        self._paused_until = time.time() + RETRY_MAX
        self._notify()
        return self.full

    async def _due(self) -> list[CatalogueEntry]:
        """The queued studies due now, newest first: chosen and sorted off the event loop
        (the queue of a wiped site lists every study it held) from a snapshot of it."""
        now = time.time()
        if now < self._paused_until:
            return []
        queued, failing = list(self.queue.values()), dict(self.failing)

        def due() -> list[CatalogueEntry]:
            return newest_first(
                e
                for e in queued
                if e.study_uid not in failing or failing[e.study_uid].next_try <= now
            )

        return await asyncio.to_thread(due)

    def _until_next_try(self) -> float | None:
        times = [f.next_try for f in self.failing.values()]
        if self._paused_until:
            times.append(self._paused_until)
        if not times:
            return None
        return max(0.05, min(times) - time.time())

    async def drain(self, entries: list[CatalogueEntry] | None = None) -> RecoveryProgress:
        """Fetch queued studies (all by default; ``entries`` already newest first), newest
        first, ``STUDIES_AT_ONCE`` at a time: one study's lookups and manifests overlap
        another's blobs, so the transfer never idles between studies. The order is computed
        off the loop, and ``STUDIES_AT_ONCE`` workers take the next study in turn: no task
        per queued study (a wiped site's queue lists every study it held)."""
        pending = self.queue
        if entries is None:
            entries = await asyncio.to_thread(newest_first, list(pending.values()))
        p = self.progress
        partial: dict[str, int] = {}  # bytes so far of the studies being fetched

        def update() -> None:
            p.bytes_done = self._bytes_finished + sum(partial.values())
            self._notify()

        def on_bytes(study_uid: str) -> Callable[[int], None]:
            def progress(done: int) -> None:
                partial[study_uid] = done
                update()

            return progress

        done_before = p.studies_done
        order = iter(entries)  # shared by the workers: each takes the next newest study

        async def worker() -> None:
            for entry in order:
                if entry.study_uid in pending:  # else fetched on demand meanwhile
                    p.current = entry.study_uid
                    await self._fetch(entry, on_bytes(entry.study_uid))
                partial.pop(entry.study_uid, None)
                update()

        async with asyncio.TaskGroup() as workers:  # one failing stops the others
            for _ in range(STUDIES_AT_ONCE):
                workers.create_task(worker())
        p.current = ""
        if not pending and not p.finished:
            p.finished = time.time()
            log.warning(
                "recovery finished: %d studies, %d instances, %.1f MB in %.1f s",
                p.studies_done, p.instances, p.bytes_done / 1e6, p.finished - p.started,
            )  # fmt: skip
        if p.studies_done != done_before:  # the catalogue changed: studies came back
            self.node.publisher.mark([])  # the publisher retries until a member copies it
            with contextlib.suppress(CatalogueNotCopiedError):
                await self.node.publisher.publish_site()
        self._notify()
        return p

    async def _fetch(self, entry: CatalogueEntry, progress: Callable[[int], None]) -> None:
        uid = entry.study_uid
        try:
            await failpoints.async_hit("recovery.study", RecoveryError)
            await self._holder_known(uid)
            result = await self.node.fetch_study(
                uid, extra_manifests=(entry.manifest_hash,), progress=progress
            )
            self.progress.instances += result.instances
            if result.complete and self._complete(entry, self.node.publisher.entries.get(uid)):
                self._done(uid)
                return
            reason = f"{len(result.failed)} blobs not fetched" if result.failed else "incomplete"
        except StoreFullError as exc:
            reason = self._pause_full(exc)
        except P2PacsError as exc:
            reason = str(exc)
        self._failed(uid, reason)

    def _failed(self, study_uid: str, reason: str) -> None:
        now = time.time()
        f = self.failing.get(study_uid)
        failures = f.failures + 1 if f else 1
        since = f.since if f else now
        self.failing[study_uid] = Failing(since, failures, now + retry_delay(failures), reason)
        log.warning(
            "recovery of study %s failed (%d in a row): %s; retrying in %.0f s",
            study_uid, failures, reason, retry_delay(failures),
        )  # fmt: skip
        self.progress.failed = self.given_up(now)
        self.progress.retrying = len(self.failing)

    def takes_over(self, study_uid: str) -> bool:
        """Whether a repair pull of ``study_uid`` must wait for recovery: one order brings a
        recovering site's studies back (its queue, newest study date first, with read-through
        jumping it), so anti-entropy pulls nothing until the queue is planned and empty."""
        return not self.planned.is_set() or len(self.given_up()) < self.pending

    def on_demand(self, study_uid: str) -> None:
        """A study fetched by read-through while queued is complete: take it off the queue."""
        entry = self.queue.get(study_uid)
        if entry is not None and self._complete(entry, self.node.publisher.entries.get(study_uid)):
            self._done(study_uid)
            self._notify()

    def _notify(self) -> None:
        self.progress.retrying = len(self.failing)
        self.changed.set()
        for listener in list(self.listeners):
            listener(self.progress)
