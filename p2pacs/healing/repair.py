"""Anti-entropy: find studies held by fewer than R live sites and restore R.

Each pass builds a view of who holds what from the members' catalogues (the last catalogue of a
member that went down is still known, which is exactly what tells the survivors what to copy).
For a study with fewer than R live holders, the missing copies go to the best-ranked live
non-holders (rendezvous order, so every site computes the same targets); a target pulls on its
own, and the top-ranked live holder also notifies the targets so repair starts at once. Copies
are never deleted: a returning site simply adds surplus, which keeps R and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from p2pacs.errors import P2PacsError
from p2pacs.federation.node import FederationNode
from p2pacs.healing.placement import RepairPlan, plan_repairs

__all__ = ["Healer", "HealerStats"]

log = logging.getLogger(__name__)

PULL_WORKERS = 2  # studies pulled at once; each pull fetches its blobs in parallel


@dataclass(slots=True)
class HealerStats:
    passes: int = 0
    last_pass: float = 0.0
    under_replicated: int = 0
    pulls_done: int = 0
    pulls_failed: int = 0
    last_repair: float = 0.0
    errors: list[str] = field(default_factory=list)


class Healer:
    """Runs anti-entropy passes and the pull workers of one site."""

    def __init__(self, node: FederationNode):
        self.node = node
        self.replication = max(1, node.config.replication)
        self.stats = HealerStats()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._kick = asyncio.Event()
        node.publisher.on_published.append(lambda _studies: self._kick.set())

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

    async def holders_view(self) -> dict[str, set[bytes]]:
        """study -> sites holding it, from this site's index and every member's catalogue."""
        view: dict[str, set[bytes]] = {}
        for uid in self.node.publisher.entries:
            view.setdefault(uid, set()).add(self.node.site_id)
        for member in self.node.members:
            try:
                catalogue = await self.node.catalogue_of(member)
            except P2PacsError as exc:
                log.debug("catalogue of %s unavailable: %s", member.name, exc)
                continue
            for entry in catalogue.entries if catalogue else ():
                view.setdefault(entry.study_uid, set()).add(member.site_id)
        return view

    async def run_pass(self) -> RepairPlan:
        view = await self.holders_view()
        live = self.node.live_site_ids()
        plan = plan_repairs(view, live, self.node.site_id, self.replication)
        self.stats.passes += 1
        self.stats.last_pass = time.time()
        self.stats.under_replicated = len(plan.under_replicated)
        for uid in plan.pull:
            self.request(uid)
        await self._notify(plan.notify)
        return plan

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
                if self.node.held(uid) and uid not in await self._incomplete([uid]):
                    continue
                result = await self.node.fetch_study(uid)
                if result.complete:
                    self.stats.pulls_done += 1
                    self.stats.last_repair = time.time()
                    log.info("replicated study %s: %d instances", uid, result.instances)
                else:
                    self.stats.pulls_failed += 1
                    log.warning("study %s: %d blobs not fetched", uid, len(result.failed))
            except P2PacsError as exc:
                self.stats.pulls_failed += 1
                log.info("pull of %s failed: %s", uid, exc)
            finally:
                self._queued.discard(uid)

    async def _incomplete(self, study_uids: list[str]) -> list[str]:
        """Studies whose holders publish versions this site lacks."""
        out = []
        for uid in study_uids:
            local = {e.hash for e in self.node.publisher.manifest_of(uid).entries}
            for holder in await self.node.holders(uid):
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
