"""Helpers for the federation building-block tests (imported by basename: ``from fed_helpers``).

Everything is real: identities from the federation CA, LMDB stores in a temporary folder,
TransferServers on 127.0.0.1 port 0 with mutual TLS 1.3.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dht.membership import Federation, FederationCA, Identity, issue_site_certificate
from p2pacs.store import BlobStore
from p2pacs.store.db import SiteDB
from p2pacs.transfer import Peer, TransferServer
from p2pacs.transfer.server import BATCH_FRAME
from p2pacs.transfer.tls import server_context

__all__ = [
    "LyingServer",
    "make_identity",
    "open_store",
    "peer_of",
    "raw_client_context",
    "serving",
]


def make_identity(ca: FederationCA, name: str) -> Identity:
    key = Ed25519PrivateKey.generate()
    return Identity(key=key, certificate=issue_site_certificate(ca, key.public_key(), name))


@contextlib.contextmanager
def open_store(path: Path) -> Iterator[BlobStore]:
    """A real LMDB BlobStore (fsync off: tests need no power-cut durability)."""
    db = SiteDB(path, map_size=1 << 30, sync=False)
    try:
        yield BlobStore(db)
    finally:
        db.close()


@contextlib.asynccontextmanager
async def serving(
    blobs: BlobStore, identity: Identity, federation: Federation, **kwargs: object
) -> AsyncIterator[TransferServer]:
    server = TransferServer(blobs, identity, federation, **kwargs)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def peer_of(server: TransferServer | LyingServer, identity: Identity) -> Peer:
    host, port = server.address
    return Peer(identity.site_id, identity.name, host, port)


def raw_client_context(trust: Federation, cert_of: Identity | None) -> ssl.SSLContext:
    """A TLS 1.3 client context trusting ``trust``'s CA, presenting ``cert_of`` (or nothing)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(
        cadata=trust.ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    if cert_of is not None:
        pem = cert_of.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ) + cert_of.certificate.public_bytes(serialization.Encoding.PEM)
        fd, name = tempfile.mkstemp(suffix=".pem")
        try:
            os.write(fd, pem)
            os.close(fd)
            ctx.load_cert_chain(name)
        finally:
            Path(name).unlink(missing_ok=True)
    return ctx


class LyingServer:
    """A member (valid certificate, real mutual TLS) that serves the wrong bytes for every blob."""

    def __init__(self, identity: Identity, federation: Federation, sizes: dict[str, int]):
        self.identity = identity
        self.federation = federation
        self.sizes = sizes
        self.served = 0
        self.app = web.Application()
        self.app.router.add_get("/v1/blobs/{hash}", self._blob)
        self.app.router.add_post("/v1/blobs/batch", self._batch)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        size = self.sizes.get(request.match_info["hash"])
        if size is None:
            raise web.HTTPNotFound()
        self.served += 1
        start, end, status = 0, size, 200
        rng = request.headers.get("Range")
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start, end, status = int(a), int(b) + 1 if b else size, 206
        return web.Response(body=b"\x5a" * (end - start), status=status)

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        """Right frames (digest, size), wrong bytes."""
        body = b""
        for h in await request.json():
            size = self.sizes.get(h, -1)
            body += BATCH_FRAME.pack(bytes.fromhex(h), size)
            if size >= 0:
                self.served += 1
                body += b"\x5a" * size
        return web.Response(body=body)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner, "127.0.0.1", 0, ssl_context=server_context(self.identity, self.federation)
        )
        await self._site.start()

    @property
    def address(self) -> tuple[str, int]:
        assert self._site is not None and self._site._server is not None
        sockets = getattr(self._site._server, "sockets", None) or []
        host, port = sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
