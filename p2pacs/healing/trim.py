"""Trimming: a surplus copy is dropped once the placement's copies are back and verified.

After an outage the repair targets keep the copies they made, so without trimming every site
ends up holding everything. A site drops its copy of a study only when all of these hold:

- trimming is on (``[federation] trim_after`` > 0) and every known member is up: while one is
  down, surplus copies are what keeps R, and the placement itself is in flux;
- the study has been over-replicated, with this site surplus and its ``trimmer`` (pure rule in
  ``placement.plan_trims``: at least R *other* live sites hold it whole, this site is not a
  placement target, and it ranks last among the surplus holders), continuously for
  ``trim_after`` seconds, counted from the later of when that was first seen and when every
  member was last up again (kept in memory: a restart starts the clock again);
- nothing changed the study here within ``trim_after`` (ingest, or a fetch: the index's
  ``updated``), it is not queued for recovery or repair, and no pull of it runs (the study
  lock that fetches hold is held while dropping);
- at the moment of dropping, at least R other live sites' manifests (from this site's copies
  of their catalogue trees) list every version this site holds, and those sites answer that
  they store every one of its blobs (``/v1/blobs/have``): a catalogue alone is not enough, as a
  wiped member still recovering keeps listing the studies it has not got back.

The study's index entries, its instance blobs and its entry in this site's catalogue tree go in
one LMDB transaction (``Publisher.remove`` + ``Archive.drop_study_in``); a version that
arrived meanwhile aborts it. The members learn of it from the new catalogue root, as of any
other change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from p2pacs.errors import P2PacsError, TrimRefusedError
from p2pacs.federation.node import FederationNode
from p2pacs.healing.placement import plan_trims
from p2pacs.transfer.client import Peer
from p2pacs.transfer.server import MAX_HAVE

__all__ = ["Trimmer"]

log = logging.getLogger(__name__)

TRIMS_PER_PASS = 200  # copies one anti-entropy pass may drop; the rest stay due for the next
# (repair shares the pass: after a long outage thousands fall due at once)


class Trimmer:
    """Tracks this site's surplus copies and drops them when they are due."""

    def __init__(self, node: FederationNode, replication: int, busy: Callable[[str], bool]):
        self.node = node
        self.replication = replication
        self.grace = node.config.trim_after
        self.busy = busy  # queued for a repair pull here
        self.since: dict[str, float] = {}  # study -> when it was first seen surplus here
        self.all_up_since: float | None = time.time()  # None while a member is down
        self.trimmed = 0
        self.bytes_trimmed = 0
        self._budget = TRIMS_PER_PASS

    @property
    def enabled(self) -> bool:
        return self.grace > 0

    def observe(self, now: float) -> None:
        """Before each pass: note whether every known member is up."""
        self._budget = TRIMS_PER_PASS
        down_after = self.node.config.down_after
        if any(not m.is_up(down_after, now) for m in self.node.members):
            self.all_up_since = None
        elif self.all_up_since is None:
            self.all_up_since = now

    def due(self, now: float) -> set[str]:
        """Surplus studies whose grace period has run out: looked at again by this pass."""
        return {uid for uid in self.since if self._due(uid, now)}

    def _due(self, uid: str, now: float) -> bool:
        start, since = self.all_up_since, self.since.get(uid)
        if not self.enabled or start is None or since is None:
            return False
        return now - max(since, start) >= self.grace

    async def consider(
        self,
        batch: list[str],
        complete: Mapping[str, set[bytes]],
        incomplete: Mapping[str, set[bytes]],
        live: set[bytes],
    ) -> None:
        """Update which of ``batch`` are surplus here, and drop those that are due."""
        if not self.enabled:
            return
        me, r = self.node.site_id, self.replication
        now = time.time()
        surplus = set(plan_trims(complete, live, me, r, incomplete))
        for uid in batch:
            if uid not in surplus:
                self.since.pop(uid, None)
        for uid in sorted(surplus):
            self.since.setdefault(uid, now)
        for uid in sorted(u for u in surplus if self._due(u, now)):
            if self._budget <= 0:
                return
            self._budget -= 1
            others = (complete[uid] & live) - {me}
            try:
                await self._trim(uid, others)
            except P2PacsError as exc:
                log.info("surplus copy of %s kept for now: %s", uid, exc)

    async def _trim(self, uid: str, others: set[bytes]) -> None:
        node = self.node
        async with node.study_lock(uid):
            if not node.held(uid) or self.busy(uid):
                return
            index = node.archive.index

            def local() -> tuple[float | None, set[tuple[str, str]]]:
                study = index.study(uid)
                records = index.study_instances(uid)
                versions = {(rec.sop_uid, v.hash) for rec in records for v in rec.versions}
                return (study.updated if study else None), versions

            updated, versions = await asyncio.to_thread(local)
            if updated is None:
                self.since.pop(uid, None)
                return
            if time.time() - updated < self.grace:  # changed here lately: wait from then
                self.since[uid] = max(self.since.get(uid, updated), updated)
                return
            verified = await self._verified(uid, others, versions)
            if len(verified) < self.replication:
                self.since[uid] = time.time()  # not provably safe now: the clock starts again
                log.info(
                    "surplus copy of %s kept: only %d other sites verified to hold it whole",
                    uid, len(verified),
                )  # fmt: skip
                return
            archive = node.archive
            try:
                dropped = await node.publisher.remove(
                    [uid], lambda txn: archive.drop_study_in(txn, uid, versions)
                )
            except TrimRefusedError as exc:
                self.since[uid] = time.time()
                log.info("%s", exc)
                return
        self.since.pop(uid, None)
        if dropped is None:
            return
        instances, blobs, size = dropped
        self.trimmed += 1
        self.bytes_trimmed += size
        log.info(
            "trimmed study %s: surplus copy dropped (%d instances, %d blobs, %.1f MB); held "
            "whole at %s",
            uid, instances, blobs, size / 1e6, ", ".join(sorted(verified)),
        )  # fmt: skip

    async def _verified(
        self, uid: str, others: set[bytes], versions: set[tuple[str, str]]
    ) -> list[str]:
        """Names of the ``others`` whose manifest lists every version held here."""
        node = self.node
        holdings = (await asyncio.to_thread(node.catalogues.holders, [uid])).get(uid, {})
        out: list[str] = []
        for site_id in sorted(others):
            holding = holdings.get(site_id)
            member = node.members.get(site_id)
            if holding is None or member is None or not member.is_up(node.config.down_after):
                continue
            peers = [node.peer_of(member), *node.live_peers()]
            try:
                manifest = await node.fetch_manifest(holding.manifest_hash, peers)
            except P2PacsError:
                continue
            if not versions <= {(e.sop_uid, e.hash) for e in manifest.entries}:
                continue
            if await self._has_blobs(node.peer_of(member), {h for _, h in versions}):
                out.append(member.name)
        return out

    async def _has_blobs(self, peer: Peer, hashes: set[str]) -> bool:
        """Whether ``peer`` answers that it stores every blob now. Its catalogue alone does
        not say so: a wiped member recovering keeps listing the studies it has not got back."""
        client = self.node.client
        if client is None:
            return False
        ordered = sorted(hashes)
        for i in range(0, len(ordered), MAX_HAVE):
            part = ordered[i : i + MAX_HAVE]
            try:
                held = await client.have(peer, part)
            except (P2PacsError, OSError, TimeoutError):
                return False
            if not held >= set(part):
                return False
        return True
