"""The one error tree of dht/: local misuse versus remote misbehaviour (as h11 splits them)."""

from __future__ import annotations

__all__ = [
    "DhtError",
    "LocalProtocolError",
    "LookupFailedError",
    "RecordError",
    "RemoteProtocolError",
    "StoreFullError",
]


class DhtError(Exception):
    """Base of every error dht/ raises on purpose."""


class LocalProtocolError(DhtError):
    """This node was used wrongly (bad arguments, not started, record too large)."""


class RemoteProtocolError(DhtError):
    """A peer sent something malformed, forged or out of policy; it was dropped."""


class RecordError(RemoteProtocolError):
    """A record failed verification (signature, certificate, seal or expiry)."""


class StoreFullError(LocalProtocolError):
    """This node's record store is full even after dropping expired records; raise the
    store's capacity (p2pacs: ``[federation] dht_capacity``)."""


class LookupFailedError(DhtError):
    """No reachable node answered a lookup; check bootstrap peers and the network."""
