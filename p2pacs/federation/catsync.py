"""Copying a member's catalogue tree: fetch only the nodes not held, then commit the change.

A member's new root is compared with the one held here by descending from the root: a child
that a tree held here whole already names is skipped with everything below it, so an idle
member costs nothing and a member that changed k studies costs about k leaves and their paths.
Missing nodes are fetched level by level, in batches (inner nodes carry their children's sizes),
from the member first and then from any live site. Once every node is here the difference is
committed in one transaction (``CatalogueStore.advance``); a copy that fails leaves what it
fetched to be collected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from p2pacs import failpoints
from p2pacs.errors import TransferError
from p2pacs.federation import cattree
from p2pacs.federation.catstore import CatalogueStore, Committed
from p2pacs.transfer import Peer, PeerClient

__all__ = ["CatalogueCopier", "CopyStats"]

log = logging.getLogger(__name__)


class CopyStats:
    """Counts for status and the benchmarks: what copying the members' trees cost."""

    def __init__(self) -> None:
        self.copies = 0  # new roots committed
        self.nodes_fetched = 0
        self.bytes_fetched = 0
        self.failed = 0


class CatalogueCopier:
    def __init__(self, store: CatalogueStore, client: Callable[[], PeerClient | None]):
        self.store = store
        self._client = client
        self._locks: dict[bytes, asyncio.Lock] = {}
        self.stats = CopyStats()
        self.on_committed: list[Callable[[Committed], None]] = []

    async def copy(self, site_id: bytes, root: str, peers: Sequence[Peer]) -> Committed:
        """Hold ``root`` as ``site_id``'s tree (fetching what is missing from ``peers``)."""
        lock = self._locks.setdefault(site_id, asyncio.Lock())
        async with lock:  # one copy per site at a time; a newer root waits for the older
            if await asyncio.to_thread(self.store.root, site_id) == root:
                return Committed(site_id, root)
            fetched: list[str] = []
            try:
                await failpoints.async_hit("catalogue.copy", TransferError)
                await self._fetch_missing(root, peers, fetched)
                committed = await asyncio.to_thread(self.store.advance, site_id, root)
            except BaseException:
                self.stats.failed += 1
                if fetched:  # collected after the grace period unless a later copy names them
                    await asyncio.to_thread(self.store.mark_unreferenced, fetched)
                raise
        self.stats.copies += 1
        for listener in self.on_committed:
            listener(committed)
        return committed

    async def adopt(self, root: str, peers: Sequence[Peer]) -> None:
        """Fetch every node of ``root`` without committing it (this site's own tree, found
        after a wipe: the publisher merges it with what arrived meanwhile)."""
        await self._fetch_missing(root, peers, [])

    async def _fetch_missing(self, root: str, peers: Sequence[Peer], fetched: list[str]) -> None:
        if root == cattree.EMPTY:
            return
        client = self._client()
        if client is None:
            raise TransferError("the federation is stopping")
        store, blobs = self.store, self.store.blobs
        level: list[tuple[str, int | None]] = []
        if not await asyncio.to_thread(store.referenced, root):
            level = [(root, None)]
        while level:
            need = await asyncio.to_thread(blobs.missing, [h for h, _ in level])
            if need:
                sizes = dict(level)
                items = [(h, sizes.get(h), list(peers)) for h in need]
                report = await client.fetch_many(items, blobs)
                fetched.extend(h for h in need if h not in report.failed)
                self.stats.nodes_fetched += report.fetched
                self.stats.bytes_fetched += report.bytes
                if report.failed:
                    h, why = next(iter(report.failed.items()))
                    raise TransferError(
                        f"{len(report.failed)} catalogue nodes not fetched ({h[:16]}: {why})"
                    )
            level = await asyncio.to_thread(self._below, [h for h, _ in level])

    def _below(self, hashes: list[str]) -> list[tuple[str, int | None]]:
        """The children of these nodes that no tree held here whole names (thread)."""
        out: list[tuple[str, int | None]] = []
        for h in hashes:
            data = self.store.nodes.node(h)
            out.extend(cattree.missing_below(data, self.store.referenced))
        return out
