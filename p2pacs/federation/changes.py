"""The federation's view of what gateway worker processes ingested: it tails the change log.

Workers write instances to the site's LMDB in their own processes; each index update appends
its study to the change log in the same transaction (``store.changelog``). This task reads the
log from its first entry (what is still there was not yet published: consumed entries are
pruned), marks the studies dirty for the publisher, and prunes once the publisher has published
them. The cost follows what changed: nothing walks the archive.

When an entry is safe to prune: the publisher takes its dirty set at the start of a round and
calls ``on_published`` at the end of a successful one (a failed round puts the studies back).
A study marked before round N-1 ended is in round N's set or an earlier one, so when round N
ends, everything read before round N-1 ended is published. A crash before pruning only means
the next start marks those studies again (publishing an unchanged study changes nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from p2pacs.archive import Archive
from p2pacs.events import DicomRequest, Event

__all__ = ["ChangeTailer"]

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5  # seconds between reads of an idle log (a worker's C-STORE wakes it sooner)
READ_BATCH = 4096  # entries read per pass


class ChangeTailer:
    def __init__(self, archive: Archive, mark: Callable[[Iterable[str]], None]):
        self.archive = archive
        self.mark = mark
        self.read_upto = 0  # the last sequence number marked
        self._safe_after_next = 0  # read before the last published round ended
        self.pruned_upto = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def observe(self, event: Event) -> None:
        """Event bus observer (any thread): a C-STORE somewhere means the log grew."""
        loop = self._loop
        stored = isinstance(event, DicomRequest) and event.service == "C-STORE" and event.completed
        if stored and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        unsubscribe = self.archive.events.subscribe(self.observe)
        changes = self.archive.changes
        try:
            while True:
                self._wake.clear()
                entries = await asyncio.to_thread(changes.read, self.read_upto, READ_BATCH)
                if entries:
                    self.read_upto = entries[-1][0]
                    self.mark({uid for _, uid in entries})
                    if len(entries) == READ_BATCH:
                        continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)
        finally:
            unsubscribe()

    def published(self, _studies: list[str]) -> None:
        """Publisher's ``on_published`` (on the loop): prune what is surely published now."""
        upto, self._safe_after_next = self._safe_after_next, self.read_upto
        if upto <= self.pruned_upto:
            return
        changes = self.archive.changes
        future = self.archive.db.submit(lambda txn: changes.prune(txn, upto))
        self.pruned_upto = upto

        def done(fut: object) -> None:
            exc = future.exception()
            if exc is not None:
                log.warning("change log not pruned (it will be next time): %s", exc)

        future.add_done_callback(done)
