"""TransferServer + PeerClient over real mutual TLS 1.3 on 127.0.0.1: fetches, ranges, refusals,
tampered holders, multi-holder fetches."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from dht.membership import FederationCA, create_federation
from p2pacs.errors import PeerUnavailableError
from p2pacs.store import BlobStore, hash_bytes
from p2pacs.store.layout import chunk_key, digest_of
from p2pacs.transfer import Peer, PeerClient, TransferServer
from p2pacs.transfer.client import SMALL_BLOB
from p2pacs.transfer.server import BATCH_FRAME, MAX_BATCH

from fed_helpers import (
    LyingServer,
    make_identity,
    open_store,
    peer_of,
    raw_client_context,
    serving,
)

pytestmark = pytest.mark.timeout(60)

BIG = 20 << 20  # bytes: above SMALL_BLOB, so fetch_into streams it into put_stream


@contextlib.asynccontextmanager
async def two_holders(
    ca: FederationCA,
    stores: tuple[BlobStore, BlobStore],
    on_corrupt: Callable[[str], None] | None = None,
) -> AsyncIterator[tuple[TransferServer, TransferServer, list[Peer], PeerClient]]:
    """Members "a" (reporting its rot to ``on_corrupt``) and "b" serving ``stores``, their
    peers in that order, and a client for member "fetcher"."""
    ida, idb, client_id = (make_identity(ca, n) for n in ("a", "b", "fetcher"))
    async with (
        serving(stores[0], ida, ca.federation, on_corrupt=on_corrupt) as sa,
        serving(stores[1], idb, ca.federation) as sb,
        PeerClient(client_id, ca.federation) as client,
    ):
        yield sa, sb, [peer_of(sa, ida), peer_of(sb, idb)], client


@contextlib.asynccontextmanager
async def liar_and_honest(
    ca: FederationCA, honest_store: BlobStore, lies: dict[str, int]
) -> AsyncIterator[tuple[LyingServer, list[Peer], PeerClient]]:
    """A member serving wrong bytes for the blobs (hash: size) of ``lies``, an honest one
    serving ``honest_store``, their peers in that order, and a client."""
    liar_id, good_id, client_id = (make_identity(ca, n) for n in ("liar", "honest", "fetcher"))
    liar = LyingServer(liar_id, ca.federation, lies)
    await liar.start()
    try:
        async with (
            serving(honest_store, good_id, ca.federation) as honest,
            PeerClient(client_id, ca.federation) as client,
        ):
            yield liar, [peer_of(liar, liar_id), peer_of(honest, good_id)], client
    finally:
        await liar.stop()


@pytest.fixture(scope="module")
def ca() -> FederationCA:
    return create_federation("transfer-test")


@pytest.fixture(scope="module")
def big() -> bytes:
    return os.urandom(BIG)


@pytest.fixture
def store_a(tmp_path: Path) -> Iterator[BlobStore]:
    with open_store(tmp_path / "a") as s:
        yield s


@pytest.fixture
def store_b(tmp_path: Path) -> Iterator[BlobStore]:
    with open_store(tmp_path / "b") as s:
        yield s


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[BlobStore]:
    with open_store(tmp_path / "fresh") as s:
        yield s


def test_big_blob_is_above_the_small_limit() -> None:
    assert BIG > SMALL_BLOB


async def test_member_fetches_small_and_chunked_blob(
    ca: FederationCA, store_a: BlobStore, fresh: BlobStore, big: bytes
) -> None:
    server_id, client_id = make_identity(ca, "holder"), make_identity(ca, "fetcher")
    small = b"small blob " * 1000
    hs, hb = store_a.put(small), store_a.put(big)
    assert store_a.info(hb).chunks == 20  # really chunked on the holder
    async with (
        serving(store_a, server_id, ca.federation) as server,
        PeerClient(client_id, ca.federation) as client,
    ):
        peer = peer_of(server, server_id)
        health = await client.health(peer)
        assert health["site_id"] == server_id.site_id.hex()
        assert await client.fetch_into([peer], hs, len(small), fresh) == peer
        done: list[int] = []
        assert await client.fetch_into([peer], hb, len(big), fresh, done.append) == peer
        assert sum(done) == len(big)
        assert len(done) > 1  # streamed in pieces, not one buffer
        assert await client.fetch_into([peer], hb, len(big), fresh) is None  # already here
    assert fresh.get(hs) == small
    assert fresh.get(hb) == big
    assert fresh.info(hb).chunks == 20
    assert server.stats["served"] == 2
    assert client.bad_peers == {}


async def test_range_head_and_have(ca: FederationCA, store_a: BlobStore) -> None:
    server_id, client_id = make_identity(ca, "holder"), make_identity(ca, "fetcher")
    data = os.urandom(3 << 20)  # three chunks: ranges cross chunk boundaries
    h = store_a.put(data)
    absent = hash_bytes(b"not stored")
    async with (
        serving(store_a, server_id, ca.federation) as server,
        PeerClient(client_id, ca.federation) as client,
    ):
        peer = peer_of(server, server_id)
        url = f"{peer.url}/v1/blobs/{h}"
        session = client.session
        start, end = (1 << 20) - 10, (2 << 20) + 10
        async with session.get(url, headers={"Range": f"bytes={start}-{end - 1}"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
            assert await resp.read() == data[start:end]
        async with session.get(url, headers={"Range": "bytes=-100"}) as resp:
            assert resp.status == 206
            assert await resp.read() == data[-100:]
        async with session.get(url, headers={"Range": f"bytes={len(data)}-"}) as resp:
            assert resp.status == 416
            assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
        async with session.head(url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(data))
            assert resp.headers["Accept-Ranges"] == "bytes"
            assert await resp.read() == b""
        async with session.get(f"{peer.url}/v1/blobs/{absent}") as resp:
            assert resp.status == 404
        async with session.get(f"{peer.url}/v1/blobs/NOT-A-HASH") as resp:
            assert resp.status == 400
        pieces = [p async for p in client.fetch_blob(peer, h, start=5, end=105)]
        assert b"".join(pieces) == data[5:105]
        assert await client.have(peer, [h, absent]) == {h}
        async with session.post(f"{peer.url}/v1/blobs/have", data=b"not json") as resp:
            assert resp.status == 400


async def _handshake_refused(port: int, ctx: ssl.SSLContext) -> str:
    """Connect with ``ctx``; the server must refuse before any HTTP answer is possible.

    TLS 1.3: the client's side of the handshake ends before the server has checked the client
    certificate, so the refusal shows on the first read: a TLS alert (or, when the alert is
    lost in the close, the connection ends without one HTTP byte). Returns what was seen."""
    loop = asyncio.get_running_loop()

    def attempt() -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            try:
                with ctx.wrap_socket(raw) as tls:
                    tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                    answer = tls.recv(4096)
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
                return f"{type(exc).__name__}: {exc}"
            assert answer == b"", f"server answered a non-member: {answer[:80]!r}"
            return "closed without a response"

    return await loop.run_in_executor(None, attempt)


async def test_non_members_refused_at_handshake(
    ca: FederationCA, store_a: BlobStore, fresh: BlobStore
) -> None:
    server_id = make_identity(ca, "holder")
    other = create_federation("another")
    outsider = make_identity(other, "outsider")
    h = store_a.put(b"patient data")
    async with serving(store_a, server_id, ca.federation) as server:
        port = server.address[1]
        # trusts our CA (so the client side is happy) but presents a foreign certificate
        seen = await _handshake_refused(port, raw_client_context(ca.federation, outsider))
        print("foreign certificate:", seen)
        seen = await _handshake_refused(port, raw_client_context(ca.federation, None))
        print("no certificate:", seen)
        # PeerClient built on the other federation: no HTTP response, a transfer error
        async with PeerClient(outsider, other.federation) as client:
            with pytest.raises(PeerUnavailableError):
                await client.fetch_into([peer_of(server, server_id)], h, 12, fresh)
        # and over aiohttp with a foreign cert that trusts our CA: a client error, no status
        connector = aiohttp.TCPConnector(ssl=raw_client_context(ca.federation, outsider))
        async with aiohttp.ClientSession(connector=connector) as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"https://127.0.0.1:{port}/v1/blobs/{h}") as resp:
                    raise AssertionError(f"got HTTP {resp.status}")
        assert server.stats["served"] == 0
        assert not fresh.has(h)
        # a member still gets through afterwards
        async with PeerClient(make_identity(ca, "member"), ca.federation) as client:
            assert await client.have(peer_of(server, server_id), [h]) == {h}


async def test_client_checks_the_server_is_the_site_it_meant(
    ca: FederationCA, store_a: BlobStore, fresh: BlobStore
) -> None:
    server_id, client_id = make_identity(ca, "holder"), make_identity(ca, "fetcher")
    h = store_a.put(b"x" * 1000)
    async with (
        serving(store_a, server_id, ca.federation) as server,
        PeerClient(client_id, ca.federation) as client,
    ):
        host, port = server.address
        impostor = Peer(make_identity(ca, "someone-else").site_id, "someone-else", host, port)
        with pytest.raises(PeerUnavailableError):
            await client.fetch_into([impostor], h, 1000, fresh)
    assert not fresh.has(h)


def _corrupt_chunk(blobs: BlobStore, h: str, n: int) -> None:
    """Flip bytes of a stored chunk behind the store's back (disk rot), straight through LMDB."""
    key = chunk_key(digest_of(h), n)

    def job(txn: object) -> None:
        chunk = bytearray(txn.get(key, db=blobs._chunks))  # type: ignore[attr-defined]
        chunk[100:108] = b"ROTTEN!!"
        txn.put(key, bytes(chunk), db=blobs._chunks)  # type: ignore[attr-defined]

    blobs._db.write(job)


