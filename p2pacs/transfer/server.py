"""The transfer server: members fetch blobs (whole, by range, or many per request) over mTLS.

Blobs are streamed chunk by chunk from LMDB, never held whole in memory. A full-blob answer is
hashed as it is sent; if the stored bytes no longer match (disk rot), the connection is cut
before the last byte so the client can never accept them, and the blob is reported for repair.

``POST /v1/blobs/batch`` answers a list of hashes with one stream of frames, each a header
(``BATCH_FRAME``: raw digest, size or -1 when not held here) followed by the blob's bytes: a
study of small instances moves as one response instead of one request per instance, which
costs the server and the client more CPU than the bytes themselves (measured: bench/transfer.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from collections import Counter
from collections.abc import Awaitable, Callable

import blake3
from aiohttp import web

from dht.membership import Federation, Identity
from p2pacs import __version__, failpoints
from p2pacs.errors import (
    BlobNotFoundError,
    CorruptBlobError,
    MembershipError,
    ObjectStoreUnavailableError,
    TransferError,
)
from p2pacs.events import EventBus, PeerTransfer, alert_limiter
from p2pacs.store import BlobStore
from p2pacs.transfer.tls import peer_site_id, server_context

__all__ = ["BATCH_FRAME", "MAX_BATCH", "PEER_SITE_ID", "TransferServer"]

log = logging.getLogger(__name__)

PEER_SITE_ID = web.RequestKey("peer_site_id", bytes)  # the verified site_id of the TLS client

_HASH = re.compile(r"^[0-9a-f]{64}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
MAX_HAVE = 10_000  # hashes per /v1/blobs/have request
MAX_BATCH = 1024  # hashes per /v1/blobs/batch request
BATCH_FRAME = struct.Struct(">32sq")  # raw BLAKE3 digest, size in bytes (-1: not held here)
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
        events: EventBus | None = None,
    ):
        self.blobs = blobs
        self.identity = identity
        self.federation = federation
        self.host = host
        self.port = port
        self.on_corrupt = on_corrupt
        self.events = events  # transfers out and refused non-members, for metrics and audit
        self._refused = alert_limiter(events, "tls-refused") if events is not None else None
        self.app = web.Application(middlewares=[self._member_only], client_max_size=4 << 20)
        self.app.router.add_get("/v1/health", self._health)
        self.app.router.add_get("/v1/blobs/{hash}", self._blob)  # also answers HEAD
        self.app.router.add_post("/v1/blobs/have", self._have)
        self.app.router.add_post("/v1/blobs/batch", self._batch)
        if extra_routes is not None:
            extra_routes(self.app)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.stats = {"served": 0, "bytes": 0, "corrupt": 0, "batches": 0}
        self.sent: Counter[bytes] = Counter()  # blob bytes served, by caller site_id (members)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner,
            self.host,
            self.port,
            ssl_context=server_context(
                self.identity, self.federation, self._handshake_refused if self.events else None
            ),
            reuse_address=True,
        )
        try:
            await self._site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise TransferError(
                f"cannot listen on {self.host}:{self.port} for peer transfer: {exc.strerror}"
            ) from exc

    def _handshake_refused(self, why: str) -> None:
        if self._refused is not None:
            self._refused("", why)  # the address is not known at that layer

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
            if self._refused is not None:
                self._refused(request.remote or "", str(exc))
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

    @staticmethod
    async def _failpoint() -> None:
        try:
            await failpoints.async_hit("transfer.send")
        except failpoints.FailpointError as exc:
            raise web.HTTPServiceUnavailable(text=str(exc)) from None

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        await self._failpoint()
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
        if await self._send(request, response, h, (start, end), size):
            await response.write_eof()
            self._served(request, end - start)
        return response

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        await self._failpoint()
        try:
            hashes = [str(h) for h in await request.json()]
        except (ValueError, TypeError):
            raise web.HTTPBadRequest(text="expected a JSON list of blob hashes") from None
        if len(hashes) > MAX_BATCH or not all(_HASH.match(h) for h in hashes):
            raise web.HTTPBadRequest(
                text=f"expected at most {MAX_BATCH} blob hashes of 64 lowercase hex characters"
            )
        self.stats["batches"] += 1
        sizes = await asyncio.to_thread(self.blobs.sizes, hashes)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = sum(BATCH_FRAME.size + sizes.get(h, 0) for h in hashes)
        await response.prepare(request)
        for h in hashes:
            size = sizes.get(h, -1)
            await response.write(BATCH_FRAME.pack(bytes.fromhex(h), size))
            if size >= 0 and not await self._send(request, response, h, (0, size), size):
                return response
        await response.write_eof()
        self._served(request, sum(n for n in sizes.values() if n > 0))
        return response

    def _served(self, request: web.Request, sent: int) -> None:
        """One transfer out per request (never per blob: a batch may hold a thousand)."""
        if self.events is not None:
            peer = request[PEER_SITE_ID].hex()
            self.events.emit(PeerTransfer("out", peer, sent, "serve"))

    async def _send(
        self,
        request: web.Request,
        response: web.StreamResponse,
        h: str,
        span: tuple[int, int],
        size: int,
    ) -> bool:
        """Stream bytes ``[start, end)`` of a blob of ``size`` bytes; False if it was cut short
        (corrupt or gone). A whole blob is checked against its hash on the way out."""
        start, end = span
        hasher = blake3.blake3() if span == (0, size) else None
        sent = 0
        try:
            pieces = self.blobs.read_range(h, start, end)
            # bytes in an object store arrive over the network: read them on a worker thread
            remote = self.blobs.info(h).in_objects
            while True:
                piece = (
                    await asyncio.to_thread(next, pieces, None) if remote else next(pieces, None)
                )
                if piece is None:
                    break
                if hasher is not None:
                    hasher.update(piece)
                    if sent + len(piece) == end - start and hasher.hexdigest() != h:
                        raise CorruptBlobError(f"blob {h} fails its hash check")
                await response.write(piece)
                sent += len(piece)
        except (CorruptBlobError, BlobNotFoundError, ObjectStoreUnavailableError) as exc:
            log.error("not serving %s: %s", h[:16], exc)
            if isinstance(exc, CorruptBlobError):
                self.stats["corrupt"] += 1
                if self.on_corrupt is not None:
                    self.on_corrupt(h)
            if request.transport is not None:
                request.transport.close()  # cut short: the client sees a truncated body
            return False
        self.stats["served"] += 1
        self.stats["bytes"] += sent
        self.sent[request.get(PEER_SITE_ID) or b""] += sent
        return True
