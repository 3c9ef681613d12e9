"""The lookup algorithm and the routing table, over an in-memory network (no sockets)."""

from __future__ import annotations

import asyncio
import os
import random

from kademlia.node import Node

from dht.lookup import Answer, iterative_lookup
from dht.protocol import DhtRoutingTable


class _Proto:
    def __init__(self) -> None:
        self.pinged: list[Node] = []

    def spawn_ping(self, node: Node) -> None:
        self.pinged.append(node)


def _ids(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(20) for _ in range(n)]


def test_find_neighbors_is_exact() -> None:
    for seed in range(20):
        ids = _ids(300, seed)
        me = Node(ids[0])
        table = DhtRoutingTable(_Proto(), 20, me)  # type: ignore[arg-type]
        for i, node_id in enumerate(ids[1:]):
            table.add_contact(Node(node_id, "127.0.0.1", i + 1))
        contacts = [n for b in table.buckets for n in b.nodes.values()]
        key = Node(os.urandom(20))
        expected = sorted(contacts, key=key.distance_to)[:20]
        assert [n.id for n in table.find_neighbors(key, k=20)] == [n.id for n in expected]


async def test_lookup_finds_k_closest_and_survives_dead_nodes() -> None:
    ids = _ids(200, 3)
    dead = set(ids[1:40])  # a fifth of the network silent
    target = os.urandom(20)
    tnode = Node(target)
    holders = sorted((i for i in ids if i not in dead), key=lambda i: Node(i).distance_to(tnode))[
        :20
    ]
    tables: dict[bytes, list[Node]] = {}
    rng = random.Random(4)
    for node_id in ids:
        tables[node_id] = [Node(p, "h", 1) for p in rng.sample(ids, 30) if p != node_id]

    async def query(node: Node) -> Answer | None:
        if node.id in dead:
            await asyncio.sleep(0.05)  # stands in for the RPC timeout
            return None
        await asyncio.sleep(0)
        nearest = sorted(tables[node.id], key=tnode.distance_to)[:20]
        records = [b"rec-" + node.id] if node.id in holders else []
        return Answer(nearest, records)

    result = await iterative_lookup(
        target, seeds=tables[ids[0]][:5], query=query, self_id=ids[0], k=20, alpha=3
    )
    found = {n.id for n in result.closest}
    assert len(found & set(holders)) >= 18  # stragglers may be left behind, most are reached
    assert not found & dead
    assert len(result.records) >= 18
    assert result.hops >= 1 and result.queried < 200


async def test_lookup_with_no_answers() -> None:
    async def query(node: Node) -> Answer | None:
        return None

    seeds = [Node(i, "h", 1) for i in _ids(5, 9)]
    result = await iterative_lookup(
        os.urandom(20), seeds=seeds, query=query, self_id=b"\0" * 20, k=20, alpha=3
    )
    assert result.closest == [] and result.records == [] and result.queried == 5