async def test_rotten_holder_is_cut_off_and_honest_holder_used(
    ca: FederationCA, store_a: BlobStore, store_b: BlobStore, fresh: BlobStore, big: bytes
) -> None:
    small = os.urandom(300_000)
    for s in (store_a, store_b):
        s.put(small)
        s.put(big)
    hs, hb = hash_bytes(small), hash_bytes(big)
    _corrupt_chunk(store_a, hs, 0)
    _corrupt_chunk(store_a, hb, 7)
    reported: list[str] = []
    async with two_holders(ca, (store_a, store_b), reported.append) as (rotten, _, holders, client):
        assert await client.fetch_into(holders, hs, len(small), fresh) == holders[1]
        # one holder at a time: the rotten server cuts the stream before its last byte
        assert await client.fetch_into(holders[:1] + holders[1:], hb, None, fresh) == holders[1]
    assert fresh.get(hs) == small
    assert fresh.get(hb) == big
    assert sorted(reported) == sorted([hs, hb])
    assert rotten.stats["corrupt"] == 2
    assert fresh.verify() == []


async def test_lying_member_detected_skipped_and_counted(
    ca: FederationCA, store_b: BlobStore, fresh: BlobStore, big: bytes
) -> None:
    small = os.urandom(100_000)
    hs, hb = store_b.put(small), store_b.put(big)
    lies = {hs: len(small), hb: len(big)}
    async with liar_and_honest(ca, store_b, lies) as (liar, holders, client):
        assert await client.fetch_into(holders, hs, len(small), fresh) == holders[1]
        assert client.bad_peers == {"liar": 1}
        # large: the ranged fetch fails its whole-blob check, then holders are tried in turn
        assert await client.fetch_into(holders, hb, len(big), fresh) == holders[1]
        assert client.bad_peers == {"liar": 2}
        # with the liar alone: nothing stored, an integrity failure reported
        other = os.urandom(5000)
        ho = hash_bytes(other)
        liar.sizes[ho] = len(other)
        report = await client.fetch_many([(ho, len(other), holders[:1])], fresh)
        assert ho in report.failed and "intact" in report.failed[ho]
        assert report.bad_peers == {"liar": 3}
    assert fresh.get(hs) == small
    assert fresh.get(hb) == big
    assert not fresh.has(ho)
    assert liar.served >= 4


