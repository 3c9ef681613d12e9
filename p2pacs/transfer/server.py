"""The transfer server: members fetch blobs (whole or by range) over mutual TLS.

Blobs are streamed chunk by chunk from LMDB, never held whole in memory. A full-blob answer is
hashed as it is sent; if the stored bytes no longer match (disk rot), the connection is cut
before the last byte so the client can never accept them, and the blob is reported for repair.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

import blake3
from aiohttp import web

from dht.membership import Federation, Identity
from p2pacs import __version__
from p2pacs.errors import BlobNotFoundError, CorruptBlobError, MembershipError, TransferError
from p2pacs.store import BlobStore
from p2pacs.transfer.tls import peer_site_id, server_context

__all__ = ["PEER_SITE_ID", "TransferServer"]

log = logging.getLogger(__name__)

PEER_SITE_ID = web.RequestKey("peer_site_id", bytes)  # the verified site_id of the TLS client

_HASH = re.compile(r"^[0-9a-f]{64}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
MAX_HAVE = 10_000  # hashes per /v1/blobs/have request
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` -> [start, end) or None when unsatisfiable (RFC 9110 14.1.2)."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # suffix range: the last N bytes
        n = int(m.group(2))
        return (max(size - n, 0), size) if n > 0 and size > 0 else None
    start = int(m.group(1))
    end = int(m.group(2)) + 1 if m.group(2) else size
    if start >= size or end <= start:
        return None
    return start, min(end, size)


class TransferServer:
    def __init__(
        self,
        blobs: BlobStore,
        identity: Identity,
        federation: Federation,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        extra_routes: Callable[[web.Application], None] | None = None,
        on_corrupt: Callable[[str], None] | None = None,
    ):
        self.blobs = blobs
        self.identity = identity
        self.federation = federation
        self.host = host
        self.port = port
        self.on_corrupt = on_corrupt
        self.app = web.Application(middlewares=[self._member_only], client_max_size=4 << 20)
        self.app.router.add_get("/v1/health", self._health)
        self.app.router.add_get("/v1/blobs/{hash}", self._blob)  # also answers HEAD
        self.app.router.add_post("/v1/blobs/have", self._have)
        if extra_routes is not None:
            extra_routes(self.app)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.stats = {"served": 0, "bytes": 0, "corrupt": 0}

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner,
            self.host,
            self.port,
            ssl_context=server_context(self.identity, self.federation),
            reuse_address=True,
        )
        try:
            await self._site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise TransferError(
                f"cannot listen on {self.host}:{self.port} for peer transfer: {exc.strerror}"
            ) from exc

    @property
    def address(self) -> tuple[str, int]:
        assert self._site is not None and self._site._server is not None, "server not started"
        sockets = getattr(self._site._server, "sockets", None) or []
        host, port = sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- middleware and routes ------------------------------------------------------------------

    @web.middleware
    async def _member_only(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The TLS handshake already required a CA-issued certificate; record who it is."""
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        try:
            request[PEER_SITE_ID] = peer_site_id(ssl_object, self.federation)
        except MembershipError as exc:
            raise web.HTTPForbidden(text=str(exc)) from None
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "site_id": self.identity.site_id.hex(),
                "name": self.identity.name,
                "version": __version__,
            }
        )

    async def _have(self, request: web.Request) -> web.Response:
        try:
            hashes = [str(h) for h in await request.json()][:MAX_HAVE]
        except (ValueError, TypeError):
            raise web.HTTPBadRequest(text="expected a JSON list of blob hashes") from None
        missing = set(await asyncio.to_thread(self.blobs.missing, hashes))
        return web.json_response([h for h in hashes if h not in missing])

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        h = request.match_info["hash"]
        if not _HASH.match(h):
            raise web.HTTPBadRequest(text="a blob is addressed by 64 lowercase hex characters")
        try:
            size = self.blobs.info(h).size
        except BlobNotFoundError:
            raise web.HTTPNotFound(text=f"blob {h} is not held here") from None
        start, end, status = 0, size, 200
        if "Range" in request.headers:
            rng = _parse_range(request.headers["Range"], size)
            if rng is None:
                raise web.HTTPRequestRangeNotSatisfiable(
                    headers={"Content-Range": f"bytes */{size}"}
                )
            start, end, status = rng[0], rng[1], 206
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        whole = start == 0 and end == size
        hasher = blake3.blake3() if whole else None
        sent = 0
        try:
            for piece in self.blobs.read_range(h, start, end):
                if hasher is not None:
                    hasher.update(piece)
                    if sent + len(piece) == end - start and hasher.hexdigest() != h:
                        raise CorruptBlobError(f"blob {h} fails its hash check")
                await response.write(piece)
                sent += len(piece)
        except CorruptBlobError as exc:
            self.stats["corrupt"] += 1
            log.error("not serving %s: %s", h[:16], exc)
            if self.on_corrupt is not None:
                self.on_corrupt(h)
            if request.transport is not None:
                request.transport.close()  # cut short: the client sees a truncated body
            return response
        self.stats["served"] += 1
        self.stats["bytes"] += sent
        await response.write_eof()
        return response
