"""Fuzz the receive path: random bytes, mutated valid datagrams and well-MAC'd garbage payloads.

The node must never raise out of ``datagram_received`` (checked by calling it directly as well as
through the real socket), must count nothing as an unexpected handler error, and must still answer
a member afterwards.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from typing import Any

import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dht import DhtNode
from dht.membership import FederationCA
from dht.records import derive_dht_key, encode_record, seal_value, sign_record

from dht_helpers import RawPeer, make_identity, member_datagram

LEAF = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=48)
    | st.text(max_size=16)
)
OBJ = st.recursive(
    LEAF,
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=12,
)
METHODS = st.sampled_from(["hello", "ping", "find_node", "find_value", "store", "stun", "nope"])


def test_receive_path_survives_fuzzing(ca: FederationCA) -> None:
    fed = ca.federation
    ident, other = make_identity(ca, "target"), make_identity(ca, "member")
    loop = asyncio.new_event_loop()
    node = loop.run_until_complete(DhtNode.start(ident, fed, rate=(1e6, 1e6)))
    member = loop.run_until_complete(
        DhtNode.start(other, fed, bootstrap=[node.address], rate=(1e6, 1e6))
    )
    peer = RawPeer()
    dkey = derive_dht_key(fed.key_hash_key, "study", "1.2.3")
    record = encode_record(
        sign_record(
            key=other.key,
            cert=other.certificate,
            publisher=other.site_id,
            dht_key=dkey,
            seq=1,
            expires_ms=int((time.time() + 600) * 1000),
            sealed=seal_value(fed.seal_key, dkey, b"v"),
        )
    )
    valid = [
        member_datagram(fed.mac_key, "ping", other.site_id, []),
        member_datagram(fed.mac_key, "hello", other.site_id, [os.urandom(16)]),
        member_datagram(fed.mac_key, "find_node", other.site_id, [dkey]),
        member_datagram(fed.mac_key, "find_value", other.site_id, [dkey]),
        member_datagram(fed.mac_key, "store", other.site_id, [record]),
    ]

    def macd(payload: bytes, kind: int = 0) -> bytes:
        body = struct.pack(">BB8sQ", 1, kind, os.urandom(8), int(time.time() * 1000)) + payload
        return body + blake3.blake3(body, key=fed.mac_key).digest(length=16)

    mutated = st.tuples(
        st.sampled_from(valid), st.integers(0, 2000), st.integers(1, 255), st.integers(0, 3)
    ).map(_mutate)
    structured = st.tuples(
        METHODS,
        st.just(other.site_id) | st.binary(min_size=20, max_size=20) | st.binary(max_size=24),
        st.lists(OBJ | st.just(dkey) | st.just(record), max_size=3),
    )
    datagrams = st.one_of(
        st.binary(max_size=9000),
        mutated,
        st.binary(max_size=300).map(macd),
        st.tuples(st.binary(max_size=300), st.integers(0, 1)).map(lambda t: macd(t[0], t[1])),
        structured.map(lambda t: member_datagram(fed.mac_key, t[0], t[1], list(t[2]))),
        OBJ.map(lambda o: member_datagram(fed.mac_key, "store", other.site_id, [o])),
    )

    try:

        @settings(
            max_examples=250,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(data=datagrams)
        def one(data: bytes) -> None:
            assert node.protocol is not None
            node.protocol.datagram_received(data, ("127.0.0.1", 9))  # must not raise
            peer.send(data, node.address)
            loop.run_until_complete(asyncio.sleep(0))

        one()
        loop.run_until_complete(asyncio.sleep(0.05))
        assert loop.run_until_complete(member.ping(node.address)) == ident.site_id
        got: Any = loop.run_until_complete(member.get("study", "1.2.3"))
        assert isinstance(got, list)
        stats = node.stats
        assert stats.get("handler_errors", 0) == 0, stats
        assert stats["dropped_bad_mac"] > 0 and stats["dropped_malformed"] > 0
    finally:
        peer.close()
        loop.run_until_complete(member.stop())
        loop.run_until_complete(node.stop())
        loop.close()


def _mutate(t: tuple[bytes, int, int, int]) -> bytes:
    data, pos, byte, how = t
    pos %= len(data)
    if how == 0:  # flip bits
        return data[:pos] + bytes([data[pos] ^ byte]) + data[pos + 1 :]
    if how == 1:  # truncate
        return data[:pos]
    if how == 2:  # insert
        return data[:pos] + bytes([byte]) * (byte % 16 + 1) + data[pos:]
    return data + data[: byte % 64]  # trailing junk
