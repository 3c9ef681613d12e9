"""What this site knows of every catalogue tree (its own and each member's), kept in LMDB.

For each site (this one included) the root of its catalogue tree that is held here whole;
``fed_holders``, study -> {site: manifest hash}, so "who holds this study" is one read; and a
reference count for every catalogue node and manifest those trees name, so superseded metadata
is collected (``sweep``) once no retained tree names it and a grace period has passed (a reader
or a member still copying may be using the old version meanwhile).

Every change is committed in one write transaction with the new root it comes from, so a crash
never leaves counts, holders and roots out of step. The cost of a new root is that of the
difference with the previous one (``cattree.diff``), not of the catalogue. Runs on threads
(LMDB reads, the site's writer); the async shell is ``catsync``.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lmdb
import msgpack

from p2pacs.errors import BlobNotFoundError, IntegrityError
from p2pacs.federation import cattree
from p2pacs.federation.catalogue import CatalogueEntry, StudyHolding
from p2pacs.looplag import bulk
from p2pacs.store import BlobStore, SiteDB

__all__ = ["CatalogueStore", "Committed"]

log = logging.getLogger(__name__)

_REF = struct.Struct(">Id")  # trees naming a blob; when that count last fell to 0
_WHEN = struct.Struct(">d")
SWEEP_BATCH = 2_000  # garbage entries examined per write transaction


@dataclass(slots=True)
class Committed:
    """What a new root changed: the studies whose holders changed, and node counts."""

    site_id: bytes
    root: str
    studies: list[str] = field(default_factory=list)
    nodes_added: int = 0
    nodes_removed: int = 0


EntryChange = tuple[str, CatalogueEntry | None, CatalogueEntry | None]  # study, before, after


@dataclass(slots=True)
class _NewRoot:
    """One site's tree moving from ``old`` to ``new``, and what that changed."""

    site_id: bytes
    old: str
    new: str
    added: list[str]  # nodes now named
    removed: list[str]  # nodes no longer named
    changes: list[EntryChange]

    def drop(self) -> None:
        """Let go of the lists (the writer thread may keep the job that names this a while)."""
        self.added, self.removed, self.changes = [], [], []


class _BlobNodes:
    """A ``cattree.NodeSource`` over the blob store (the tree verifies each node's hash)."""

    def __init__(self, blobs: BlobStore):
        self.blobs = blobs

    def node(self, h: str) -> bytes:
        try:
            return self.blobs.get(h, verify=False)
        except BlobNotFoundError as exc:
            raise IntegrityError(f"catalogue node {h[:16]} is not held here") from exc


