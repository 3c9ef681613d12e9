"""The catalogue Merkle tree, without sockets: shape, updates, diffs and their cost."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pacs.errors import IntegrityError
from p2pacs.federation import cattree
from p2pacs.federation.catalogue import CatalogueEntry


class Nodes(dict[str, bytes]):
    """A node store: what a site's blob store is to the tree."""

    def node(self, h: str) -> bytes:
        try:
            return self[h]
        except KeyError:
            raise IntegrityError(f"node {h[:16]} missing") from None

    def take(self, update: cattree.TreeUpdate) -> str:
        self.update(update.new)
        return update.root


def entry(i: int, version: int = 0) -> CatalogueEntry:
    return CatalogueEntry(
        f"1.2.826.0.1.3680043.8.498.{i}", f"{(i * 7919 + version):064x}", "20260101", 30,
        15_000_000, float(version),
    )  # fmt: skip


def reachable(nodes: Nodes, root: str) -> set[str]:
    out: set[str] = set()
    stack = [root]
    while stack:
        h = stack.pop()
        if h == cattree.EMPTY:
            continue
        out.add(h)
        node = cattree.decode_node(nodes.node(h), h)
        if isinstance(node, cattree.Inner):
            stack.extend(c.hash for c in node.children)
    return out


def test_empty_tree() -> None:
    update = cattree.build([])
    assert update.root == cattree.EMPTY and update.count == 0 and not update.new
    assert list(cattree.entries(Nodes(), cattree.EMPTY)) == []
    assert cattree.lookup(Nodes(), cattree.EMPTY, "1.2.3") is None


def test_build_lists_every_entry_and_finds_each() -> None:
    items = [entry(i) for i in range(2_000)]
    nodes = Nodes()
    root = nodes.take(cattree.build(items))
    assert sorted(cattree.entries(nodes, root)) == sorted(items)
    assert cattree.count(nodes, root) == 2_000
    for e in random.Random(1).sample(items, 50):
        assert cattree.lookup(nodes, root, e.study_uid) == e
    assert cattree.lookup(nodes, root, "9.9.9") is None
    node = cattree.decode_node(nodes.node(root), root)
    assert isinstance(node, cattree.Inner)  # 2,000 studies do not fit one leaf


changes_strategy = st.lists(
    st.tuples(st.integers(0, 400), st.integers(0, 3), st.booleans()), max_size=120
)


@settings(max_examples=40, deadline=None)
@given(start=st.sets(st.integers(0, 400), max_size=300), changes=changes_strategy)
def test_updates_give_the_tree_built_from_scratch(
    start: set[int], changes: list[tuple[int, int, bool]]
) -> None:
    """History independence: the root depends only on the entries, so two sites (or a site
    and its rebuilt self) holding the same catalogue agree on one hash."""
    nodes = Nodes()
    held = {entry(i).study_uid: entry(i) for i in start}
    root = nodes.take(cattree.build(held.values()))
    batch: dict[str, CatalogueEntry | None] = {}
    for i, version, remove in changes:
        e = entry(i, version)
        batch[e.study_uid] = None if remove else e
    before = reachable(nodes, root)
    update = cattree.apply(nodes, root, batch)
    new_root = nodes.take(update)
    for uid, e in batch.items():
        if e is None:
            held.pop(uid, None)
        else:
            held[uid] = e
    assert new_root == cattree.build(held.values()).root
    assert sorted(cattree.entries(nodes, new_root)) == sorted(held.values())
    after = reachable(nodes, new_root)
    assert update.added == after - before
    assert update.dropped == before - after
    # the same pass reports what each entry was: exactly the entries that differ
    was = {e.study_uid: e for e in cattree.entries(nodes, root)}
    differ = {uid: e for uid, e in batch.items() if was.get(uid) != e}
    assert {c.study_uid: c.new for c in update.changes} == differ
    assert all(c.old == was.get(c.study_uid) for c in update.changes)
    if not differ:
        assert new_root == root and not update.new and not update.dropped

    d = cattree.diff(nodes, root, new_root)
    old_map = {e.study_uid: e for e in cattree.entries(nodes, root)}
    expected = {u for u in old_map.keys() | held.keys() if old_map.get(u) != held.get(u)}
    assert {c.study_uid for c in d.changes} == expected
    for c in d.changes:
        assert c.old == old_map.get(c.study_uid) and c.new == held.get(c.study_uid)
    assert d.added == after - before and d.removed == before - after


