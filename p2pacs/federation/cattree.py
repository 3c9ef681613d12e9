"""A site's catalogue as a Merkle tree: publishing and comparing cost what changed.

The catalogue lists every study a site holds, (study, manifest hash, date, counts). Kept as
one blob it had to be re-encoded, stored and copied whole by every member on each change. Here
it is a binary Merkle trie over the BLAKE3 of each study UID (one bit of the key per level),
whose nodes are blobs addressed by their hash like any other:

- a node is a leaf when its part of the key space holds at most ``LEAF_MAX`` studies, an inner
  node otherwise, so the shape depends only on the set of entries (history-independent, as a
  Merkle search tree is): two sites holding the same entries have the same root hash;
- changing k studies rewrites k leaves and their paths: O(k log n) bytes, not O(n);
- two versions (or two sites) are compared by descending only where child hashes differ, and a
  member copying a new root fetches only the nodes it does not hold (``missing_below``).

Chosen over range-based set reconciliation because the tree is also the durable, verifiable
object a wiped site recovers from by its root hash alone, and over a Merkle search tree because
uniform keys keep the trie balanced without rebalancing. Binary rather than 16-way: a leaf of a
binary trie over uniform keys holds LEAF_MAX x ln 2 (~44) studies on average whatever n is,
while 16-way leaves swing between LEAF_MAX/16 and LEAF_MAX as n grows, and so would the cost of
a change; an inner node is ~90 bytes, so the path (log2(n / 44) nodes) stays small beside the
leaf: a change costs ~5-6 KB from a thousand studies to a million.
Pure: nodes come from a ``NodeSource`` (the blob store, or a dict in tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import msgpack
from blake3 import blake3

from p2pacs.errors import IntegrityError
from p2pacs.federation.catalogue import CatalogueEntry
from p2pacs.store import hash_bytes

__all__ = [
    "EMPTY",
    "FANOUT",
    "LEAF_MAX",
    "Inner",
    "Leaf",
    "NodeSource",
    "TreeChange",
    "TreeDiff",
    "TreeUpdate",
    "apply",
    "build",
    "count",
    "decode_node",
    "diff",
    "entries",
    "lookup",
    "missing_below",
    "study_key",
]

EMPTY = ""  # the root of a catalogue with no studies (no node at all)
FANOUT = 2  # children per inner node: one bit of the study key per level
LEAF_MAX = 64  # studies per leaf at most (~44 on average, ~5 KB)
MAX_DEPTH = 255  # bits of a 32-byte key beyond the first; never reached in practice
_VERSION = 1
_LEAF, _INNER = 0, 1


def study_key(study_uid: str) -> bytes:
    """Where a study sits in the tree: uniform, so leaves fill evenly."""
    return blake3(study_uid.encode()).digest()


def _digit(key: bytes, depth: int) -> int:
    return (key[depth // 8] >> (7 - depth % 8)) & 1


class NodeSource(Protocol):
    def node(self, h: str) -> bytes:
        """The node's bytes; raises ``IntegrityError`` or a ``P2PacsError`` if unavailable."""
        ...


@dataclass(frozen=True, slots=True)
class Child:
    hash: str  # EMPTY when no study falls there
    size: int  # bytes of the child node (lets a member fetch small nodes in batches)
    count: int  # studies below


@dataclass(frozen=True, slots=True)
class Leaf:
    entries: tuple[CatalogueEntry, ...]  # ordered by study key

    @property
    def count(self) -> int:
        return len(self.entries)


@dataclass(frozen=True, slots=True)
class Inner:
    children: tuple[Child, ...]  # FANOUT of them

    @property
    def count(self) -> int:
        return sum(c.count for c in self.children)


Node = Leaf | Inner


def encode_node(node: Node) -> bytes:
    if isinstance(node, Leaf):
        rows = [
            [e.study_uid, bytes.fromhex(e.manifest_hash), e.study_date, e.instances, e.bytes,
             e.updated]
            for e in node.entries
        ]  # fmt: skip
        return msgpack.packb([_VERSION, _LEAF, rows])  # type: ignore[no-any-return]
    kids = [[bytes.fromhex(c.hash), c.size, c.count] for c in node.children]
    return msgpack.packb([_VERSION, _INNER, kids])  # type: ignore[no-any-return]


def decode_node(data: bytes, expected_hash: str | None = None) -> Node:
    if expected_hash is not None and hash_bytes(data) != expected_hash:
        raise IntegrityError(f"catalogue node bytes do not match {expected_hash[:16]}")
    try:
        version, kind, body = msgpack.unpackb(data, raw=False)
        if version != _VERSION:
            raise ValueError(f"unknown catalogue node version {version!r}")
        if kind == _LEAF:
            return Leaf(
                tuple(
                    CatalogueEntry(str(s), bytes(m).hex(), str(d), int(n), int(b), float(t))
                    for s, m, d, n, b, t in body
                )
            )
        if kind == _INNER and len(body) == FANOUT:
            return Inner(tuple(Child(bytes(h).hex(), int(z), int(c)) for h, z, c in body))
        raise ValueError(f"unknown catalogue node kind {kind!r}")
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"malformed catalogue node: {exc}") from exc


