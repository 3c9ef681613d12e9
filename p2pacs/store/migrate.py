"""Move a site's blob bytes between LMDB and its object store, blob by blob, verified.

Each blob moves alone (``BlobStore.move``: read and hash-checked at the source, written to the
destination, read back and re-hashed there, its entry switched in one transaction, the old copy
dropped after), so an interrupted migration leaves every blob readable where its entry says and
running it again resumes where it stopped.
Blobs up to ``inline_max`` stay in LMDB, as new ones do on an S3-backed site.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from p2pacs.errors import P2PacsError
from p2pacs.store.blobs import BlobStore

__all__ = ["MigrateReport", "migrate"]

log = logging.getLogger(__name__)

WORKERS = 8  # blobs moved at once: an object store needs parallel PUTs to reach its throughput


@dataclass(slots=True)
class MigrateReport:
    moved: int = 0
    bytes: int = 0
    already: int = 0  # already where they belong (a resumed run) or small enough to stay
    failed: dict[str, str] = field(default_factory=dict)  # hash -> why (left where it was)


def migrate(
    blobs: BlobStore,
    to_objects: bool,
    *,
    workers: int = WORKERS,
    progress: Callable[[int], None] | None = None,
) -> MigrateReport:
    """Move every blob that belongs elsewhere; blocks (run it off any event loop)."""
    report = MigrateReport()
    lock = threading.Lock()
    slots = threading.Semaphore(workers * 2)  # bounds blobs held in memory

    def one(h: str) -> None:
        try:
            info = blobs.info(h)
            stays = info.in_objects == to_objects or (to_objects and info.size <= blobs.inline_max)
            if stays or not blobs.move(h, to_objects):  # move reads back what it wrote
                with lock:
                    report.already += 1
                return
            with lock:
                report.moved += 1
                report.bytes += info.size
        except P2PacsError as exc:
            log.error("blob %s not moved: %s", h[:16], exc)
            with lock:
                report.failed[h] = str(exc)
        finally:
            slots.release()
            if progress is not None:
                progress(1)

    with ThreadPoolExecutor(workers, thread_name_prefix="migrate") as pool:
        futures: list[Future[None]] = []
        for h in blobs.hashes():
            slots.acquire()
            futures.append(pool.submit(one, h))
        for fut in futures:
            fut.result()
    return report