async def test_fetch_many_two_holders_and_a_dead_one(
    ca: FederationCA, store_a: BlobStore, store_b: BlobStore, fresh: BlobStore
) -> None:
    ids = [make_identity(ca, n) for n in ("a", "b", "dead", "fetcher")]
    blobs = [os.urandom(50_000 + i) for i in range(40)]
    for i, data in enumerate(blobs):
        (store_a if i % 2 else store_b).put(data)
        if i % 4 == 0:
            store_a.put(data)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = Peer(ids[2].site_id, "dead", "127.0.0.1", dead_port)
    seen: list[tuple[int, int]] = []
    async with (
        serving(store_a, ids[0], ca.federation) as sa,
        serving(store_b, ids[1], ca.federation) as sb,
        PeerClient(ids[3], ca.federation, timeout=5) as client,
    ):
        holders = [dead, peer_of(sa, ids[0]), peer_of(sb, ids[1])]
        items = [(hash_bytes(d), len(d), holders) for d in blobs]
        missing = hash_bytes(b"held by nobody")
        report = await client.fetch_many(
            [*items, (missing, 10, holders)],
            fresh,
            parallel=4,
            progress=lambda done, total: seen.append((done, total)),
        )
        assert sa.stats["served"] + sb.stats["served"] == len(blobs)
        assert sa.stats["served"] > 0 and sb.stats["served"] > 0
    assert report.fetched == len(blobs)
    assert report.bytes == sum(len(d) for d in blobs)
    assert list(report.failed) == [missing]
    assert report.bad_peers == {}  # unreachable or not holding is not lying
    assert seen[-1] == (sum(len(d) for d in blobs), sum(len(d) for d in blobs) + 10)
    for data in blobs:
        assert fresh.get(hash_bytes(data)) == data