def _read(source: NodeSource, h: str) -> Node:
    return decode_node(source.node(h), h)


@dataclass(slots=True)
class TreeUpdate:
    """The outcome of ``apply``/``build``: the new root, what to store, what it superseded."""

    root: str
    size: int  # bytes of the root node (0 for EMPTY)
    count: int  # studies in the tree
    new: dict[str, bytes] = field(default_factory=dict)  # nodes to store (children first)
    added: set[str] = field(default_factory=set)  # nodes in the new tree, not in the old
    dropped: set[str] = field(default_factory=set)  # nodes in the old tree, not in the new
    # the entries that differ, with what they were (``apply``: read on the same pass that
    # rewrites their leaves, so a caller needs no lookup first); unchanged ones are left out
    changes: list[TreeChange] = field(default_factory=list)


class _Writer:
    def __init__(self, source: NodeSource):
        self.source = source
        self.new: dict[str, bytes] = {}
        self.old: set[str] = set()  # nodes of the old tree that were read (and so replaced)
        self.changes: list[TreeChange] = []  # entries that differ from the old tree's
        self.first: dict[str, Node] = {}  # the root, decoded once by ``apply``

    def read(self, h: str) -> Node:
        if h in self.new:
            return decode_node(self.new[h])
        self.old.add(h)
        return self.first.pop(h, None) or _read(self.source, h)

    def store(self, node: Node) -> Child:
        data = encode_node(node)
        h = hash_bytes(data)
        self.new[h] = data
        return Child(h, len(data), node.count)

    def build(self, keyed: list[tuple[bytes, CatalogueEntry]], depth: int) -> Child:
        """A subtree holding exactly ``keyed`` (sorted by key)."""
        if not keyed:
            return Child(EMPTY, 0, 0)
        if len(keyed) <= LEAF_MAX or depth > MAX_DEPTH:
            return self.store(Leaf(tuple(e for _, e in keyed)))
        parts: list[list[tuple[bytes, CatalogueEntry]]] = [[] for _ in range(FANOUT)]
        for item in keyed:
            parts[_digit(item[0], depth)].append(item)
        return self.store(Inner(tuple(self.build(p, depth + 1) for p in parts)))

    def collect(self, h: str) -> list[CatalogueEntry]:
        """Every entry below ``h`` (only for subtrees of at most LEAF_MAX studies)."""
        if h == EMPTY:
            return []
        node = self.read(h)
        if isinstance(node, Leaf):
            return list(node.entries)
        return [e for c in node.children for e in self.collect(c.hash)]

    def apply(self, child: Child, depth: int, changes: list[Change]) -> Child:
        if not changes:
            return child
        node = self.read(child.hash) if child.hash != EMPTY else Leaf(())
        if isinstance(node, Leaf):
            merged = {study_key(e.study_uid): e for e in node.entries}
            differ = False
            for key, uid, entry in changes:
                before = merged.get(key)
                if before == entry:
                    continue  # already so: not a change, and the leaf stays as it is
                differ = True
                self.changes.append(TreeChange(uid, before, entry))
                if entry is None:
                    del merged[key]
                else:
                    merged[key] = entry
            if not differ:
                self.old.discard(child.hash)  # read, but kept: not replaced
                return child
            return self.build(sorted(merged.items(), key=lambda kv: kv[0]), depth)
        parts: list[list[Change]] = [[] for _ in range(FANOUT)]
        for change in changes:
            parts[_digit(change[0], depth)].append(change)
        kids = tuple(self.apply(c, depth + 1, p) for c, p in zip(node.children, parts, strict=True))
        if kids == node.children:  # nothing below changed
            self.old.discard(child.hash)
            return child
        if sum(c.count for c in kids) <= LEAF_MAX:  # shrunk: fold back into one leaf
            below = [e for c in kids for e in self.collect(c.hash)]
            return self.build(sorted((study_key(e.study_uid), e) for e in below), depth)
        return self.store(Inner(kids))

    def result(self, root: Child) -> TreeUpdate:
        """Keep only the new nodes the root reaches (a node written and then folded into its
        parent's leaf is not part of any tree)."""
        reach: set[str] = set()
        stack = [root.hash]
        while stack:
            h = stack.pop()
            if h not in self.new or h in reach:
                continue
            reach.add(h)
            node = decode_node(self.new[h])
            if isinstance(node, Inner):
                stack.extend(c.hash for c in node.children)
        new = {h: data for h, data in self.new.items() if h in reach}
        return TreeUpdate(
            root.hash, root.size, root.count, new, set(new) - self.old, self.old - set(new),
            self.changes,
        )  # fmt: skip


Change = tuple[bytes, str, CatalogueEntry | None]  # (study key, study UID, entry or removal)


