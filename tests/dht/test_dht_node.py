"""DhtNode over real UDP on 127.0.0.1: small networks, persistence, republish."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from dht import DhtNode, LocalProtocolError, LookupFailedError, RecordError, StoreFullError
from dht.membership import FederationCA

from dht_helpers import make_identity, network


async def test_three_nodes_put_get(ca: FederationCA) -> None:
    async with network(ca, 3) as nodes:
        assert all(len(n.contacts()) == 2 for n in nodes)
        assert {c.name for c in nodes[0].contacts()} == {"site-001", "site-002"}
        stored = await nodes[0].put("study", "1.2.3.4", b"manifest-hash", 60)
        assert stored == 3
        for node in nodes:
            entries = await node.get("study", "1.2.3.4")
            assert [(e.publisher, e.publisher_name, e.value) for e in entries] == [
                (nodes[0].site_id, "site-000", b"manifest-hash")
            ]
            assert entries[0].expires_at > time.time() + 50
        assert await nodes[1].get("study", "9.9.9") == []
        # every lookup's time is counted, however short (loopback ones take well under 1 ms)
        stats = nodes[1].stats
        assert stats["lookups"] >= 2 and stats["lookup_us"] >= stats["lookups"]


async def test_two_publishers_both_kept_and_seq_replaces(ca: FederationCA) -> None:
    async with network(ca, 4) as nodes:
        await nodes[0].put("study", "1.2", b"from-0", 60)
        await nodes[1].put("study", "1.2", b"from-1", 60)
        await nodes[0].put("study", "1.2", b"from-0-v2", 60)
        entries = await nodes[3].get("study", "1.2")
        assert {e.publisher: e.value for e in entries} == {
            nodes[0].site_id: b"from-0-v2",
            nodes[1].site_id: b"from-1",
        }
        # delete withdraws only the deleter's own entry
        await nodes[1].delete("study", "1.2")
        entries = await nodes[2].get("study", "1.2")
        assert [e.value for e in entries] == [b"from-0-v2"]


async def test_single_node_and_ping(ca: FederationCA) -> None:
    a = make_identity(ca, "alone")
    async with await DhtNode.start(a, ca.federation, rpc_timeout=0.3) as node:
        assert len(node.site_id) == 20 and node.site_id == a.site_id
        assert node.address[1] > 0
        assert await node.put("site", "x", b"v", 30) == 1
        with pytest.raises(LocalProtocolError):
            await node.put("site", "x", b"v", 365 * 86400.0)  # beyond the lifetime cap
        with pytest.raises(LocalProtocolError):
            await node.put("site", "x", b"v" * 2000, 30)  # values are hashes, not blobs
        with pytest.raises(LocalProtocolError, match="cannot listen"):
            await DhtNode.start(a, ca.federation, port=node.address[1])
        assert [e.value for e in await node.get("site", "x")] == [b"v"]
        b = make_identity(ca, "other")
        async with await DhtNode.start(b, ca.federation, rpc_timeout=0.3) as other:
            assert await node.ping(other.address) == b.site_id
            await other.bootstrap([("localhost", node.address[1])])  # names are resolved
            assert [c.site_id for c in other.contacts()] == [a.site_id]
            closed = other.address
        assert await node.ping(closed) is None
        with pytest.raises(LookupFailedError):
            await node.bootstrap([closed])
        with pytest.raises(LocalProtocolError):
            await node.set("k", "v")  # kademlia's unsigned set is closed off


async def test_put_fails_loudly_when_every_peer_is_gone(ca: FederationCA) -> None:
    async with network(ca, 2, rpc_timeout=0.3) as nodes:
        await nodes[1].stop()
        with pytest.raises(LookupFailedError):
            await nodes[0].put("study", "x", b"v", 30)


async def test_restart_keeps_records_seq_and_contacts(ca: FederationCA, tmp_path: Path) -> None:
    ids = [make_identity(ca, f"p{i}") for i in range(3)]
    paths = [tmp_path / f"n{i}" for i in range(3)]
    nodes: list[DhtNode] = []
    try:
        for i in range(3):
            boot = [n.address for n in nodes]
            nodes.append(
                await DhtNode.start(ids[i], ca.federation, storage_path=paths[i], bootstrap=boot)
            )
        await nodes[1].put("study", "held", b"by-1", 600)
        await nodes[0].put("study", "mine", b"first", 600)
        first_seq = (await nodes[0].get("study", "mine"))[0].seq
        ports = [n.address[1] for n in nodes]
    finally:
        for n in nodes:
            await n.stop()

    # node 0 alone: what it held for node 1 comes back from LMDB; its own seq keeps rising
    n0 = await DhtNode.start(
        ids[0], ca.federation, storage_path=paths[0], port=ports[0], rpc_timeout=0.3
    )
    n1 = None
    try:
        assert [e.value for e in await n0.get("study", "held")] == [b"by-1"]
        await n0.put("study", "mine", b"second", 600)
        again = await n0.get("study", "mine")
        assert [e.value for e in again] == [b"second"] and again[0].seq > first_seq
        # node 1 comes back on its old port with no bootstrap list: it rejoins from saved contacts
        n1 = await DhtNode.start(ids[1], ca.federation, storage_path=paths[1], port=ports[1])
        assert ids[0].site_id in {c.site_id for c in n1.contacts()}
        assert [e.value for e in await n1.get("study", "mine")] == [b"second"]
    finally:
        await n0.stop()
        if n1 is not None:
            await n1.stop()


async def test_publisher_republishes_before_expiry(ca: FederationCA) -> None:
    async with network(ca, 3, republish_interval=0.3) as nodes:
        await nodes[0].put("study", "short", b"v", 2.0)
        first = (await nodes[2].get("study", "short"))[0]
        deadline = time.monotonic() + 10
        latest = first
        while time.monotonic() < deadline and latest.expires_at < first.expires_at + 1.0:
            await asyncio.sleep(0.2)  # waiting for wall-clock expiry is the point of this test
            entries = await nodes[2].get("study", "short")
            assert entries, "record lapsed before it was republished"
            latest = entries[0]
        assert latest.seq > first.seq
        assert latest.expires_at >= first.expires_at + 1.0
        assert nodes[0].stats["republished"] >= 1


async def test_a_dead_contact_costs_one_timeout_not_one_per_lookup(ca: FederationCA) -> None:
    ids = [make_identity(ca, f"q{i}") for i in range(3)]
    nodes: list[DhtNode] = []
    try:
        for ident in ids:
            nodes.append(
                await DhtNode.start(
                    ident, ca.federation, bootstrap=[n.address for n in nodes], rpc_timeout=0.3
                )
            )
        a, dead = nodes[0], nodes[2]
        assert await a.put("study", "x", b"v", 600) == 3
        port = dead.address[1]
        await dead.stop()
        assert [e.value for e in await a.get("study", "x")] == [b"v"]
        timeouts = a.stats.get("rpc_timeouts", 0)
        assert timeouts >= 1  # found out once...
        for _ in range(5):  # ...while b, which asks nobody, keeps handing the dead contact out
            assert [e.value for e in await a.get("study", "x")] == [b"v"]
        assert a.stats.get("rpc_timeouts", 0) == timeouts
        assert a.stats.get("rpc_skipped_silent", 0) >= 1
        # back on its old port, it speaks first (bootstrap): it is asked again at once
        nodes[2] = await DhtNode.start(
            ids[2], ca.federation, port=port, bootstrap=[a.address], rpc_timeout=0.3
        )
        assert await a.put("study", "y", b"w", 600) == 3
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


async def test_own_record_opens_elsewhere_and_past_its_expiry(ca: FederationCA) -> None:
    """What a member keeps of a site's record verifies at any node, also after it lapsed."""
    async with network(ca, 2) as (a, b):
        assert a.own_record("site", a.site_id.hex()) is None
        await a.put("site", a.site_id.hex(), b"catalogue-1", 1.0)
        raw = a.own_record("site", a.site_id.hex())
        assert raw is not None
        entry = b.open_record("site", a.site_id.hex(), raw)
        assert (entry.publisher, entry.value) == (a.site_id, b"catalogue-1")
        with pytest.raises(RecordError, match="another key"):
            b.open_record("site", b.site_id.hex(), raw)
        with pytest.raises(RecordError):
            b.open_record("site", a.site_id.hex(), raw[:-1] + bytes([raw[-1] ^ 1]))
        deadline = time.time() + 5
        while time.time() < entry.expires_at and time.time() < deadline:
            await asyncio.sleep(0.1)
        with pytest.raises(RecordError, match="expired"):
            b.open_record("site", a.site_id.hex(), raw)
        assert b.open_record("site", a.site_id.hex(), raw, allow_expired=True).seq == entry.seq