async def test_ranged_fetch_from_two_servers(
    ca: FederationCA, store_a: BlobStore, store_b: BlobStore, fresh: BlobStore, big: bytes
) -> None:
    h = store_a.put(big)
    store_b.put(big)
    async with two_holders(ca, (store_a, store_b)) as (sa, sb, holders, client):
        report = await client.fetch_many([(h, len(big), holders)], fresh)
        assert report.fetched == 1 and not report.failed
        # both servers sent part of it, as ranges (a range is not a whole-blob "served")
        assert sa.stats["bytes"] > 0 and sb.stats["bytes"] > 0
        assert sa.stats["bytes"] + sb.stats["bytes"] == len(big)
    assert fresh.get(h) == big


async def test_many_small_blobs_move_in_one_batch(
    ca: FederationCA, store_a: BlobStore, fresh: BlobStore
) -> None:
    server_id, client_id = make_identity(ca, "holder"), make_identity(ca, "fetcher")
    blobs = [os.urandom(20_000 + i) for i in range(60)]
    items = [(store_a.put(d), len(d)) for d in blobs]
    seen: list[tuple[int, int]] = []
    async with (
        serving(store_a, server_id, ca.federation) as server,
        PeerClient(client_id, ca.federation) as client,
    ):
        peer = peer_of(server, server_id)
        report = await client.fetch_many(
            [(h, n, [peer]) for h, n in items],
            fresh,
            progress=lambda done, total: seen.append((done, total)),
        )
    assert server.stats["batches"] == 1  # one request for all sixty
    assert server.stats["served"] == len(blobs)
    assert report.fetched == len(blobs) and not report.failed
    assert report.bytes == sum(len(d) for d in blobs)
    assert seen[-1] == (report.bytes, report.bytes)
    for data in blobs:
        assert fresh.get(hash_bytes(data)) == data


