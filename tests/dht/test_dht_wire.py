"""The datagram codec and guards, without sockets."""

from __future__ import annotations

import time

import pytest

from dht.errors import LocalProtocolError
from dht.wire import (
    KIND_REQUEST,
    DroppedDatagram,
    ReplayGuard,
    TokenBuckets,
    encode_datagram,
    open_datagram,
    parse_payload,
)

KEY = b"k" * 32
MID = b"12345678"


def now_ms() -> int:
    return int(time.time() * 1000)


def reason(key: bytes, data: bytes, now: float | None = None) -> str:
    with pytest.raises(DroppedDatagram) as info:
        open_datagram(key, data, time.time() if now is None else now)
    return info.value.reason


def test_round_trip() -> None:
    data = encode_datagram(KEY, KIND_REQUEST, MID, now_ms(), ["ping", b"x" * 20, []])
    frame = open_datagram(KEY, data, time.time())
    assert frame.msg_id == MID and frame.kind == KIND_REQUEST
    assert parse_payload(frame.payload) == ["ping", b"x" * 20, []]


def test_drops_by_reason() -> None:
    good = encode_datagram(KEY, KIND_REQUEST, MID, now_ms(), ["ping", b"x" * 20, []])
    assert reason(b"z" * 32, good) == "dropped_bad_mac"
    assert reason(KEY, good[:-1] + bytes([good[-1] ^ 1])) == "dropped_bad_mac"
    assert reason(KEY, good[:10]) == "dropped_malformed"
    assert reason(KEY, b"\x00" * 9000) == "dropped_oversized"
    assert reason(KEY, good, time.time() + 120) == "dropped_stale"
    old = encode_datagram(KEY, KIND_REQUEST, MID, now_ms() - 3_600_000, [])
    assert reason(KEY, old) == "dropped_stale"
    bad_kind = encode_datagram(KEY, 7, MID, now_ms(), [])
    assert reason(KEY, bad_kind) == "dropped_malformed"


def test_refuses_to_build_oversized() -> None:
    with pytest.raises(LocalProtocolError):
        encode_datagram(KEY, KIND_REQUEST, MID, now_ms(), [b"x" * 9000])


def test_parse_payload_garbage() -> None:
    for payload in (b"\xc1", b"\x92\x01", b"\xdd\xff\xff\xff\xff", b"\x81\x01\x02"):
        with pytest.raises(DroppedDatagram):
            parse_payload(payload)


def test_replay_guard() -> None:
    guard = ReplayGuard(window=30)
    guard.check(b"a", 1000.0)
    with pytest.raises(DroppedDatagram, match="replay"):
        guard.check(b"a", 1001.0)
    guard.check(b"b", 1001.0)
    guard.check(b"a", 1100.0)  # forgotten after two windows (the timestamp check covers it)


def test_token_bucket() -> None:
    buckets = TokenBuckets(rate=10, burst=5)
    for _ in range(5):
        buckets.check(("h", 1), 0.0)
    with pytest.raises(DroppedDatagram, match="rate"):
        buckets.check(("h", 1), 0.0)
    buckets.check(("h", 2), 0.0)  # per peer
    buckets.check(("h", 1), 0.2)  # refilled
