"""Scrub: re-hash every stored blob and repair a corrupted one from a peer that holds it.

A blob that fails its hash is worthless as it is, so it is dropped and fetched again (verified)
from any live member; if no member has it, it is reported as unrepaired, never served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pacs.archive import Archive
from p2pacs.errors import P2PacsError
from p2pacs.federation.node import FederationNode

__all__ = ["ScrubReport", "ScrubTotals", "repair_blob", "scrub"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScrubReport:
    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepaired: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ScrubTotals:
    """What the scrubs run by this process found, in all (``status``: ``federation.scrub``)."""

    runs: int = 0
    checked: int = 0
    corrupt: int = 0
    repaired: int = 0
    unrepaired: int = 0
    last_run: float | None = None  # Unix time the last scrub ended

    def add(self, report: ScrubReport) -> None:
        self.runs += 1
        self.checked += report.checked
        self.corrupt += len(report.corrupt)
        self.repaired += len(report.repaired)
        self.unrepaired += len(report.unrepaired)
        self.last_run = time.time()


async def repair_blob(node: FederationNode, h: str) -> bool:
    """Replace a corrupted local blob with a verified copy from a live member."""
    size = node.archive.blobs.info(h).size if node.archive.blobs.has(h) else None
    await asyncio.to_thread(node.archive.blobs.delete, h)
    try:
        await node.fetch_blob(h, size, node.live_peers())
    except P2PacsError as exc:
        log.error("blob %s is corrupt here and no member could supply it: %s", h[:16], exc)
        return False
    log.warning("blob %s was corrupt and has been repaired from a peer", h[:16])
    return True


async def scrub(
    archive: Archive,
    node: FederationNode | None,
    *,
    repair: bool,
    progress: Callable[[int], None] | None = None,
) -> ScrubReport:
    """Verify every blob; with ``repair`` (and a running federation node) fix what is corrupt."""
    report = ScrubReport()
    hashes = list(archive.blobs.hashes())
    for h in hashes:
        ok = await asyncio.to_thread(archive.blobs.verify_blob, h)
        report.checked += 1
        if not ok:
            report.corrupt.append(h)
            if repair and node is not None:
                if await repair_blob(node, h):
                    report.repaired.append(h)
                else:
                    report.unrepaired[h] = "no live member holds a good copy"
            else:
                report.unrepaired[h] = "not repaired (run with --repair on an enrolled site)"
        if progress is not None:
            progress(1)
    return report
