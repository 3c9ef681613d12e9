"""Anti-entropy: find studies held by fewer than R live sites and restore R.

Who holds what comes from the catalogue trees held here (this site's and a copy of each
member's; the last tree of a member that went down is still held, which is exactly what tells
the survivors what to copy), through ``CatalogueStore.holders``. A pass looks only at what may
have changed: the studies whose holders changed since the last pass (each new root committed
names them), every study of a site that went down or came back, the studies whose pull
failed and the studies still under-replicated. The first pass after start looks at every study
once, off the event loop in batches. An idle pass costs nothing.

For a study with fewer than R live holders, the missing copies go to the best-ranked live
non-holders (rendezvous order, so every site computes the same targets); a target pulls on its
own, and the top-ranked live holder also notifies the targets so repair starts at once. A
returning site adds surplus; the same pass hands each batch to ``trim.Trimmer``, which drops a
surplus copy here once it has been surplus for ``trim_after`` seconds and R other live sites
are verified to hold it whole (the surplus studies due are looked at again by the next pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pacs import failpoints
from p2pacs.errors import P2PacsError, ReplicationError, StoreFullError
from p2pacs.federation.catstore import Committed
from p2pacs.federation.node import FederationNode
from p2pacs.healing.placement import RepairPlan, plan_repairs
from p2pacs.healing.trim import Trimmer
from p2pacs.looplag import bulk

__all__ = ["Healer", "HealerStats"]

log = logging.getLogger(__name__)

PULL_WORKERS = 2  # studies pulled at once; each pull fetches its blobs in parallel
FULL_PAUSE = 60.0  # seconds a pull worker rests after the archive was found full
PASS_BATCH = 5_000  # studies looked at per step of a pass (one read snapshot, one plan)
RECENT_PULLS = 10  # repair pulls kept for status (``recent_repairs``)


@dataclass(slots=True)
class HealerStats:
    passes: int = 0
    last_pass: float = 0.0
    under_replicated: int = 0
    pulls_done: int = 0
    pulls_failed: int = 0
    last_repair: float = 0.0
    full: str = ""  # why pulls are paused: the archive is full
    errors: list[str] = field(default_factory=list)
    # the last pulls, newest last: {"time", "study", "ok", "detail"} (for the status page)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_PULLS))

    def pulled(self, study_uid: str, ok: bool, detail: str) -> None:
        self.recent.append({"time": time.time(), "study": study_uid, "ok": ok, "detail": detail})


class Healer:
    """Runs anti-entropy passes and the pull workers of one site."""

    def __init__(self, node: FederationNode):
        self.node = node
        self.replication = max(1, node.config.replication)
        self.stats = HealerStats()
        self.under: set[str] = set()  # studies with fewer than R live complete holders
        self._dirty: set[str] = set()  # studies to look at in the next pass
        self._everything = True  # the first pass looks at every study once
        self._live_before: set[bytes] = {node.site_id}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._kick = asyncio.Event()
        # while the site recovers, its recovery queue decides what comes back when (newest
        # study first); a pull it takes over returns here at a later pass if still needed
        self.defer: Callable[[str], bool] | None = None
        self.trimmer = Trimmer(node, self.replication, lambda uid: uid in self._queued)
        node.publisher.on_committed.append(self._changed)
        node.copier.on_committed.append(self._changed)
        # under_replicated follows the live view: a member seen down (or back) starts a pass now
        node.on_members_changed.append(self._kick.set)

    def snapshot(self) -> dict[str, Any]:
        """The repair part of ``status``."""
        s = self.stats
        return {
            "under_replicated": s.under_replicated,
            "repair_passes": s.passes,
            "last_repair": s.last_repair or None,
            "pulls_done": s.pulls_done,
            "pulls_failed": s.pulls_failed,
            "repair_paused": s.full,
            "repair_queue": len(self._queued),
            "recent_repairs": list(reversed(s.recent)),
            "trimmed": self.trimmer.trimmed,
        }

    def request(self, study_uid: str) -> bool:
        """Queue a pull (from a peer's notification or this site's own plan)."""
        if study_uid in self._queued:
            return False
        self._queued.add(study_uid)
        self._queue.put_nowait(study_uid)
        return True

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i in range(PULL_WORKERS):
                tg.create_task(self._worker(), name=f"pull-{i}")
            tg.create_task(self._passes(), name="anti-entropy")

    async def _passes(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.node.config.repair_interval)
            self._kick.clear()
            try:
                await self.run_pass()
            except Exception:
                log.exception("anti-entropy pass failed")

    def _changed(self, committed: Committed) -> None:
        """A catalogue tree moved: its changed studies are looked at in the next pass."""
        self._dirty.update(committed.studies)
        self._kick.set()

    async def _to_look_at(self, live: set[bytes]) -> AsyncIterator[list[str]]:
        """The studies this pass looks at, in batches."""
        store = self.node.catalogues
        if self._everything:
            self._everything = False
            for batch in await asyncio.to_thread(self._every_study):
                yield batch
        moved = (live ^ self._live_before) - {self.node.site_id}
        self._live_before = set(live)
        studies, self._dirty = self._dirty | self.under | self.trimmer.due(time.time()), set()

        def of_sites() -> set[str]:
            with bulk():
                return {e.study_uid for site in moved for e in store.entries(site)}

        if moved:
            studies |= await asyncio.to_thread(of_sites)
        ordered = sorted(studies)
        for i in range(0, len(ordered), PASS_BATCH):
            yield ordered[i : i + PASS_BATCH]

    def _every_study(self) -> list[list[str]]:
        with bulk():
            return list(self.node.catalogues.studies(PASS_BATCH))

    async def holders_view(
        self, studies: list[str]
    ) -> tuple[dict[str, set[bytes]], dict[str, set[bytes]]]:
        """(complete, incomplete): study -> sites holding all / part of it, for ``studies``."""
        node = self.node
        by_study = await asyncio.to_thread(node.catalogues.holders, studies)
        complete: dict[str, set[bytes]] = {}
        incomplete: dict[str, set[bytes]] = {}
        for uid, holdings in by_study.items():
            by_site = {site: h.manifest_hash for site, h in holdings.items()}
            if node.queued(uid) is not None:  # still being recovered: not held here yet
                by_site.pop(node.site_id, None)
            if not by_site:
                continue
            if len(set(by_site.values())) == 1:
                complete[uid] = set(by_site)
                continue
            whole = await self._complete_sites(by_site)
            complete[uid] = whole
            incomplete[uid] = set(by_site) - whole
        return complete, incomplete

    async def _complete_sites(self, by_site: Mapping[bytes, str]) -> set[bytes]:
        """Sites whose manifest lists every version any holder lists (manifests are cached
        as blobs, so this reads them locally after the first time)."""
        versions: dict[bytes, set[tuple[str, str]]] = {}
        for site_id, mh in by_site.items():
            member = self.node.members.get(site_id)
            peers = [self.node.peer_of(member)] if member else []
            try:
                manifest = await self.node.fetch_manifest(mh, [*peers, *self.node.live_peers()])
            except P2PacsError:
                continue
            versions[site_id] = {(e.sop_uid, e.hash) for e in manifest.entries}
        union = set().union(*versions.values()) if versions else set()
        return {site for site, have in versions.items() if have >= union}

    async def run_pass(self) -> RepairPlan:
        live = self.node.live_site_ids()
        me, r = self.node.site_id, self.replication
        total = RepairPlan([], [], {})
        self.trimmer.observe(time.time())
        try:
            async for batch in self._to_look_at(live):
                complete, incomplete = await self.holders_view(batch)
                plan = await asyncio.to_thread(plan_repairs, complete, live, me, r, incomplete)
                await self.trimmer.consider(batch, complete, incomplete, live)
                self.under.difference_update(batch)
                self.under.update(plan.under_replicated)
                for uid in plan.pull:
                    self.request(uid)
                await self._notify(plan.notify)
                total.under_replicated.extend(plan.under_replicated)
                total.pull.extend(plan.pull)
                for site, studies in plan.notify.items():
                    total.notify.setdefault(site, []).extend(studies)
        except BaseException:
            self._everything = True  # looked at again, whole, at the next pass
            raise
        self.stats.passes += 1
        self.stats.last_pass = time.time()
        before, after = self.stats.under_replicated, len(self.under)
        self.stats.under_replicated = after
        if after and not before:
            log.warning(
                "repair started: %d studies have fewer than %d live copies; this site pulls %d",
                after, self.replication, len(total.pull),
            )  # fmt: skip
        elif before and not after:
            log.warning("repair finished: every study has %d live copies", self.replication)
        return total

    async def _notify(self, notify: Mapping[bytes, Iterable[str]]) -> None:
        assert self.node.client is not None
        for site_id, studies in notify.items():
            member = self.node.members.get(site_id)
            if member is None:
                continue
            try:
                await self.node.client.request_json(
                    self.node.peer_of(member), "POST", "/v1/notify", {"studies": list(studies)}
                )
            except (P2PacsError, OSError) as exc:
                log.info("could not notify %s: %s", member.name, exc)

    async def _worker(self) -> None:
        while True:
            uid = await self._queue.get()
            try:
                if self.defer is not None and self.defer(uid):
                    continue
                if self.node.held(uid) and uid not in await self._incomplete([uid]):
                    continue
                await failpoints.async_hit("repair.pull", ReplicationError)
                result = await self.node.fetch_study(uid)
                if result.complete:
                    self.stats.full = ""
                    self.stats.pulls_done += 1
                    self.stats.last_repair = time.time()
                    self.stats.pulled(uid, True, f"{result.instances} instances")
                    log.info("replicated study %s: %d instances", uid, result.instances)
                else:
                    self.stats.pulls_failed += 1
                    self.stats.pulled(uid, False, f"{len(result.failed)} blobs not fetched")
                    log.warning("study %s: %d blobs not fetched", uid, len(result.failed))
            except StoreFullError as exc:
                self.stats.pulls_failed += 1
                self.stats.full = str(exc)
                self.stats.pulled(uid, False, "the archive is full")
                log.error(
                    "repair paused for %.0f s: the archive is full (%s); what is stored is "
                    "still served", FULL_PAUSE, exc,
                )  # fmt: skip
                await asyncio.sleep(FULL_PAUSE)  # this worker only; the next pass asks again
            except P2PacsError as exc:
                self.stats.pulls_failed += 1
                self.stats.pulled(uid, False, str(exc)[:200])
                log.info("pull of %s failed: %s", uid, exc)
            except Exception as exc:  # a worker outlives any one study's failure
                self.stats.pulls_failed += 1
                self.stats.pulled(uid, False, f"internal error: {type(exc).__name__}")
                log.exception("pull of %s failed", uid)
            finally:
                self._queued.discard(uid)
                self._dirty.add(uid)  # looked at again next pass: done, or pulled again

    async def _incomplete(self, study_uids: list[str]) -> list[str]:
        """Studies whose holders publish versions this site lacks."""
        out = []
        for uid in study_uids:
            local = {e.hash for e in self.node.publisher.manifest_of(uid).entries}
            for holder in await self.node.holders(uid, fresh=False):
                if holder.peer is None:
                    continue
                try:
                    manifest = await self.node.fetch_manifest(
                        holder.holding.manifest_hash, [holder.peer]
                    )
                except P2PacsError:
                    continue
                if any(e.hash not in local for e in manifest.entries):
                    out.append(uid)
                    break
        return out