async def test_full_store_refuses_at_once_and_says_so(ca: FederationCA, tmp_path: Path) -> None:
    """A node whose record store is full answers stores "not stored" (no timeout for the
    sender), counts them, and keeps serving what it holds; its own publications still reach
    the others."""
    small = 256 * 1024  # bytes: a few hundred records
    a = await DhtNode.start(
        make_identity(ca, "small"), ca.federation, storage_path=tmp_path / "a", capacity=small
    )
    b = await DhtNode.start(
        make_identity(ca, "big"),
        ca.federation,
        storage_path=tmp_path / "b",
        bootstrap=[a.address],
        rpc_timeout=2.0,
    )
    try:
        first = "1.2.0"
        assert await b.put("study", first, b"held", 600) == 2
        refused_at = None
        for i in range(1, 2000):  # bounded: the store fills long before
            started = time.monotonic()
            try:
                await b.put("study", f"1.2.{i}", b"x" * 200, 600)
            except LookupFailedError as exc:  # its one peer refused it
                assert "refused" in str(exc) and "full" in str(exc)
                refused_at = time.monotonic() - started
                break
        assert refused_at is not None, "the small store never filled"
        assert refused_at < 1.0  # answered, not left to the 2 s RPC timeout
        assert a.stats["store_full"] >= 1
        assert [e.value for e in await b.get("study", first)] == [b"held"]
        with pytest.raises(StoreFullError, match="full"):  # its own entries: a clear error
            for i in range(2000):
                await a.put("site", f"own-{i}", b"y" * 200, 600)
    finally:
        await b.stop()
        await a.stop()
