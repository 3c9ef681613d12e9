"""BlobStore on real LMDB: addressing, chunking, ranges, threads, asyncio, full map."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import lmdb
import pytest

from p2pacs.errors import (
    BlobNotFoundError,
    CorruptBlobError,
    IntegrityError,
    StoreError,
    StoreFullError,
)
from p2pacs.store import BlobStore, SiteDB, hash_bytes

CHUNK = 64 * 1024  # small chunks so multi-chunk paths run on small test data


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlobStore]:
    db = SiteDB(tmp_path / "db")
    try:
        yield BlobStore(db, chunk_size=CHUNK)
    finally:
        db.close()


def test_put_returns_blake3_and_dedups(store: BlobStore) -> None:
    data = os.urandom(1000)
    h = store.put(data)
    assert h == blake3.blake3(data).hexdigest()
    assert store.put(data) == h
    assert store.totals() == (1, 1000)
    assert store.get(h) == data


def test_empty_blob(store: BlobStore) -> None:
    h = store.put(b"")
    assert store.get(h) == b""
    assert store.info(h).size == 0


@pytest.mark.parametrize("size", [CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17])
def test_chunked_blob_ranges(store: BlobStore, size: int) -> None:
    data = os.urandom(size)
    h = store.put(data)
    assert store.info(h).chunks == max(1, -(-size // CHUNK))
    rng = random.Random(size)
    for _ in range(20):
        a = rng.randrange(0, size)
        b = rng.randrange(a, size + 1)
        assert b"".join(store.read_range(h, a, b)) == data[a:b]
    pieces = list(store.read_range(h))
    assert all(len(p) <= CHUNK for p in pieces)
    assert b"".join(pieces) == data


def test_bad_hashes_and_ranges(store: BlobStore) -> None:
    with pytest.raises(BlobNotFoundError):
        store.get("00" * 32)
    with pytest.raises(BlobNotFoundError, match="not a BLAKE3 hash"):
        store.get("../etc/passwd")
    h = store.put(b"abc")
    with pytest.raises(StoreError, match="invalid range"):
        list(store.read_range(h, 2, 1))
    assert not store.has("zz")


def test_put_stream_verifies_and_discards_mismatch(store: BlobStore) -> None:
    data = os.urandom(3 * CHUNK + 5)
    pieces = [data[i : i + 10_000] for i in range(0, len(data), 10_000)]
    h = store.put_stream(iter(pieces), hash_bytes(data))
    assert store.get(h) == data
    other = os.urandom(2 * CHUNK)
    with pytest.raises(IntegrityError):
        store.put_stream(iter([other]), hash_bytes(b"something else"))
    assert not store.has(hash_bytes(b"something else"))
    assert store.sweep() == 0  # the mismatch left no orphan chunks


def test_interrupted_stream_leaves_nothing_visible(store: BlobStore) -> None:
    data = os.urandom(4 * CHUNK)

    def pieces() -> Iterator[bytes]:
        yield data[: 2 * CHUNK]
        raise ConnectionError("peer went away")

    with pytest.raises(ConnectionError):
        store.put_stream(pieces(), hash_bytes(data))
    assert not store.has(hash_bytes(data))
    assert store.sweep() == 0
    assert store.put_stream(iter([data]), hash_bytes(data)) == hash_bytes(data)


def test_verify_detects_corruption(tmp_path: Path) -> None:
    db = SiteDB(tmp_path / "db")
    store = BlobStore(db, chunk_size=CHUNK)
    good = store.put(os.urandom(3 * CHUNK))
    bad = store.put(os.urandom(2 * CHUNK))
    key = bytes.fromhex(bad) + (1).to_bytes(4, "big")
    chunks = db.db("chunks")

    def flip(txn: lmdb.Transaction) -> None:
        raw = bytearray(txn.get(key, db=chunks))
        raw[10] ^= 0xFF
        txn.put(key, bytes(raw), db=chunks)

    db.write(flip)
    assert store.verify() == [bad]
    assert store.verify_blob(good)
    with pytest.raises(CorruptBlobError):
        store.get(bad)
    assert store.delete(bad)
    assert not store.has(bad)
    db.close()


def test_many_threads(store: BlobStore) -> None:
    blobs = [os.urandom(random.Random(i).randrange(1, 3 * CHUNK)) for i in range(64)]
    hashes: list[str] = []
    lock = threading.Lock()

    def worker(part: list[bytes]) -> None:
        for b in part:
            h = store.put(b)
            with lock:
                hashes.append(h)

    threads = [threading.Thread(target=worker, args=(blobs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(hashes) == sorted(hash_bytes(b) for b in blobs)
    for b in blobs:
        assert store.get(hash_bytes(b)) == b
    assert store.verify() == []


async def test_asyncio_put(store: BlobStore) -> None:
    blobs = [os.urandom(CHUNK * 2 + i) for i in range(10)]
    hashes = await asyncio.gather(*(store.aput(b) for b in blobs))
    assert hashes == [hash_bytes(b) for b in blobs]


def test_full_map_raises_and_loses_nothing(tmp_path: Path) -> None:
    db = SiteDB(tmp_path / "db", map_size=2 * 1024 * 1024)
    store = BlobStore(db, chunk_size=CHUNK)
    kept: dict[str, bytes] = {}
    with pytest.raises(StoreFullError, match="map_size"):
        for i in range(200):
            data = os.urandom(50_000 + i)
            kept[store.put(data)] = data
    assert len(kept) > 5
    assert store.verify() == []
    # a small blob still fits in the room the failed one would have needed
    tiny = store.put(b"still writable")
    db.close()
    db = SiteDB(tmp_path / "db", map_size=2 * 1024 * 1024)
    store = BlobStore(db, chunk_size=CHUNK)
    for h, data in kept.items():
        assert store.get(h) == data
    assert store.get(tiny) == b"still writable"
    db.close()


def test_failing_job_does_not_spoil_its_group(tmp_path: Path) -> None:
    db = SiteDB(tmp_path / "db")
    store = BlobStore(db, chunk_size=CHUNK)
    gate = threading.Event()
    blocker = db.submit(lambda txn: gate.wait(10))

    def boom(txn: lmdb.Transaction) -> None:
        store.write_in(txn, hash_bytes(b"half"), b"half")
        raise ValueError("job failed midway")

    ok = [os.urandom(100 + i) for i in range(5)]
    futures = [db.submit(lambda txn, d=d: store.write_in(txn, hash_bytes(d), d)) for d in ok[:2]]
    bad = db.submit(boom)
    futures += [db.submit(lambda txn, d=d: store.write_in(txn, hash_bytes(d), d)) for d in ok[2:]]
    gate.set()
    blocker.result(10)
    with pytest.raises(ValueError, match="midway"):
        bad.result(10)
    assert all(f.result(10) for f in futures)
    assert not store.has(hash_bytes(b"half"))
    assert all(store.has(hash_bytes(d)) for d in ok)
    db.close()


def _scan(store: BlobStore) -> tuple[int, int]:
    hashes = list(store.hashes())
    return len(hashes), sum(store.info(h).size for h in hashes)


def test_totals_follow_every_write_without_a_scan(tmp_path: Path) -> None:
    db = SiteDB(tmp_path / "db", map_size=1 << 26, sync=False)
    try:
        store = BlobStore(db, chunk_size=1000)
        assert store.totals() == (0, 0)
        rng = random.Random(3)
        blobs = [rng.randbytes(rng.randrange(0, 5000)) for _ in range(40)]
        hashes = [store.put(b) for b in blobs]
        store.put(blobs[0])  # stored once
        store.put_stream(iter([b"x" * 1500, b"y" * 700]), hash_bytes(b"x" * 1500 + b"y" * 700))
        assert store.totals() == _scan(store) == (41, sum(map(len, blobs)) + 2200)
        assert store.delete(hashes[3]) and not store.delete(hashes[3])
        db.write(lambda txn: store.delete_in(txn, hashes[4]))
        assert store.totals() == _scan(store)
        # an archive written before the counters existed is counted once, then kept counted
        db.write(lambda txn: txn.delete(b"blobs", db=db.db("blob_totals")))
        store.put(b"one more")
        assert store.totals() == _scan(store)
        store.put(b"and another")
        assert store.totals() == _scan(store)
    finally:
        db.close()
