"""Catalogue trees held in a real LMDB: holders, reference counts and collection of superseded
metadata (nothing a retained tree names is ever collected; a failed commit changes nothing)."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pacs.archive import Archive
from p2pacs.errors import IntegrityError
from p2pacs.federation import cattree
from p2pacs.federation.catalogue import CatalogueEntry
from p2pacs.federation.catstore import CatalogueStore
from p2pacs.store import hash_bytes

ME, OTHER = b"\x01" * 20, b"\x02" * 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CatalogueStore]:
    arc = Archive(tmp_path / "db", map_size=1 << 28, sync=False)
    try:
        yield CatalogueStore(arc.db, arc.blobs, ME)
    finally:
        arc.close()


def manifest(i: int, version: int = 0) -> bytes:
    return f"manifest of study {i} version {version}".encode()


def entry(i: int, version: int = 0) -> CatalogueEntry:
    return CatalogueEntry(
        f"1.2.3.{i}", hash_bytes(manifest(i, version)), "20260101", 1, 10, float(version)
    )


def publish(store: CatalogueStore, items: dict[int, int]) -> str:
    """This site publishes studies ``{i: version}`` the way the publisher does."""
    root = store.root(ME)
    update = cattree.apply(store.nodes, root, {entry(i, v).study_uid: entry(i, v)
                                               for i, v in items.items()})  # fmt: skip
    changes = [(c.study_uid, c.old, c.new) for c in update.changes]
    manifests = {entry(i, v).manifest_hash: manifest(i, v) for i, v in items.items()}
    return store.commit_own(update, root, changes, manifests).root


def manifests(store: CatalogueStore, uid: str) -> dict[bytes, str]:
    """Who holds ``uid``, with the manifest each one publishes."""
    return {site: h.manifest_hash for site, h in store.holders([uid]).get(uid, {}).items()}


def nodes_of(store: CatalogueStore, root: str) -> set[str]:
    out, stack = set(), [root]
    while stack:
        h = stack.pop()
        if h:
            out.add(h)
            node = cattree.decode_node(store.nodes.node(h), h)
            if isinstance(node, cattree.Inner):
                stack.extend(c.hash for c in node.children)
    return out


def test_publish_update_and_collect(store: CatalogueStore) -> None:
    first = publish(store, {i: 0 for i in range(300)})
    assert store.root(ME) == first
    assert cattree.count(store.nodes, first) == 300
    assert manifests(store, "1.2.3.7") == {ME: entry(7).manifest_hash}
    assert store.holders(["1.2.3.7"])["1.2.3.7"][ME].instances == 1
    old_nodes = nodes_of(store, first)
    assert all(store.referenced(h) for h in old_nodes)

    second = publish(store, {7: 1})
    assert manifests(store, "1.2.3.7") == {ME: entry(7, 1).manifest_hash}
    superseded = old_nodes - nodes_of(store, second)
    assert superseded and len(superseded) <= 4
    assert not store.referenced(entry(7).manifest_hash)
    assert store.garbage() == len(superseded) + 1  # the nodes of the old path, the old manifest

    assert store.sweep(grace=3600) == 0, "nothing goes before its grace period"
    assert store.sweep(grace=0, now=time.time() + 1) == len(superseded) + 1
    assert not store.blobs.has(entry(7).manifest_hash)
    assert store.blobs.has(entry(7, 1).manifest_hash)
    assert all(not store.blobs.has(h) for h in superseded)
    assert sorted(store.entries(ME)) == sorted([entry(i) for i in range(300) if i != 7]
                                               + [entry(7, 1)])  # fmt: skip
    assert store.garbage() == 0


def test_a_node_named_again_is_kept(store: CatalogueStore) -> None:
    first = publish(store, {1: 0, 2: 0})
    publish(store, {1: 1})
    assert not store.referenced(first)
    # a member's tree that is exactly our first one names its root again
    store.advance(OTHER, first)
    assert store.referenced(first)
    # the member's tree names our old root and the old manifest of study 1 again: both kept
    assert store.sweep(grace=0, now=time.time() + 1) == 0
    assert store.blobs.has(first) and store.blobs.has(entry(1).manifest_hash)
    assert manifests(store, "1.2.3.1") == {
        ME: entry(1, 1).manifest_hash,
        OTHER: entry(1).manifest_hash,
    }
    store.forget(OTHER)
    assert manifests(store, "1.2.3.2") == {ME: entry(2).manifest_hash}
    assert store.sweep(grace=0, now=time.time() + 1) == 2
    assert not store.blobs.has(first) and not store.blobs.has(entry(1).manifest_hash)


def test_member_tree_copied_then_advanced(store: CatalogueStore) -> None:
    theirs = cattree.build(entry(i) for i in range(200))
    store.store_nodes(theirs.new)
    assert not store.referenced(theirs.root)  # stored, not yet named: collectable
    committed = store.advance(OTHER, theirs.root)
    assert sorted(committed.studies) == sorted(e.study_uid for e in (entry(i) for i in range(200)))
    assert store.referenced(theirs.root)
    changed = cattree.apply(store.nodes, theirs.root, {entry(5).study_uid: None})
    store.store_nodes(changed.new)
    assert store.advance(OTHER, changed.root).studies == [entry(5).study_uid]
    assert "1.2.3.5" not in store.holders(["1.2.3.5"])
    assert store.sweep(grace=0, now=time.time() + 1) == len(changed.dropped)


def test_a_failed_commit_changes_nothing(store: CatalogueStore) -> None:
    publish(store, {1: 0})
    update = cattree.apply(store.nodes, store.root(ME), {entry(2).study_uid: entry(2)})
    with pytest.raises(IntegrityError, match="moved"):
        store.commit_own(update, "ab" * 32, [("1.2.3.2", None, entry(2))],
                         {entry(2).manifest_hash: manifest(2, 0)})  # fmt: skip
    assert not any(store.blobs.has(h) for h in update.new)
    assert not store.blobs.has(entry(2).manifest_hash)
    assert store.holders(["1.2.3.2"]) == {}


def test_studies_are_listed_in_batches(store: CatalogueStore) -> None:
    publish(store, {i: 0 for i in range(250)})
    batches = list(store.studies(batch=100))
    assert [len(b) for b in batches] == [100, 100, 50]
    assert len({u for b in batches for u in b}) == 250


def test_a_first_copy_lets_go_of_its_diff_before_the_collector_returns(
    store: CatalogueStore,
) -> None:
    """``advance`` lists every entry of a first copy with the garbage collector off (``bulk``);
    what it still holds when the collector comes back is walked by the next collection while
    that thread holds the GIL (160 ms of event-loop lag for 200,000 entries). So no collection
    during a copy may find the diff's objects still young."""
    theirs = cattree.build(entry(i) for i in range(20_000))
    store.store_nodes(theirs.new)
    gc.collect()
    young: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            young.append(gc.get_count()[0])

    gc.callbacks.append(seen)
    try:
        committed = store.advance(OTHER, theirs.root)
    finally:
        gc.callbacks.remove(seen)
    assert len(committed.studies) == 20_000
    # 20,000 entries make ~60,000 young objects in the diff (entries, changes, tuples)
    assert max(young, default=0) < 5_000, young
