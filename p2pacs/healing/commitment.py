"""Storage commitment: an instance is "safe" once R distinct live sites hold it.

Answers the gateway's Storage Commitment SCP (PS3.4 Annex J): for each referenced instance it
counts this site plus every live holder whose published manifest lists the instance's blob, and
waits (re-checking, while replication runs) until R is reached or the time is up.
"""

from __future__ import annotations

import asyncio
import time

from p2pacs.errors import P2PacsError
from p2pacs.federation.node import FederationNode

__all__ = ["NO_SUCH_OBJECT_INSTANCE", "PROCESSING_FAILURE", "check_commitment"]

PROCESSING_FAILURE = 0x0110  # PS3.4 J.3.2 Failure Reason: not yet held by R sites in time
NO_SUCH_OBJECT_INSTANCE = 0x0112  # never received here
CLASS_INSTANCE_CONFLICT = 0x0119  # received under another SOP Class UID
RECHECK = 0.5  # seconds between checks while waiting for replication


async def _copies(node: FederationNode, study_uid: str, blob: str) -> int:
    copies = 1  # this site: the caller checked that the instance is held here
    for holder in await node.holders(study_uid, fresh=False):  # kept fresh by pushes
        if not holder.up or holder.peer is None:
            continue
        try:
            manifest = await node.fetch_manifest(holder.holding.manifest_hash, [holder.peer])
        except P2PacsError:
            continue
        if any(e.hash == blob for e in manifest.entries):
            copies += 1
    return copies


async def check_commitment(
    node: FederationNode, refs: list[tuple[str, str]], timeout: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]]]:
    """(committed refs, failed refs with reason) once every ref is decided or time runs out."""
    deadline = time.monotonic() + timeout
    replication = max(1, node.config.replication)
    committed: list[tuple[str, str]] = []
    failed: list[tuple[str, str, int]] = []
    waiting: list[tuple[str, str, str, str]] = []  # class, sop, study, blob
    for sop_class, sop_uid in refs:
        rec = node.archive.index.instance(sop_uid)
        if rec is None:
            failed.append((sop_class, sop_uid, NO_SUCH_OBJECT_INSTANCE))
        elif rec.sop_class_uid != sop_class:
            failed.append((sop_class, sop_uid, CLASS_INSTANCE_CONFLICT))
        else:
            waiting.append((sop_class, sop_uid, rec.study_uid, rec.current.hash))
    while waiting:
        still = []
        for sop_class, sop_uid, study_uid, blob in waiting:
            if await _copies(node, study_uid, blob) >= replication:
                committed.append((sop_class, sop_uid))
            else:
                still.append((sop_class, sop_uid, study_uid, blob))
        waiting = still
        if not waiting or time.monotonic() >= deadline:
            break
        node.publisher.mark(sorted({w[2] for w in waiting}))  # speeds up replication if idle
        await asyncio.sleep(min(RECHECK, max(0.0, deadline - time.monotonic())))
    failed += [(c, s, PROCESSING_FAILURE) for c, s, _, _ in waiting]
    return committed, failed
