"""Iterative node/value lookup (Kademlia paper section 2.3) that never waits for a whole round.

Up to ``alpha`` queries are in flight; as soon as one answers, the next closest uncontacted node is
asked, so a dead peer holds one slot for one RPC timeout instead of stalling every round (which is
what kademlia's ``SpiderCrawl`` does with ``gather``). A value lookup does not stop at the first
answer: it asks the k closest nodes that answer and returns every record they hold, for the
caller to verify and merge. The network is reached only through the ``query`` callable.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kademlia.node import Node

__all__ = ["Answer", "LookupResult", "iterative_lookup"]


@dataclass(frozen=True, slots=True)
class Answer:
    """What one queried node said: closer contacts and, for a value lookup, raw records."""

    nodes: list[Node]
    records: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class LookupResult:
    closest: list[Node]  # nodes that answered, closest first, at most k
    records: list[bytes]  # raw records from every answering node (unverified, may repeat)
    hops: int  # lookup depth at which the first record was found (or the deepest answer)
    queried: int  # RPCs sent


def _enough(ok: int, top: int) -> bool:
    """A lookup may stop without its stragglers once most of the k closest have answered."""
    return ok >= max(top - 2, math.ceil(top * 0.8))


async def iterative_lookup(
    target: bytes,
    *,
    seeds: list[Node],
    query: Callable[[Node], Awaitable[Answer | None]],
    self_id: bytes,
    k: int,
    alpha: int,
) -> LookupResult:
    """Find the k closest answering nodes to ``target`` (and their records)."""
    target_node = Node(target)
    nodes: dict[bytes, Node] = {}
    depth: dict[bytes, int] = {}
    state: dict[bytes, str] = {}  # "new", "wait", "ok", "fail"
    records: list[bytes] = []
    first_record_hop = 0
    deepest = 0
    queried = 0

    def add(node: Node, at: int) -> None:
        if node.id == self_id or node.id in nodes:
            return
        nodes[node.id] = node
        depth[node.id] = at
        state[node.id] = "new"

    for seed in seeds:
        add(seed, 1)

    pending: dict[asyncio.Task[Answer | None], bytes] = {}
    try:
        for _ in range(10_000):  # bounded: each pass contacts or settles at least one node
            ranked = sorted(
                (n for n in nodes.values() if state[n.id] != "fail"),
                key=target_node.distance_to,
            )
            top = ranked[:k]
            for node in top:
                if len(pending) >= alpha:
                    break
                if state[node.id] == "new":
                    state[node.id] = "wait"
                    queried += 1
                    pending[asyncio.ensure_future(query(node))] = node.id
            if not pending:
                break
            if all(state[n.id] != "new" for n in top) and _enough(
                sum(1 for n in top if state[n.id] == "ok"), len(top)
            ):
                break
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                node_id = pending.pop(task)
                answer = None if task.cancelled() or task.exception() else task.result()
                if answer is None:
                    state[node_id] = "fail"
                    continue
                state[node_id] = "ok"
                deepest = max(deepest, depth[node_id])
                if answer.records:
                    records.extend(answer.records)
                    if not first_record_hop:
                        first_record_hop = depth[node_id]
                for found in answer.nodes:
                    add(found, depth[node_id] + 1)
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    closest = sorted(
        (n for n in nodes.values() if state[n.id] == "ok"), key=target_node.distance_to
    )[:k]
    return LookupResult(closest, records, first_record_hop or deepest, queried)
