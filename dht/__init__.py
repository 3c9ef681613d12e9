"""Authenticated, multi-value Kademlia DHT for a p2pacs federation (built on ``kademlia``)."""

from __future__ import annotations

from dht.errors import (
    DhtError,
    LocalProtocolError,
    LookupFailedError,
    RecordError,
    RemoteProtocolError,
    StoreFullError,
)
from dht.node import Contact, DhtNode, Entry

__all__ = [
    "Contact",
    "DhtError",
    "DhtNode",
    "Entry",
    "LocalProtocolError",
    "LookupFailedError",
    "RecordError",
    "RemoteProtocolError",
    "StoreFullError",
]
