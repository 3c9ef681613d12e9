"""The authenticated datagram codec and the checks made before anything is parsed.

Sans-I/O (h11, zeroconf's ``_protocol``): bytes in, frames out, the clock passed in. Layout::

    version(1) kind(1) msg_id(8) timestamp_ms(8, big-endian) payload(msgpack) mac(16)

``mac`` = keyed BLAKE3 (federation MAC key) over everything before it. A datagram is dropped,
and the reason counted, if it is oversized, too short, has a bad MAC (a non-member), a timestamp
outside the replay window, is an exact duplicate inside the window, or its sender is over its
rate. Only then is the payload handed to msgpack.
"""

from __future__ import annotations

import hmac
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack

from dht.const import (
    BURST_PER_PEER,
    DATAGRAM_VERSION,
    MAC_SIZE,
    MAX_DATAGRAM,
    MSG_ID_SIZE,
    RATE_PER_PEER,
    RATE_TABLE_MAX,
    REPLAY_CACHE_MAX,
    REPLAY_WINDOW,
)
from dht.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "KIND_REQUEST",
    "KIND_RESPONSE",
    "DroppedDatagram",
    "Frame",
    "ReplayGuard",
    "TokenBuckets",
    "encode_datagram",
    "open_datagram",
    "parse_payload",
]

KIND_REQUEST = 0
KIND_RESPONSE = 1
_HEADER = struct.Struct(">BB8sQ")
HEADER_SIZE = _HEADER.size  # 18 bytes
MIN_DATAGRAM = HEADER_SIZE + 1 + MAC_SIZE


class DroppedDatagram(RemoteProtocolError):
    """A datagram failed a check; ``reason`` names the ``stats`` counter it was counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Frame:
    """An authenticated datagram whose payload has not been parsed yet."""

    kind: int
    msg_id: bytes
    timestamp_ms: int
    payload: bytes
    tag: bytes


def _mac(mac_key: bytes, data: bytes) -> bytes:
    return blake3.blake3(data, key=mac_key).digest(length=MAC_SIZE)


def encode_datagram(mac_key: bytes, kind: int, msg_id: bytes, timestamp_ms: int, obj: Any) -> bytes:
    """Pack ``obj`` (msgpack) into an authenticated datagram; refuse anything over the limit."""
    if len(msg_id) != MSG_ID_SIZE:
        raise LocalProtocolError("msg_id must be 8 bytes")
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    body = _HEADER.pack(DATAGRAM_VERSION, kind, msg_id, timestamp_ms) + packed
    data = body + _mac(mac_key, body)
    if len(data) > MAX_DATAGRAM:
        raise LocalProtocolError(
            f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}; records must stay small"
        )
    return data


def open_datagram(mac_key: bytes, data: bytes, now: float) -> Frame:
    """Size, MAC and timestamp checks, in that order (cheapest first, MAC before any parsing)."""
    if len(data) > MAX_DATAGRAM:
        raise DroppedDatagram("dropped_oversized")
    if len(data) < MIN_DATAGRAM:
        raise DroppedDatagram("dropped_malformed")
    body, tag = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if not _constant_time_eq(_mac(mac_key, body), tag):
        raise DroppedDatagram("dropped_bad_mac")
    version, kind, msg_id, ts = _HEADER.unpack_from(body)
    if version != DATAGRAM_VERSION or kind not in (KIND_REQUEST, KIND_RESPONSE):
        raise DroppedDatagram("dropped_malformed")
    if abs(ts / 1000.0 - now) > REPLAY_WINDOW:
        raise DroppedDatagram("dropped_stale")
    return Frame(kind, msg_id, ts, body[HEADER_SIZE:], tag)


def _constant_time_eq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def parse_payload(payload: bytes) -> Any:
    """msgpack with its own limits; any failure is a malformed datagram, never an exception."""
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_array_len=1024,
            max_map_len=64,
        )
    except Exception as exc:  # msgpack raises ValueError, TypeError, ExtraData, StackError...
        raise DroppedDatagram("dropped_malformed") from exc


class ReplayGuard:
    """Remembers datagram tags seen within the replay window, so an exact replay is dropped."""

    def __init__(self, window: float = REPLAY_WINDOW, max_size: int = REPLAY_CACHE_MAX) -> None:
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._window = window
        self._max = max_size

    def check(self, tag: bytes, now: float) -> None:
        self._expire(now)
        if tag in self._seen:
            raise DroppedDatagram("dropped_replay")
        self._seen[tag] = now
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)

    def _expire(self, now: float) -> None:
        # Entries are in arrival order; everything older than two windows can no longer pass the
        # timestamp check, so it need not be remembered.
        horizon = now - 2 * self._window
        while self._seen:
            tag, seen = next(iter(self._seen.items()))
            if seen >= horizon:
                break
            del self._seen[tag]


class TokenBuckets:
    """Per-address token bucket; the table is LRU-bounded so spoofed sources can't grow it."""

    def __init__(
        self,
        rate: float = RATE_PER_PEER,
        burst: float = BURST_PER_PEER,
        max_peers: int = RATE_TABLE_MAX,
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._max = max_peers
        self._buckets: OrderedDict[tuple[str, int], tuple[float, float]] = OrderedDict()

    def check(self, addr: tuple[str, int], now: float) -> None:
        tokens, last = self._buckets.pop(addr, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[addr] = (tokens, now)
            raise DroppedDatagram("dropped_rate_limited")
        self._buckets[addr] = (tokens - 1.0, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