class CatalogueStore:
    def __init__(self, db: SiteDB, blobs: BlobStore, own: bytes):
        self.db = db
        self.blobs = blobs
        self.own = own
        self.nodes = _BlobNodes(blobs)
        self._refs = db.db("fed_refs")  # 32-byte digest -> _REF
        self._garbage = db.db("fed_garbage")  # time + digest -> b"": unreferenced since then
        self._roots = db.db("fed_roots")  # site id -> root hash (hex) held here whole
        # study UID -> msgpack {site id: [manifest digest, instances, bytes]}
        self._holders = db.db("fed_holders")

    # --- reading (any thread) -------------------------------------------------------------------

    def root(self, site_id: bytes) -> str:
        with self.db.read() as txn:
            raw = txn.get(site_id, db=self._roots)
        return bytes(raw).decode() if raw else cattree.EMPTY

    def roots(self) -> dict[bytes, str]:
        with self.db.read() as txn:
            return {bytes(k): bytes(v).decode() for k, v in txn.cursor(db=self._roots)}

    def referenced(self, h: str) -> bool:
        """Named by a tree held here whole (so its subtree is here too)."""
        with self.db.read() as txn:
            raw = txn.get(bytes.fromhex(h), db=self._refs)
        return raw is not None and _REF.unpack(raw)[0] > 0

    def holders(self, study_uids: Iterable[str]) -> dict[str, dict[bytes, StudyHolding]]:
        """study -> {site: what it holds of it} for each study some tree held here lists, from
        one read snapshot: who holds a study is a local read, not a DHT lookup."""
        out: dict[str, dict[bytes, StudyHolding]] = {}
        with self.db.read() as txn:
            for uid in study_uids:
                raw = txn.get(uid.encode(), db=self._holders)
                if raw is not None:
                    out[uid] = {
                        bytes(site): StudyHolding(bytes(m).hex(), int(n), int(b))
                        for site, (m, n, b) in msgpack.unpackb(raw).items()
                    }
        return out

    def studies(self, batch: int = 10_000) -> Iterator[list[str]]:
        """Every study some tree lists, in batches, each from its own short read snapshot."""
        after = b""
        while True:
            with self.db.read() as txn:
                cursor = txn.cursor(db=self._holders)
                ok = cursor.set_range(after) if after else cursor.first()
                keys: list[bytes] = []
                while ok and len(keys) < batch:
                    key = bytes(cursor.key())
                    if key != after:
                        keys.append(key)
                    ok = cursor.next()
            if not keys:
                return
            yield [k.decode() for k in keys]
            after = keys[-1]

    def entries(self, site_id: bytes) -> Iterator[CatalogueEntry]:
        """Every entry of a site's tree held here (a whole walk: only off the event loop)."""
        return cattree.entries(self.nodes, self.root(site_id))

    def garbage(self) -> int:
        with self.db.read() as txn:
            return int(txn.stat(self._garbage)["entries"])

    # --- committing a new root ------------------------------------------------------------------

    def advance(self, site_id: bytes, new_root: str) -> Committed:
        """Make ``new_root`` (every node of it already stored here) the tree held for
        ``site_id``: compare it with the previous one and commit the difference."""
        old = self.root(site_id)
        if old == new_root:
            return Committed(site_id, new_root)
        with bulk():  # a first copy lists every entry: no full collections meanwhile
            d = cattree.diff(self.nodes, old, new_root)
            step = _NewRoot(site_id, old, new_root, list(d.added), list(d.removed),
                            [(c.study_uid, c.old, c.new) for c in d.changes])  # fmt: skip
            del d
            try:
                return self.db.write(lambda txn: self._commit(txn, step))
            finally:
                # freed now, with the collector still off: whatever outlives ``bulk`` is walked
                # by the first collection after it (measured: 160 ms for a 200,000-entry copy)
                step.drop()

    def commit_own(
        self,
        update: cattree.TreeUpdate,
        old_root: str,
        changes: list[EntryChange],
        manifests: dict[str, bytes],
        also: Callable[[lmdb.Transaction], object] | None = None,
    ) -> Committed:
        """This site's new tree (from ``cattree.apply``) with the manifests it names: blobs,
        counts, holders and root in one durable transaction. ``also`` runs first in that same
        transaction (dropping a trimmed study's data with its entry): if it raises, nothing
        is committed."""

        def job(txn: lmdb.Transaction) -> Committed:
            if also is not None:
                also(txn)
            for h, data in (*manifests.items(), *update.new.items()):
                self.blobs.write_in(txn, h, data)
            step = _NewRoot(self.own, old_root, update.root, list(update.added),
                            list(update.dropped), changes)  # fmt: skip
            return self._commit(txn, step)

        weight = sum(map(len, manifests.values())) + sum(map(len, update.new.values()))
        return self.db.write(job, weight=weight)

    def _commit(self, txn: lmdb.Transaction, step: _NewRoot) -> Committed:
        site_id, new_root = step.site_id, step.new
        current = txn.get(site_id, db=self._roots)
        if (bytes(current).decode() if current else cattree.EMPTY) != step.old:
            raise IntegrityError(f"catalogue root of {site_id.hex()[:12]} moved meanwhile")
        now = time.time()
        added, removed, changes = step.added, step.removed, step.changes
        for h in added:
            self._ref(txn, h, +1, now)
        for uid, before, after in changes:
            if after is not None:
                self._ref(txn, after.manifest_hash, +1, now)
            if before is not None:
                self._ref(txn, before.manifest_hash, -1, now)
            self._hold(txn, uid, site_id, after)
        for h in removed:
            self._ref(txn, h, -1, now)
        if new_root == cattree.EMPTY:
            txn.delete(site_id, db=self._roots)
        else:
            txn.put(site_id, new_root.encode(), db=self._roots)
        return Committed(site_id, new_root, [u for u, _, _ in changes], len(added), len(removed))

    def forget(self, site_id: bytes) -> Committed:
        """Drop the tree held for a site (a member removed from the federation)."""
        return self.advance(site_id, cattree.EMPTY)

    def store_nodes(self, nodes: dict[str, bytes]) -> None:
        """Store nodes no tree names yet (``advance`` to a root naming them follows); until
        then they count as collectable, so a crash in between leaks nothing."""

        def job(txn: lmdb.Transaction) -> None:
            for h, data in nodes.items():
                self.blobs.write_in(txn, h, data)
            self._unreferenced(txn, nodes)

        self.db.write(job, weight=sum(map(len, nodes.values())))

    def mark_unreferenced(self, hashes: Iterable[str]) -> None:
        """Blobs just stored that no tree may come to name (nodes of a copy that failed,
        manifests fetched to compare): collected after the grace period unless one does."""

        listed = list(hashes)
        self.db.write(lambda txn: self._unreferenced(txn, listed))

    def _unreferenced(self, txn: lmdb.Transaction, hashes: Iterable[str]) -> None:
        now = time.time()
        for h in hashes:
            digest = bytes.fromhex(h)
            if txn.get(digest, db=self._refs) is None:
                txn.put(digest, _REF.pack(0, now), db=self._refs)
                txn.put(_WHEN.pack(now) + digest, b"", db=self._garbage)

    def _ref(self, txn: lmdb.Transaction, h: str, delta: int, now: float) -> None:
        digest = bytes.fromhex(h)
        raw = txn.get(digest, db=self._refs)
        count, since = _REF.unpack(raw) if raw else (0, now)
        count = max(0, count + delta)
        if count == 0 and (raw is None or _REF.unpack(raw)[0] > 0):
            since = now  # unreferenced from now: collectable after the grace period
            txn.put(_WHEN.pack(now) + digest, b"", db=self._garbage)
        txn.put(digest, _REF.pack(count, since), db=self._refs)

    def _hold(
        self, txn: lmdb.Transaction, uid: str, site_id: bytes, entry: CatalogueEntry | None
    ) -> None:
        key = uid.encode()
        raw = txn.get(key, db=self._holders)
        held: dict[bytes, Any] = dict(msgpack.unpackb(raw)) if raw else {}
        if entry is None:
            held.pop(site_id, None)
        else:
            held[site_id] = [bytes.fromhex(entry.manifest_hash), entry.instances, entry.bytes]
        if held:
            txn.put(key, msgpack.packb(held), db=self._holders)
        else:
            txn.delete(key, db=self._holders)

    # --- collecting -----------------------------------------------------------------------------

    def sweep(self, grace: float, now: float | None = None) -> int:
        """Delete superseded metadata unreferenced for ``grace`` seconds; returns how many blobs
        were removed. Oldest first, in bounded transactions; a blob named again meanwhile is
        kept (the check and the delete are one transaction)."""
        cutoff = (time.time() if now is None else now) - grace
        removed = 0
        while True:
            done, gone = self.db.write(lambda txn: self._sweep_batch(txn, cutoff))
            removed += gone
            if done:
                return removed

    def _sweep_batch(self, txn: lmdb.Transaction, cutoff: float) -> tuple[bool, int]:
        due: list[bytes] = []
        for key in txn.cursor(db=self._garbage).iternext(values=False):
            if len(due) >= SWEEP_BATCH or _WHEN.unpack(key[: _WHEN.size])[0] > cutoff:
                break
            due.append(bytes(key))
        gone = 0
        for key in due:
            digest = key[_WHEN.size :]
            raw = txn.get(digest, db=self._refs)
            count, since = _REF.unpack(raw) if raw else (0, 0.0)
            if count == 0 and since <= cutoff:  # not named again since (or again unnamed later)
                txn.delete(digest, db=self._refs)
                gone += self.blobs.delete_in(txn, digest.hex())
            txn.delete(key, db=self._garbage)
        return len(due) < SWEEP_BATCH, gone