def test_one_change_costs_a_path_not_the_catalogue() -> None:
    nodes = Nodes()
    items = [entry(i) for i in range(20_000)]
    root = nodes.take(cattree.build(items))
    whole = sum(len(b) for b in nodes.values())
    update = cattree.apply(nodes, root, {items[123].study_uid: entry(123, 1)})
    written = sum(len(b) for b in update.new.values())
    assert len(update.new) <= 16, "a leaf and its path"
    assert written < 9_000, f"{written} bytes for one study"
    assert written * 100 < whole
    assert len(update.dropped) == len(update.new)
    nodes.take(update)
    d = cattree.diff(nodes, root, update.root)
    assert [c.study_uid for c in d.changes] == [items[123].study_uid]
    assert len(d.added) == len(update.new)


def test_missing_below_names_only_children_not_held() -> None:
    nodes = Nodes()
    root = nodes.take(cattree.build(entry(i) for i in range(500)))
    node = cattree.decode_node(nodes[root])
    assert isinstance(node, cattree.Inner)
    kids = [c.hash for c in node.children if c.hash]
    held = set(kids[:3])
    wanted = cattree.missing_below(nodes[root], held.__contains__)
    assert {h for h, _ in wanted} == set(kids) - held
    assert all(size == len(nodes[h]) for h, size in wanted)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x93\x01\x00", b"\x93\x02\x00\x90", b"\x93\x01\x01\x91\x93\xc4\x00\x00\x00", b"junk"],
)
def test_malformed_nodes_are_integrity_errors(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        cattree.decode_node(data)


def test_a_node_that_does_not_match_its_hash_is_refused() -> None:
    nodes = Nodes()
    root = nodes.take(cattree.build([entry(1)]))
    with pytest.raises(IntegrityError, match="do not match"):
        cattree.decode_node(nodes[root] + b"x", root)


class CountingNodes(Nodes):
    """Counts every node read, to show a change reads its path once."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def node(self, h: str) -> bytes:
        self.reads.append(h)
        return super().node(h)


def test_apply_reads_each_path_once_and_returns_what_was_there() -> None:
    """The publisher learns each entry's previous value from ``apply`` itself: one pass down
    the changed paths, no lookup first (each node of a path is read once)."""
    nodes = CountingNodes()
    items = [entry(i) for i in range(5_000)]
    root = nodes.take(cattree.build(items))
    changed = {items[7].study_uid: entry(7, 1), items[900].study_uid: entry(900, 2)}
    same = {items[42].study_uid: items[42]}  # already so: not a change
    update = cattree.apply(nodes, root, {**changed, **same, "9.9.9": None})
    assert len(nodes.reads) == len(set(nodes.reads)), "a node read twice"
    paths = {h for c in changed for h in path(nodes, root, c)}
    looked = paths | {h for u in (items[42].study_uid, "9.9.9") for h in path(nodes, root, u)}
    assert set(nodes.reads) <= looked
    assert sorted((c.study_uid, c.old, c.new) for c in update.changes) == sorted(
        (uid, items[int(uid.rsplit(".", 1)[1])], e) for uid, e in changed.items()
    )
    # only the changed paths are rewritten: the unchanged study's leaf is kept
    assert cattree.lookup(nodes, nodes.take(update), items[42].study_uid) == items[42]
    assert update.dropped <= paths


def test_apply_with_nothing_different_changes_nothing() -> None:
    nodes = Nodes()
    items = [entry(i) for i in range(300)]
    root = nodes.take(cattree.build(items))
    update = cattree.apply(nodes, root, {e.study_uid: e for e in items[:50]} | {"1.2": None})
    assert update.root == root and update.count == 300
    assert not update.new and not update.added and not update.dropped and not update.changes


def path(nodes: Nodes, root: str, study_uid: str) -> list[str]:
    """The nodes from the root to the leaf where ``study_uid`` sits."""
    key, h, depth, out = cattree.study_key(study_uid), root, 0, []
    while h != cattree.EMPTY:
        out.append(h)
        node = cattree.decode_node(dict.__getitem__(nodes, h))
        if isinstance(node, cattree.Leaf):
            break
        h = node.children[(key[depth // 8] >> (7 - depth % 8)) & 1].hash
        depth += 1
    return out
