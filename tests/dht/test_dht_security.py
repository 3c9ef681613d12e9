"""Membership, authentication and privacy, attacked over real UDP."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from dht import DhtNode, LocalProtocolError, LookupFailedError
from dht.membership import Federation, FederationCA, Identity, create_federation
from dht.protocol import _hello_bytes
from dht.records import Record, derive_dht_key, encode_record, seal_value, sign_record
from dht.wire import KIND_RESPONSE, encode_datagram, open_datagram, parse_payload

from dht_helpers import RawPeer, make_identity, member_datagram, network, parse_answer


def signed(
    ident: Identity, fed: Federation, key: str, value: bytes, *, publisher: bytes | None = None
) -> Record:
    dkey = derive_dht_key(fed.key_hash_key, "study", key)
    return sign_record(
        key=ident.key,
        cert=ident.certificate,
        publisher=publisher or ident.site_id,
        dht_key=dkey,
        seq=time.time_ns(),
        expires_ms=int((time.time() + 60) * 1000),
        sealed=seal_value(fed.seal_key, dkey, value),
    )


async def test_non_member_datagrams_dropped_unanswered(ca: FederationCA) -> None:
    outsider_key = create_federation("outsider").federation.mac_key
    async with network(ca, 1) as (node,):
        peer = RawPeer()
        try:
            peer.send(member_datagram(outsider_key, "ping", b"x" * 20, []), node.address)
            peer.send(b"\x00" * 9000, node.address)
            peer.send(b"hi", node.address)
            good = member_datagram(ca.federation.mac_key, "ping", b"y" * 20, [])
            peer.send(good, node.address)
            peer.send(good, node.address)  # exact replay
            stale = encode_datagram(
                ca.federation.mac_key, 0, os.urandom(8), int((time.time() - 600) * 1000), []
            )
            peer.send(stale, node.address)
            peer.sock.settimeout(0.3)
            got: list[bytes] = []
            while (data := await asyncio.to_thread(peer.recv)) is not None and len(got) < 20:
                got.append(data)
            frames = [open_datagram(ca.federation.mac_key, d, time.time()) for d in got]
            answers = [parse_payload(f.payload) for f in frames if f.kind == KIND_RESPONSE]
            challenges = [parse_payload(f.payload)[0] for f in frames if f.kind != KIND_RESPONSE]
            assert answers == [node.site_id]  # one answer, to the one good ping
            assert set(challenges) <= {"hello"}  # and the node asks who we are
        finally:
            peer.close()
        stats = node.stats
        assert stats["dropped_bad_mac"] == 1
        assert stats["dropped_oversized"] == 1
        assert stats["dropped_malformed"] == 1
        assert stats["dropped_replay"] == 1
        assert stats["dropped_stale"] == 1


async def test_forged_and_foreign_records_rejected(ca: FederationCA) -> None:
    fed = ca.federation
    async with network(ca, 2) as nodes:
        mallory = make_identity(ca, "mallory")  # a real member, misbehaving
        await nodes[0].put("study", "victim", b"genuine", 60)
        peer = RawPeer()
        try:

            async def store(record: Record | bytes) -> Any:
                raw = record if isinstance(record, bytes) else encode_record(record)
                peer.send(
                    member_datagram(fed.mac_key, "store", mallory.site_id, [raw]), nodes[1].address
                )
                return await asyncio.to_thread(lambda: parse_answer(fed.mac_key, peer.recv(), peer))

            good = signed(mallory, fed, "m", b"ok")
            assert await store(good) is True
            # forged signature
            bad_sig = replace(good, signature=bytes(64))
            assert await store(bad_sig) is None
            # entry claiming to be nodes[0]'s, signed by mallory: cannot overwrite another member
            impersonation = signed(mallory, fed, "victim", b"evil", publisher=nodes[0].site_id)
            assert await store(impersonation) is None
            # certificate from a foreign CA (with the shared secret leaked)
            evil = make_identity(create_federation("evil"), "evil")
            assert await store(signed(evil, fed, "victim", b"evil")) is None
            assert await store(b"\x93garbage") is None
        finally:
            peer.close()
        assert nodes[1].stats["records_rejected"] >= 3
        assert nodes[1].stats["rpc_errors"] >= 4
        entries = await nodes[1].get("study", "victim")
        assert [(e.publisher, e.value) for e in entries] == [(nodes[0].site_id, b"genuine")]
        assert [e.value for e in await nodes[0].get("study", "m")] == [b"ok"]


async def test_foreign_ca_node_never_enters_routing_table(ca: FederationCA) -> None:
    evil_ident = make_identity(create_federation("evil"), "evil")
    with pytest.raises(LocalProtocolError, match="not a member"):
        await DhtNode.start(evil_ident, ca.federation)
    # with the leaked secret and its own code, it can talk, but it never proves an identity
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: MaliciousMember(evil_ident, ca.federation), local_addr=("127.0.0.1", 0)
    )
    try:
        async with network(ca, 2, rpc_timeout=0.3) as nodes:
            evil_addr = transport.get_extra_info("sockname")
            assert await nodes[0].ping(evil_addr) is None
            assert nodes[0].stats["hello_rejected"] == 1
            with pytest.raises(LookupFailedError):
                await nodes[1].bootstrap([evil_addr])
            for node in nodes:
                assert evil_ident.site_id not in {c.site_id for c in node.contacts()}
    finally:
        transport.close()


async def test_unproven_node_id_not_added(ca: FederationCA) -> None:
    """A member datagram claiming some node ID does not put that ID in the routing table."""
    async with network(ca, 1) as (node,):
        peer = RawPeer()
        try:
            claimed = os.urandom(20)
            peer.send(
                member_datagram(ca.federation.mac_key, "find_node", claimed, [claimed]),
                node.address,
            )
            assert await asyncio.to_thread(peer.recv) is not None  # the answer
            hello = await asyncio.to_thread(peer.recv)  # the node then challenges us
            assert (
                parse_payload(
                    open_datagram(ca.federation.mac_key, hello or b"", time.time()).payload
                )[0]
                == "hello"
            )
        finally:
            peer.close()
        assert node.contacts() == []


class MaliciousMember(asyncio.DatagramProtocol):
    """A real member (valid identity) whose find answers are garbage."""

    def __init__(self, ident: Identity, fed: Federation) -> None:
        self.ident, self.fed = ident, fed
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        frame = open_datagram(self.fed.mac_key, data, time.time())
        if frame.kind != 0:
            return
        method, sender, args = parse_payload(frame.payload)
        if method == "hello":
            cert = self.ident.certificate.public_bytes(serialization.Encoding.DER)
            sig = self.ident.key.sign(_hello_bytes(args[0], sender, self.ident.site_id))
            answer: object = [cert, sig]
        elif method == "find_value":
            answer = [
                [b"junk", 5],
                [[1, 2], [b"x" * 20, "127.0.0.1", 0], "bad", [b"y" * 3, "h", 1]],
            ]
        else:
            answer = [[b"z" * 20, 12, "port"], None]
        assert self.transport is not None
        reply = encode_datagram(
            self.fed.mac_key, KIND_RESPONSE, frame.msg_id, int(time.time() * 1000), answer
        )
        self.transport.sendto(reply, addr)


async def test_malformed_contacts_do_not_crash_lookups(ca: FederationCA) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: MaliciousMember(make_identity(ca, "junk"), ca.federation),
        local_addr=("127.0.0.1", 0),
    )
    try:
        async with network(ca, 2) as nodes:
            addr = transport.get_extra_info("sockname")
            await nodes[0].bootstrap([addr])
            await nodes[0].put("study", "k", b"v", 60)
            assert [e.value for e in await nodes[0].get("study", "k")] == [b"v"]
            stats = nodes[0].stats
            assert stats.get("contacts_malformed", 0) + stats.get("answers_malformed", 0) >= 1
            assert stats.get("handler_errors", 0) == 0
    finally:
        transport.close()


async def test_rate_limit_per_peer(ca: FederationCA) -> None:
    async with network(ca, 1, rate=(5.0, 5.0)) as (node,):
        peer = RawPeer()
        try:
            for _ in range(20):
                peer.send(
                    member_datagram(ca.federation.mac_key, "ping", b"y" * 20, []), node.address
                )
            answers = 0
            peer.sock.settimeout(0.3)
            while await asyncio.to_thread(peer.recv) is not None and answers < 50:
                answers += 1
        finally:
            peer.close()
        assert node.stats["dropped_rate_limited"] >= 10
        assert answers <= 10


class Tap:
    """Wraps a transport and keeps a copy of every datagram sent."""

    def __init__(self, inner: asyncio.DatagramTransport, sink: list[bytes]) -> None:
        self.inner, self.sink = inner, sink

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sink.append(bytes(data))
        self.inner.sendto(data, addr)


async def test_study_uid_and_value_never_on_the_wire(ca: FederationCA) -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    value = b"manifest 0f3a9c plaintext"
    captured: list[bytes] = []
    async with network(ca, 5) as nodes:
        for node in nodes:
            assert node.protocol is not None
            node.protocol.transport = Tap(node.protocol.transport, captured)
        await nodes[1].put("study", uid, value, 60)
        entries = await nodes[4].get("study", uid)
        assert [e.value for e in entries] == [value]
        await nodes[2].delete("study", uid)
    assert len(captured) > 10
    wire = b"".join(captured)
    for secret in (uid.encode(), uid.encode("utf-16-le"), value, b"study\x00" + uid.encode()):
        assert secret not in wire
    # and the opaque key does travel (so the test would notice if capture were empty)
    assert derive_dht_key(ca.federation.key_hash_key, "study", uid) in wire


async def test_new_contacts_get_no_records_pushed(ca: FederationCA) -> None:
    """kademlia pushed its whole store to every new node ID (~196x amplification); not here."""
    async with network(ca, 2) as nodes:
        for i in range(20):
            await nodes[0].put("study", f"amp.{i}", b"x" * 150, 60)
        peer = RawPeer()
        sent = received = 0
        try:
            for _ in range(10):
                data = member_datagram(ca.federation.mac_key, "ping", os.urandom(20), [])
                sent += len(data)
                peer.send(data, nodes[0].address)
            peer.sock.settimeout(0.3)
            for _ in range(100):
                got = await asyncio.to_thread(peer.recv)
                if got is None:
                    break
                received += len(got)
        finally:
            peer.close()
        assert received > 0
        assert received <= 3 * sent, (sent, received)
