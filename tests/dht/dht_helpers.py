"""Helpers shared by the dht tests (imported by basename: pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dht import DhtNode
from dht.membership import FederationCA, Identity, issue_site_certificate


def make_identity(ca: FederationCA, name: str) -> Identity:
    key = Ed25519PrivateKey.generate()
    return Identity(key=key, certificate=issue_site_certificate(ca, key.public_key(), name))


@asynccontextmanager
async def network(
    ca: FederationCA,
    n: int,
    *,
    storage_root: Path | None = None,
    **kwargs: object,
) -> AsyncIterator[list[DhtNode]]:
    """Start ``n`` nodes, each bootstrapping from up to three earlier ones; stop all at exit."""
    nodes: list[DhtNode] = []
    try:
        for i in range(n):
            ident = make_identity(ca, f"site-{i:03d}")
            boot = [nodes[j].address for j in sorted({0, i // 2, i - 1}) if 0 <= j < i]
            path = None if storage_root is None else storage_root / f"n{i}"
            nodes.append(
                await DhtNode.start(
                    ident,
                    ca.federation,
                    storage_path=path,
                    bootstrap=boot,
                    **kwargs,  # type: ignore[arg-type]
                )
            )
        yield nodes
    finally:
        await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)


class RawPeer:
    """A plain UDP socket on 127.0.0.1 for sending hand-made datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2.0)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sock.sendto(data, addr)

    def recv(self) -> bytes | None:
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


def member_datagram(mac_key: bytes, method: str, sender: bytes, args: list[object]) -> bytes:
    """A request as a (possibly malicious) member would send it: correct MAC, fresh timestamp."""
    import os
    import time

    from dht.wire import KIND_REQUEST, encode_datagram

    return encode_datagram(
        mac_key, KIND_REQUEST, os.urandom(8), int(time.time() * 1000), [method, sender, args]
    )


def parse_answer(mac_key: bytes, data: bytes | None, peer: RawPeer | None = None) -> object:
    """The payload of the first response, skipping requests (the node's hello challenges)."""
    import time

    from dht.wire import KIND_RESPONSE, open_datagram, parse_payload

    for _ in range(10):
        assert data is not None, "no answer"
        frame = open_datagram(mac_key, data, time.time())
        if frame.kind == KIND_RESPONSE:
            return parse_payload(frame.payload)
        assert peer is not None, "got a request, not an answer"
        data = peer.recv()
    raise AssertionError("no answer among 10 datagrams")