async def test_batch_gaps_and_rot_are_fetched_from_the_other_holder(
    ca: FederationCA, store_a: BlobStore, store_b: BlobStore, fresh: BlobStore
) -> None:
    blobs = [os.urandom(30_000 + i) for i in range(12)]
    hashes = [store_b.put(d) for d in blobs]
    for i, data in enumerate(blobs):
        if i != 2:  # a lacks blob 2
            store_a.put(data)
    _corrupt_chunk(store_a, hashes[6], 0)  # and blob 6 has rotted at a
    reported: list[str] = []
    async with two_holders(ca, (store_a, store_b), reported.append) as (sa, sb, holders, client):
        # even-numbered items are asked of a first, odd-numbered of b
        report = await client.fetch_many(
            [(h, len(d), holders) for h, d in zip(hashes, blobs, strict=True)], fresh
        )
    assert report.fetched == len(blobs) and not report.failed
    assert report.bad_peers == {}  # not holding, or rot found by the holder itself, is no lie
    assert reported == [hashes[6]]
    assert sa.stats["corrupt"] == 1
    assert sa.stats["batches"] == 1 and sb.stats["batches"] == 1
    assert sa.stats["served"] == 2  # items 0 and 4, before the rotten 6 cut the stream
    assert fresh.verify() == []
    for h, data in zip(hashes, blobs, strict=True):
        assert fresh.get(h) == data


async def test_lying_member_in_a_batch_is_bypassed_and_counted(
    ca: FederationCA, store_b: BlobStore, fresh: BlobStore
) -> None:
    blobs = [os.urandom(10_000 + i) for i in range(6)]
    hashes = [store_b.put(d) for d in blobs]
    lies = {h: len(d) for h, d in zip(hashes, blobs, strict=True)}
    async with liar_and_honest(ca, store_b, lies) as (liar, holders, client):
        report = await client.fetch_many(
            [(h, len(d), holders) for h, d in zip(hashes, blobs, strict=True)], fresh
        )
    assert report.fetched == len(blobs) and not report.failed
    assert report.bad_peers == {"liar": 3}  # items 0, 2, 4 were asked of the liar first
    assert liar.served == 3  # and it was not asked again
    for h, data in zip(hashes, blobs, strict=True):
        assert fresh.get(h) == data


async def test_batch_requests_are_checked_and_answered_in_frames(
    ca: FederationCA, store_a: BlobStore
) -> None:
    server_id, client_id = make_identity(ca, "holder"), make_identity(ca, "fetcher")
    data = os.urandom(5000)
    h, absent = store_a.put(data), hash_bytes(b"not here")
    async with (
        serving(store_a, server_id, ca.federation) as server,
        PeerClient(client_id, ca.federation) as client,
    ):
        url = peer_of(server, server_id).url + "/v1/blobs/batch"
        for bad in (["xyz"], [h] * (MAX_BATCH + 1), {"not": "a list"}):
            async with client.session.post(url, json=bad) as resp:
                assert resp.status == 400, bad
        async with client.session.post(url, data=b"not json") as resp:
            assert resp.status == 400
        async with client.session.post(url, json=[h, absent, h]) as resp:
            assert resp.status == 200
            body = await resp.read()
    frames = []
    while body:
        digest, size = BATCH_FRAME.unpack(body[: BATCH_FRAME.size])
        body = body[BATCH_FRAME.size :]
        frames.append((digest.hex(), size, body[: max(size, 0)]))
        body = body[max(size, 0) :]
    assert frames == [(h, len(data), data), (absent, -1, b""), (h, len(data), data)]