def build(items: Iterable[CatalogueEntry]) -> TreeUpdate:
    """A whole tree from entries (one per study: the last wins)."""
    writer = _Writer(_NoNodes())
    by_key = {study_key(e.study_uid): e for e in items}
    return writer.result(writer.build(sorted(by_key.items(), key=lambda kv: kv[0]), 0))


def apply(
    source: NodeSource,
    root: str,
    changes: Mapping[str, CatalogueEntry | None],
) -> TreeUpdate:
    """The tree ``root`` with ``changes`` (study UID -> new entry, or None to remove) applied.

    Reads only the nodes on the changed paths, once: the entries that were there come back in
    ``changes`` (those already as asked are left out, and their paths are not rewritten). The
    caller stores ``new`` before naming the new root anywhere, and may collect ``dropped`` once
    nothing else refers to it."""
    writer = _Writer(source)
    start = Child(EMPTY, 0, 0)
    if root != EMPTY:
        data = source.node(root)
        writer.first[root] = node = decode_node(data, root)
        start = Child(root, len(data), node.count)
    keyed = sorted((study_key(uid), uid, e) for uid, e in changes.items())
    return writer.result(writer.apply(start, 0, keyed))


class _NoNodes:
    def node(self, h: str) -> bytes:
        raise IntegrityError(f"catalogue node {h[:16]} is not available")


def entries(source: NodeSource, root: str) -> Iterator[CatalogueEntry]:
    """Every entry, in key order (a whole walk: recovery and tests, never on the event loop)."""
    if root == EMPTY:
        return
    node = _read(source, root)
    if isinstance(node, Leaf):
        yield from node.entries
        return
    for c in node.children:
        yield from entries(source, c.hash)


def count(source: NodeSource, root: str) -> int:
    return 0 if root == EMPTY else _read(source, root).count


def lookup(source: NodeSource, root: str, study_uid: str) -> CatalogueEntry | None:
    """One study's entry: reads one node per level."""
    key, h, depth = study_key(study_uid), root, 0
    while h != EMPTY:
        node = _read(source, h)
        if isinstance(node, Leaf):
            return next((e for e in node.entries if e.study_uid == study_uid), None)
        h = node.children[_digit(key, depth)].hash
        depth += 1
    return None


@dataclass(frozen=True, slots=True)
class TreeChange:
    """One study that differs between two versions of a catalogue."""

    study_uid: str
    old: CatalogueEntry | None
    new: CatalogueEntry | None


@dataclass(slots=True)
class TreeDiff:
    changes: list[TreeChange] = field(default_factory=list)
    added: set[str] = field(default_factory=set)  # nodes of the new tree not in the old
    removed: set[str] = field(default_factory=set)  # nodes of the old tree not in the new


def diff(source: NodeSource, old: str, new: str) -> TreeDiff:
    """Compare two versions by descending only where hashes differ: O(changes x depth)."""
    out = TreeDiff()
    _diff(source, old, new, out)
    return out


def _diff(source: NodeSource, old: str, new: str, out: TreeDiff) -> None:
    if old == new:
        return
    a = _read(source, old) if old != EMPTY else None
    b = _read(source, new) if new != EMPTY else None
    if old != EMPTY:
        out.removed.add(old)
    if new != EMPTY:
        out.added.add(new)
    if isinstance(a, Inner) and isinstance(b, Inner):
        for ca, cb in zip(a.children, b.children, strict=True):
            _diff(source, ca.hash, cb.hash, out)
        return
    if a is None or b is None:  # a subtree appeared or went: every entry below it changed
        gone = a is not None
        for e in _all(
            source, a if gone else b, old if gone else new, out.removed if gone else out.added
        ):
            out.changes.append(
                TreeChange(e.study_uid, e, None) if gone else TreeChange(e.study_uid, None, e)
            )
        return
    # a leaf against a subtree: compare the entries below each side (one side is small)
    left = {e.study_uid: e for e in _all(source, a, old, out.removed)}
    right = {e.study_uid: e for e in _all(source, b, new, out.added)}
    for uid in sorted(left.keys() | right.keys()):
        if left.get(uid) != right.get(uid):
            out.changes.append(TreeChange(uid, left.get(uid), right.get(uid)))


def _all(source: NodeSource, node: Node | None, h: str, seen: set[str]) -> list[CatalogueEntry]:
    if node is None:
        return []
    if isinstance(node, Leaf):
        return list(node.entries)
    out: list[CatalogueEntry] = []
    for c in node.children:
        if c.hash != EMPTY:
            seen.add(c.hash)
            out.extend(_all(source, _read(source, c.hash), c.hash, seen))
    return out


def missing_below(
    node_bytes: bytes, have: Callable[[str], bool]
) -> list[tuple[str, int]]:  # fmt: skip
    """The children of a node that a copier lacks, with their sizes: copy a root by fetching
    level by level only what is new (a held node implies its whole subtree is held, because
    a copier stores children before their parent)."""
    node = decode_node(node_bytes)
    if isinstance(node, Leaf):
        return []
    return [(c.hash, c.size) for c in node.children if c.hash != EMPTY and not have(c.hash)]
