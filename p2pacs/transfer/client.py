"""The transfer client: fetch blobs from member sites, verify every byte, fall back on failure.

A blob is accepted only if its BLAKE3 matches the hash it was asked by; a holder that serves
wrong bytes, cuts the stream or is unreachable is skipped (and counted) and the next holder is
tried. Large blobs held by several sites are fetched as byte ranges from all of them at once,
assembled in order into the store's streaming writer, and verified as a whole. Many small blobs
(a study's instances) are fetched in batches, one request and one response stream per batch;
whatever a batch does not deliver intact is fetched again blob by blob from the other holders.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp

from dht.membership import Federation, Identity
from p2pacs import failpoints
from p2pacs.errors import (
    IntegrityError,
    InvalidDicomError,
    MembershipError,
    PeerUnavailableError,
    TransferError,
)
from p2pacs.events import EventBus, SecurityAlert, alert_limiter
from p2pacs.store import BlobStore, hash_bytes
from p2pacs.transfer.server import BATCH_FRAME, MAX_BATCH
from p2pacs.transfer.tls import client_context, member_site_id

__all__ = ["FetchReport", "Peer", "PeerClient"]

log = logging.getLogger(__name__)

SMALL_BLOB = 8 << 20  # bytes: fetched whole into memory and verified before storing
PUT_THREADS = 32  # threads that wait for durable writes; each blocks until its group commit
RANGE_SIZE = 4 << 20  # bytes per range when a large blob is split across holders
STREAM_QUEUE = 8  # pieces buffered between the network and the store's writer (bounded memory)
BATCH_BYTES = 64 << 20  # bytes asked for in one batch request
BATCH_STREAMS = 4  # batch requests in flight at once (over all peers)
BATCH_WINDOW = 16 << 20  # bytes of one batch received but not yet stored (bounded memory)

Holders = Sequence["Peer"]
StoreFn = Callable[[str, bytes], "Future[Any]"]  # (hash, verified bytes) -> durable write


@dataclass(frozen=True, slots=True)
class Peer:
    site_id: bytes
    name: str
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


@dataclass(slots=True)
class FetchReport:
    fetched: int = 0
    bytes: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    bad_peers: dict[str, int] = field(default_factory=dict)  # site name -> wrong blobs served


class _MemberResponse(aiohttp.ClientResponse):
    """Keeps the server's certificate, read when the response starts.

    aiohttp releases the connection as soon as a short body has arrived, so by the time the
    caller sees the response its transport (and TLS object) may be gone; the certificate is
    taken here, while the connection is still attached."""

    peer_cert: bytes | None = None

    async def start(self, connection: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
        transport = connection.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is not None:
            self.peer_cert = ssl_object.getpeercert(binary_form=True)
        return await super().start(connection)


def _chain(inner: Future[Any], outer: Future[Any]) -> None:
    """Settle ``outer`` as ``inner`` settled."""
    exc = inner.exception()
    if exc is not None:
        outer.set_exception(exc)
    else:
        outer.set_result(inner.result())


class PeerClient:
    """One connection pool to all peers; an async context manager."""

    def __init__(
        self,
        identity: Identity,
        federation: Federation,
        *,
        timeout: float = 30.0,
        connections_per_peer: int = 8,
        events: EventBus | None = None,
    ):
        self.identity = identity
        self.federation = federation
        self.timeout = timeout
        self.connections_per_peer = connections_per_peer
        self.events = events  # tampered blobs and peers refused at TLS (audit trail)
        self._refused = alert_limiter(events, "tls-refused") if events is not None else None
        self._session: aiohttp.ClientSession | None = None
        self.bad_peers: dict[str, int] = {}
        self.received: Counter[str] = Counter()  # blob bytes received, by peer site name
        self._unreachable: dict[str, float] = {}  # peer url -> monotonic time it last failed
        self._put_pool: ThreadPoolExecutor | None = None

    async def __aenter__(self) -> PeerClient:
        connector = aiohttp.TCPConnector(
            ssl=client_context(self.identity, self.federation),
            limit_per_host=self.connections_per_peer,
            limit=0,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            response_class=_MemberResponse,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.timeout),
        )
        # stores wait for an fsync'ed group commit; the default executor has only cpu+4 threads,
        # which would cap the blobs per commit (measured: 6 per fsync on 2 cores)
        self._put_pool = ThreadPoolExecutor(PUT_THREADS, thread_name_prefix="peer-put")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._put_pool is not None:
            self._put_pool.shutdown(wait=False, cancel_futures=True)
            self._put_pool = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise TransferError("the peer client is not open; use 'async with PeerClient(...)'")
        return self._session

    def _check_peer(self, resp: aiohttp.ClientResponse, peer: Peer) -> None:
        """The server's certificate must belong to the site we meant to reach."""
        actual = member_site_id(getattr(resp, "peer_cert", None), self.federation)
        if peer.site_id and actual != peer.site_id:
            raise MembershipError(f"{peer.url} answered with the certificate of another site")

    async def request_json(self, peer: Peer, method: str, path: str, json: Any = None) -> Any:
        try:
            async with self.session.request(method, peer.url + path, json=json) as resp:
                self._check_peer(resp, peer)
                if resp.status >= 400:
                    raise TransferError(f"{peer.name} answered {resp.status} to {method} {path}")
                return await resp.json()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnavailableError(f"{peer.name} ({peer.url}) unreachable: {exc}") from exc

    async def health(self, peer: Peer) -> dict[str, Any]:
        return dict(await self.request_json(peer, "GET", "/v1/health"))

    async def have(self, peer: Peer, hashes: Sequence[str]) -> set[str]:
        return set(await self.request_json(peer, "POST", "/v1/blobs/have", list(hashes)))

    async def fetch_blob(
        self, peer: Peer, h: str, *, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """The raw bytes ``[start, end)`` of a blob as they arrive (not verified here)."""
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            async with self.session.get(f"{peer.url}/v1/blobs/{h}", headers=headers) as resp:
                self._check_peer(resp, peer)
                if resp.status == 404:
                    raise PeerUnavailableError(f"{peer.name} does not hold blob {h[:16]}")
                if resp.status not in (200, 206):
                    raise TransferError(f"{peer.name} answered {resp.status} for blob {h[:16]}")
                async for piece in resp.content.iter_chunked(1 << 20):
                    self.received[peer.name] += len(piece)
                    yield piece
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnavailableError(f"{peer.name} failed while sending {h[:16]}: {exc}") from exc

    # --- verified fetches -----------------------------------------------------------------------

    async def fetch_into(
        self,
        holders: Sequence[Peer],
        h: str,
        size: int | None,
        blobs: BlobStore,
        progress: Callable[[int], None] | None = None,
        *,
        store: StoreFn | None = None,
    ) -> Peer | None:
        """Store blob ``h`` from the first holder that serves the right bytes; a small one
        through ``store`` (default: a bare blob in ``blobs``).

        Returns the peer that supplied it (None if it was already stored)."""
        if blobs.has(h):
            return None
        await failpoints.async_hit("transfer.receive", PeerUnavailableError)
        errors = []
        if size is not None and size > SMALL_BLOB and len(holders) > 1:
            try:
                await self._fetch_ranges(holders, h, size, blobs, progress)
                return holders[0]
            except (IntegrityError, PeerUnavailableError, TransferError) as exc:
                errors.append(f"ranged: {exc}")  # one holder lied or failed: go one by one
        for peer in holders:
            try:
                if size is None or size <= SMALL_BLOB:
                    data = b"".join([p async for p in self.fetch_blob(peer, h)])
                    await asyncio.wrap_future(
                        self._verify_then_store(peer.name, h, data, store or _bare(blobs))
                    )
                    if progress is not None:
                        progress(len(data))
                else:
                    await self._stream_into(self.fetch_blob(peer, h), h, blobs, progress)
                return peer
            except (IntegrityError, PeerUnavailableError, TransferError, MembershipError) as exc:
                self._failed(peer, exc)
                errors.append(str(exc))
        if any("do not match" in e or "hash to" in e for e in errors):
            raise IntegrityError(f"no holder served blob {h[:16]} intact: {'; '.join(errors)}")
        raise PeerUnavailableError(
            f"blob {h[:16]} unavailable: {'; '.join(errors) or 'no holders'}"
        )

    def _verify_then_store(self, source: str, h: str, data: bytes, store: StoreFn) -> Future[Any]:
        """Hash ``data`` once, on a worker thread (never on the event loop), and hand it to
        ``store`` only if it is blob ``h``; the future settles when the write is durable (or
        with ``IntegrityError``, or whatever the store refused it with)."""
        assert self._put_pool is not None, "use the client as an async context manager"
        out: Future[Any] = Future()

        def work() -> None:
            try:
                if hash_bytes(data) != h:
                    raise IntegrityError(f"{source} served bytes that do not match {h[:16]}")
                inner = store(h, data)
            except BaseException as exc:  # handed to the awaiting coroutine
                out.set_exception(exc)
                return
            inner.add_done_callback(lambda done: _chain(done, out))

        self._put_pool.submit(work)
        return out

    async def fetch_verified(self, holders: Sequence[Peer], h: str, blobs: BlobStore) -> bytes:
        """A small blob (manifest, catalogue) from the first holder that serves it intact,
        stored and returned: its bytes are hashed once, never read back or hashed again."""
        errors = []
        for peer in holders:
            try:
                data = b"".join([p async for p in self.fetch_blob(peer, h)])
                await asyncio.wrap_future(self._verify_then_store(peer.name, h, data, _bare(blobs)))
                return data
            except (IntegrityError, PeerUnavailableError, TransferError, MembershipError) as exc:
                self._failed(peer, exc)
                errors.append(str(exc))
        raise PeerUnavailableError(
            f"blob {h[:16]} unavailable: {'; '.join(errors) or 'no holders'}"
        )

    def _failed(self, peer: Peer, exc: Exception) -> None:
        """Note what a holder did wrong, so later fetches count it or try it last."""
        if isinstance(exc, IntegrityError):
            self.bad_peers[peer.name] = self.bad_peers.get(peer.name, 0) + 1
            log.warning("%s; trying another holder", exc)
            if self.events is not None:
                self.events.emit(SecurityAlert("tampered-blob", peer.name, str(exc)))
            return
        refused = isinstance(exc, MembershipError)
        refused = refused or isinstance(exc.__cause__, aiohttp.ClientSSLError)
        if self._refused is not None and refused:
            self._refused(f"{peer.host}:{peer.port}", str(exc))
        if isinstance(exc.__cause__, aiohttp.ClientConnectorError):
            self._unreachable[peer.url] = time.monotonic()
        log.info("%s; trying another holder", exc)

    async def _stream_into(
        self,
        pieces: AsyncIterator[bytes],
        h: str,
        blobs: BlobStore,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Feed an async byte stream to ``BlobStore.put_stream`` on a thread, memory bounded."""
        q: queue.Queue[bytes | None] = queue.Queue(STREAM_QUEUE)
        outcome: list[BaseException | None] = []
        ended = threading.Event()  # the writer has taken the end-of-stream marker

        def stream() -> Iterator[bytes]:
            while (piece := q.get()) is not None:
                yield piece
            ended.set()

        def writer() -> None:
            try:
                blobs.put_stream(stream(), h)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)
                # drain so the producer never blocks for ever; but a failure found after the
                # end marker (a hash mismatch) must not wait for a second one
                while not ended.is_set() and q.get() is not None:
                    pass

        loop = asyncio.get_running_loop()

        async def put(item: bytes | None) -> None:
            try:
                q.put_nowait(item)  # the common case: no thread hop per piece
            except queue.Full:
                await loop.run_in_executor(None, q.put, item)

        thread = threading.Thread(target=writer, name=f"put-{h[:8]}", daemon=True)
        thread.start()
        try:
            async for piece in pieces:
                if outcome:  # the writer gave up: stop downloading
                    break
                await put(piece)
                if progress is not None:
                    progress(len(piece))
        finally:
            await put(None)
            await asyncio.to_thread(thread.join)
        if outcome and outcome[0] is not None:
            raise outcome[0]

    async def _fetch_ranges(
        self,
        holders: Sequence[Peer],
        h: str,
        size: int,
        blobs: BlobStore,
        progress: Callable[[int], None] | None,
    ) -> None:
        ranges = [(s, min(s + RANGE_SIZE, size)) for s in range(0, size, RANGE_SIZE)]

        async def one(i: int, start: int, end: int) -> bytes:
            last: Exception | None = None
            for k in range(len(holders)):
                peer = holders[(i + k) % len(holders)]
                try:
                    data = b"".join(
                        [p async for p in self.fetch_blob(peer, h, start=start, end=end)]
                    )
                    if len(data) != end - start:
                        raise PeerUnavailableError(f"{peer.name} sent a short range of {h[:16]}")
                    return data
                except (PeerUnavailableError, TransferError, MembershipError) as exc:
                    last = exc
            raise PeerUnavailableError(f"range {start}-{end} of {h[:16]}: {last}")

        async def ordered() -> AsyncIterator[bytes]:
            window = max(2, 2 * len(holders))
            tasks: list[asyncio.Task[bytes]] = []
            try:
                for i, (start, end) in enumerate(ranges):
                    tasks.append(asyncio.create_task(one(i, start, end)))
                    if len(tasks) >= window:
                        yield await tasks.pop(0)
                while tasks:
                    yield await tasks.pop(0)
            finally:
                for t in tasks:
                    t.cancel()

        await self._stream_into(ordered(), h, blobs, progress)

    def _spread(self, holders: Sequence[Peer], i: int) -> list[Peer]:
        """Holders for the i-th blob of a batch: rotated so the load spreads over all of them,
        with those that refused a connection in the last minute tried last."""
        now = time.monotonic()
        down = {p.url for p in holders if now - self._unreachable.get(p.url, -1e9) < 60.0}
        up = [p for p in holders if p.url not in down]
        k = i % len(up) if up else 0
        return up[k:] + up[:k] + [p for p in holders if p.url in down]

    async def fetch_many(
        self,
        items: Sequence[tuple[str, int | None, Holders]],
        blobs: BlobStore,
        *,
        parallel: int = 16,
        progress: Callable[[int, int], None] | None = None,
        store: StoreFn | None = None,
    ) -> FetchReport:
        """Fetch many blobs; ``progress(bytes_done, bytes_total)``.

        Small blobs of known size go in batches to their first (rotated) holder; the rest, and
        whatever a batch failed to deliver, are fetched one by one, ``parallel`` at a time.
        ``store(hash, verified bytes)`` queues a batched blob's durable write (default: as a
        bare blob in ``blobs``); a caller can index an instance in the same transaction."""
        report = FetchReport()
        total = sum(size or 0 for _, size, _ in items)
        done = 0
        missing = set(blobs.missing(h for h, _, _ in items))

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        def fetched(size: int | None) -> None:
            report.fetched += 1
            report.bytes += size or 0

        batches: dict[Peer, list[tuple[str, int, list[Peer]]]] = {}
        singles: list[tuple[str, int | None, list[Peer]]] = []
        for i, (h, size, holders) in enumerate(items):
            if h not in missing:
                continue
            missing.discard(h)  # a hash listed twice is fetched once
            order = self._spread(holders, i)
            if size is not None and size <= SMALL_BLOB and order:
                batches.setdefault(order[0], []).append((h, size, order))
            else:
                singles.append((h, size, order))

        streams = asyncio.Semaphore(BATCH_STREAMS)

        async def batch(peer: Peer, group: list[tuple[str, int, list[Peer]]]) -> None:
            async with streams:
                outcome = await self._fetch_batch(
                    peer,
                    [(h, n) for h, n, _ in group],
                    store or _bare(blobs),
                )
            for h, size, order in group:
                exc = outcome.get(h)
                rest = [p for p in order if p != peer]
                if exc is None:
                    fetched(size)
                    advance(size)
                elif isinstance(exc, InvalidDicomError):  # intact but not archivable: final
                    report.failed[h] = str(exc)
                elif not isinstance(exc, IntegrityError):
                    singles.append((h, size, [*rest, peer]))  # asked again, last
                elif rest:
                    singles.append((h, size, rest))  # a liar is not asked again
                else:
                    report.failed[h] = f"no holder served blob {h[:16]} intact: {exc}"

        await asyncio.gather(
            *(
                batch(peer, part)
                for peer, group in batches.items()
                for part in _split(group, BATCH_BYTES)
            )
        )

        sem = asyncio.Semaphore(parallel)

        async def one(h: str, size: int | None, holders: list[Peer]) -> None:
            async with sem:
                try:
                    if await self.fetch_into(holders, h, size, blobs, advance, store=store):
                        fetched(size)
                except (
                    IntegrityError,
                    PeerUnavailableError,
                    TransferError,
                    InvalidDicomError,
                ) as exc:
                    report.failed[h] = str(exc)

        await asyncio.gather(*(one(h, size, holders) for h, size, holders in singles))
        report.bad_peers = dict(self.bad_peers)
        return report

    async def _fetch_batch(
        self, peer: Peer, wanted: list[tuple[str, int]], store: StoreFn
    ) -> dict[str, Exception | None]:
        """Fetch blobs in one request; for each hash, None if it is now stored, else why not."""
        outcome: dict[str, Exception | None] = {}
        stores: deque[tuple[str, int, asyncio.Future[Any]]] = deque()
        unsettled = 0  # bytes handed to the store whose write is not durable yet

        async def settle(limit: int) -> None:
            nonlocal unsettled
            while stores and unsettled > limit:
                h, size, fut = stores.popleft()
                unsettled -= size
                try:
                    await fut
                    outcome[h] = None
                except IntegrityError as exc:  # found by the worker that hashed it
                    self._failed(peer, exc)
                    outcome[h] = exc
                except Exception as exc:  # the store refused it (full disk...): tried again later
                    outcome[h] = exc

        try:
            await failpoints.async_hit("transfer.receive", PeerUnavailableError)
            async with self.session.post(
                f"{peer.url}/v1/blobs/batch", json=[h for h, _ in wanted]
            ) as resp:
                self._check_peer(resp, peer)
                if resp.status != 200:
                    raise TransferError(f"{peer.name} answered {resp.status} to a batch request")
                for h, _ in wanted:
                    digest, size = BATCH_FRAME.unpack(
                        await resp.content.readexactly(BATCH_FRAME.size)
                    )
                    if digest.hex() != h:
                        raise TransferError(f"{peer.name} answered a batch out of order")
                    if size < 0:
                        outcome[h] = PeerUnavailableError(f"{peer.name} does not hold {h[:16]}")
                        continue
                    if size > SMALL_BLOB:
                        raise TransferError(f"{peer.name} sent a {size}-byte blob in a batch")
                    data = await resp.content.readexactly(size)
                    self.received[peer.name] += size
                    queued = asyncio.wrap_future(self._verify_then_store(peer.name, h, data, store))
                    stores.append((h, size, queued))
                    unsettled += size
                    await settle(BATCH_WINDOW)
        except (
            aiohttp.ClientError,
            asyncio.IncompleteReadError,
            TimeoutError,
            OSError,
            TransferError,
            MembershipError,
        ) as exc:
            cut = PeerUnavailableError(f"{peer.name} broke off a batch: {exc}")
            cut.__cause__ = exc
            self._failed(peer, cut)
            for h, _ in wanted:
                outcome.setdefault(h, cut)
        finally:
            await settle(-1)
        return outcome


def _bare(blobs: BlobStore) -> StoreFn:
    """The default store: a verified blob written bare, with no index entry."""
    return lambda h, data: blobs.submit(data, hashed=h)


def _split(
    group: list[tuple[str, int, list[Peer]]], limit: int
) -> Iterator[list[tuple[str, int, list[Peer]]]]:
    """Cut one peer's blobs into batch requests of at most ``limit`` bytes and MAX_BATCH blobs."""
    part: list[tuple[str, int, list[Peer]]] = []
    size = 0
    for item in group:
        if part and (size + item[1] > limit or len(part) == MAX_BATCH):
            yield part
            part, size = [], 0
        part.append(item)
        size += item[1]
    if part:
        yield part
