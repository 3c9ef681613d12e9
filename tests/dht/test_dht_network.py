"""Larger networks in one process: 50 nodes, and churn."""

from __future__ import annotations

import asyncio
import random

import pytest

from dht.membership import FederationCA

from dht_helpers import network


@pytest.mark.slow
async def test_fifty_nodes_put_get_from_every_node(ca: FederationCA) -> None:
    async with network(ca, 50) as nodes:
        assert min(len(n.contacts()) for n in nodes) >= 5
        for i, node in enumerate(nodes):
            assert await node.put("study", f"1.2.840.{i}", f"hash-{i}".encode(), 300) >= 10
        rng = random.Random(50)
        for i, node in enumerate(nodes):
            j = rng.randrange(50)
            entries = await node.get("study", f"1.2.840.{j}")
            assert [(e.publisher, e.value) for e in entries] == [
                (nodes[j].site_id, f"hash-{j}".encode())
            ], f"node {i} could not find record {j}"


@pytest.mark.slow
async def test_churn_thirty_percent_stopped(ca: FederationCA) -> None:
    async with network(ca, 30, rpc_timeout=0.5) as nodes:
        for i, node in enumerate(nodes):
            await node.put("study", f"churn.{i}", f"v{i}".encode(), 300)
        rng = random.Random(7)
        doomed = rng.sample(range(30), 9)
        await asyncio.gather(*(nodes[i].stop() for i in doomed))
        alive = [n for i, n in enumerate(nodes) if i not in doomed]

        async def check(i: int) -> bool:
            entries = await alive[i % len(alive)].get("study", f"churn.{i}")
            return [e.value for e in entries] == [f"v{i}".encode()]

        results = await asyncio.gather(*(check(i) for i in range(30)))
        assert all(results), [i for i, ok in enumerate(results) if not ok]
        # the dead nodes were noticed and dropped, not waited on forever
        assert sum(n.stats.get("rpc_timeouts", 0) for n in alive) > 0
