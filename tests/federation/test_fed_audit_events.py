"""The federation tells the site's event bus what the audit trail records: a tampered blob, a
non-member refused at TLS (a foreign certificate at our server, a wrong site at the other
end), blobs served to a member. Real mutual TLS servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from pathlib import Path

import pytest

from dht.membership import FederationCA, create_federation
from p2pacs.errors import IntegrityError, PeerUnavailableError
from p2pacs.events import Event, EventBus, PeerTransfer, SecurityAlert
from p2pacs.store import hash_bytes
from p2pacs.transfer import Peer, PeerClient

from fed_helpers import LyingServer, make_identity, open_store, peer_of, raw_client_context, serving

pytestmark = pytest.mark.timeout(60)


class Seen:
    def __init__(self, bus: EventBus):
        self.events: list[Event] = []
        self._lock = threading.Lock()
        bus.subscribe(self._on)

    def _on(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def alerts(self, kind: str) -> list[SecurityAlert]:
        return [e for e in self.events if isinstance(e, SecurityAlert) and e.kind == kind]


@pytest.fixture(scope="module")
def ca() -> FederationCA:
    return create_federation("audit-events")


async def test_tampered_blob_is_a_security_alert(ca: FederationCA, tmp_path: Path) -> None:
    bus = EventBus()
    seen = Seen(bus)
    data = b"instance bytes" * 100
    h = hash_bytes(data)
    liar_id, client_id = make_identity(ca, "liar"), make_identity(ca, "fetcher")
    liar = LyingServer(liar_id, ca.federation, {h: len(data)})
    await liar.start()
    try:
        with open_store(tmp_path / "s") as store:
            async with PeerClient(client_id, ca.federation, events=bus) as client:
                with pytest.raises(IntegrityError):
                    await client.fetch_into([peer_of(liar, liar_id)], h, len(data), store)
            assert not store.has(h)
    finally:
        await liar.stop()
    (alert,) = seen.alerts("tampered-blob")
    assert alert.peer == "liar" and h[:16] in alert.detail


async def test_refusals_at_the_transfer_server_and_served_requests(
    ca: FederationCA, tmp_path: Path
) -> None:
    bus = EventBus()
    seen = Seen(bus)
    server_id, member_id = make_identity(ca, "holder"), make_identity(ca, "member")
    other = create_federation("elsewhere")
    intruder = make_identity(other, "intruder")
    with (
        open_store(tmp_path / "s") as store,
        open_store(tmp_path / "f") as fresh,
        open_store(tmp_path / "g") as other_fresh,
    ):
        h = store.put(b"y" * 5000)
        async with serving(store, server_id, ca.federation, events=bus) as server:
            # a member fetches: one transfer out, named by its site id
            async with PeerClient(member_id, ca.federation) as client:
                await client.fetch_into([peer_of(server, server_id)], h, 5000, fresh)
            # a non-member (another federation's certificate) is refused at the handshake
            ctx = raw_client_context(ca.federation, intruder)
            host, port = server.address

            def intrude() -> bytes:
                """TLS 1.3: the client learns of the refusal when it first reads."""
                with socket.create_connection((host, port), 5) as raw, ctx.wrap_socket(raw) as tls:
                    tls.settimeout(5)
                    try:
                        tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                        return tls.recv(100)
                    except (ssl.SSLError, ConnectionError):
                        return b""

            assert await asyncio.to_thread(intrude) == b"", "a non-member was answered"
            # a client that reaches a server with another site's certificate refuses it
            async with PeerClient(member_id, ca.federation, events=bus) as client:
                wrong = Peer(make_identity(ca, "expected").site_id, "expected", host, port)
                with pytest.raises(PeerUnavailableError):
                    await client.fetch_into([wrong], h, 5000, other_fresh)
    out = [e for e in seen.events if isinstance(e, PeerTransfer)]
    # served twice: to the member's fetch, and to its second client (which then refused it)
    assert [(e.direction, e.peer, e.bytes) for e in out] == [
        ("out", member_id.site_id.hex(), 5000)
    ] * 2
    refused = seen.alerts("tls-refused")
    assert any(a.peer == "" and "TLS handshake refused" in a.detail for a in refused), refused
    assert any(a.peer == f"{host}:{port}" and "another site" in a.detail for a in refused), refused
