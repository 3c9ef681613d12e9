"""BlobStore with its bytes on a real SeaweedFS cluster: placement, ranges, multipart, streaming
verification, orphans, moves both ways, an outage, credentials."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pacs import const
from p2pacs.config import StoreConfig
from p2pacs.errors import (
    ConfigError,
    CorruptBlobError,
    IntegrityError,
    ObjectStoreUnavailableError,
    StoreError,
)
from p2pacs.seaweed import SeaweedCluster
from p2pacs.store import BlobStore, SiteDB, hash_bytes, object_key
from p2pacs.store.migrate import migrate
from p2pacs.store.s3 import S3ObjectStore, load_credentials

from s3_helpers import s3_settings

pytestmark = pytest.mark.slow

INLINE = 1024  # bytes: small test blobs still exercise both places


def _objects(cluster: SeaweedCluster, **changes: object) -> S3ObjectStore:
    return S3ObjectStore(s3_settings(cluster, **changes))


@pytest.fixture
def s3(seaweed: SeaweedCluster) -> S3ObjectStore:
    return _objects(seaweed)


@pytest.fixture
def store(tmp_path: Path, s3: S3ObjectStore) -> Iterator[BlobStore]:
    db = SiteDB(tmp_path / "db")
    try:
        yield BlobStore(db, chunk_size=64 * 1024, objects=s3, offload=True, inline_max=INLINE)
    finally:
        db.close()


def _keys(objects: S3ObjectStore) -> set[str]:
    return {key for key, _ in objects.list()}


def test_large_blobs_go_to_s3_small_stay_in_lmdb(store: BlobStore, s3: S3ObjectStore) -> None:
    small, large = os.urandom(INLINE), os.urandom(300_000)
    hs, hl = store.put(small), store.put(large)
    assert not store.info(hs).in_objects and store.info(hl).in_objects
    assert _keys(s3) == {object_key(s3.prefix, hl)}
    assert object_key(s3.prefix, hl) == f"{s3.prefix}{hl[:2]}/{hl[2:4]}/{hl}"
    assert store.get(hs) == small and store.get(hl) == large
    assert store.put(large) == hl  # dedup: no second entry
    assert store.totals() == (2, INLINE + 300_000)
    rng = random.Random(1)
    for _ in range(10):
        a = rng.randrange(0, len(large))
        b = rng.randrange(a, len(large) + 1)
        assert b"".join(store.read_range(hl, a, b)) == large[a:b]
    assert store.verify() == []


def test_multipart_upload_of_a_large_instance(seaweed: SeaweedCluster, tmp_path: Path) -> None:
    objects = _objects(seaweed, s3_multipart_threshold=5 << 20)
    data = os.urandom(12 << 20)  # three parts of 5 MiB
    db = SiteDB(tmp_path / "db")
    try:
        store = BlobStore(db, objects=objects, offload=True)
        h = store.put(data)
        assert store.get(h) == data
        key = object_key(objects.prefix, h)
        head = objects._client.head_object(Bucket=objects.bucket, Key=key)
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a multipart ETag
        streamed = os.urandom(9 << 20)
        hs = hash_bytes(streamed)
        pieces = (streamed[i : i + 700_000] for i in range(0, len(streamed), 700_000))
        assert store.put_stream(pieces, hs) == hs
        assert store.info(hs).in_objects and store.get(hs) == streamed
    finally:
        db.close()


def test_put_stream_refuses_wrong_bytes_and_stores_nothing(
    store: BlobStore, s3: S3ObjectStore
) -> None:
    data = os.urandom(200_000)
    with pytest.raises(IntegrityError):
        store.put_stream([data[:100_000], b"x" + data[100_001:]], hash_bytes(data))
    assert store.totals() == (0, 0) and _keys(s3) == set()


def test_corrupt_and_missing_objects_are_corruption(store: BlobStore, s3: S3ObjectStore) -> None:
    data = os.urandom(200_000)
    h = store.put(data)
    bad = bytearray(data)
    bad[1234] ^= 0xFF
    s3.put(object_key(s3.prefix, h), bytes(bad))  # rot inside the object store
    assert not store.verify_blob(h)
    with pytest.raises(CorruptBlobError, match="fails its hash"):
        store.get(h)
    assert store.verify() == [h]
    s3.put(object_key(s3.prefix, h), data[:1000])  # truncated
    with pytest.raises(CorruptBlobError):
        store.get(h)
    s3.delete(object_key(s3.prefix, h))  # gone
    with pytest.raises(CorruptBlobError, match="missing"):
        store.get(h)
    assert store.delete(h) and not store.has(h)  # the repair path: drop, then fetch again
    assert store.put(data) == h and store.get(h) == data


def test_crash_between_put_and_commit_leaves_only_an_orphan(
    store: BlobStore, s3: S3ObjectStore
) -> None:
    data = os.urandom(150_000)
    h = hash_bytes(data)
    write = store.prepare(h, data)  # acknowledged by S3; the index commit never happens
    assert object_key(s3.prefix, h) in _keys(s3) and not store.has(h)
    assert store.sweep_objects(grace=0) == 0  # in flight: never swept
    write.release()
    assert store.sweep_objects(grace=3600) == 0  # too young
    assert store.sweep_objects(grace=0) == 1
    assert _keys(s3) == set()
    kept = store.put(os.urandom(150_000))
    assert store.sweep_objects(grace=0) == 0 and _keys(s3) == {object_key(s3.prefix, kept)}


def test_move_both_ways_verified(store: BlobStore, s3: S3ObjectStore, tmp_path: Path) -> None:
    db = SiteDB(tmp_path / "plain")
    try:
        plain = BlobStore(db, chunk_size=64 * 1024, objects=s3, offload=False)
        blobs = {plain.put(os.urandom(n)): n for n in (10, 70_000, 300_000)}
        assert not any(plain.info(h).in_objects for h in blobs)
        for h in blobs:
            assert plain.move(h, to_objects=True)
            assert not plain.move(h, to_objects=True)  # resumable: already there
        assert all(plain.info(h).in_objects for h in blobs)
        assert _keys(s3) == {object_key(s3.prefix, h) for h in blobs}
        assert plain.verify() == []
        with plain._db.read() as txn:  # the LMDB chunks are gone
            assert txn.stat(plain._chunks)["entries"] == 0
        bad = next(h for h, n in blobs.items() if n == 70_000)
        s3.put(object_key(s3.prefix, bad), b"rotten")
        for h in blobs:
            if h == bad:
                with pytest.raises(CorruptBlobError):
                    plain.move(h, to_objects=False)  # never moves bad bytes
            else:
                assert plain.move(h, to_objects=False)
        assert plain.info(bad).in_objects
        assert _keys(s3) == {object_key(s3.prefix, bad)}
        assert [plain.verify_blob(h) for h in blobs] == [h != bad for h in blobs]
    finally:
        db.close()


def test_migrate_resumes_where_it_stopped(s3: S3ObjectStore, tmp_path: Path) -> None:
    """An interrupted migration (half the blobs moved) is finished by running it again."""
    db = SiteDB(tmp_path / "db")
    try:
        plain = BlobStore(db, objects=s3, offload=False, inline_max=INLINE)
        blobs = [plain.put(os.urandom(20_000 + i)) for i in range(8)]
        small = plain.put(os.urandom(100))
        for h in blobs[:4]:
            plain.move(h, to_objects=True)
        report = migrate(plain, to_objects=True, workers=3)
        assert (report.moved, report.already, report.failed) == (4, 5, {})
        assert all(plain.info(h).in_objects for h in blobs)
        assert not plain.info(small).in_objects  # small blobs stay in LMDB
        back = migrate(plain, to_objects=False)
        assert (back.moved, back.failed) == (8, {})
        assert _keys(s3) == set() and plain.verify() == []
    finally:
        db.close()


def test_outage_fails_fast_and_recovers_by_itself(
    seaweed: SeaweedCluster, store: BlobStore
) -> None:
    data = os.urandom(100_000)
    seaweed.stop("s3")
    try:
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailableError):
            store.put(data)
        first = time.monotonic() - started
        assert first < 15, first
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailableError, match="unreachable"):
            store.put(os.urandom(100_000))
        assert time.monotonic() - started < 0.5  # while down: at once
        assert store.objects is not None and not store.objects.health()["reachable"]
        assert store.totals() == (0, 0)
    finally:
        seaweed.start("s3")
    deadline = time.monotonic() + 30
    while True:  # every try after the probe interval reaches the store again
        try:
            h = store.put(data)
            break
        except ObjectStoreUnavailableError:
            assert time.monotonic() < deadline, "the store never came back"
            time.sleep(const.OBJECT_PROBE_INTERVAL)
    assert store.get(h) == data
    assert store.objects.health()["reachable"]


def test_a_missing_bucket_is_not_corruption(seaweed: SeaweedCluster, tmp_path: Path) -> None:
    """A wrong bucket name must never look like rotten blobs (a repair would drop them)."""
    objects = _objects(seaweed, s3_bucket="no-such-bucket-here")
    with pytest.raises(StoreError, match="does not exist") as info:
        objects.check()
    assert not isinstance(info.value, CorruptBlobError)
    with pytest.raises(StoreError, match="does not exist") as info:
        list(objects.read_range("site/ab/cd/" + "ab" * 32, 0, 10))
    assert not isinstance(info.value, CorruptBlobError)


def test_gateway_answering_5xx_is_unavailable_not_corrupt(
    seaweed: SeaweedCluster, store: BlobStore
) -> None:
    """The filer behind the S3 gateway stopped: the gateway answers with 5xx, which the client
    retries with backoff, then reports as unavailable (never as a missing, corrupt object)."""
    kept = os.urandom(100_000)
    h = store.put(kept)
    seaweed.stop("filer")
    try:
        with pytest.raises(ObjectStoreUnavailableError, match="after retries"):
            store.put(os.urandom(100_000))
        with pytest.raises(ObjectStoreUnavailableError):
            store.get(h)
        assert store.objects is not None and not store.objects.health()["reachable"]
    finally:
        seaweed.start("filer")
    deadline = time.monotonic() + 60
    while True:
        try:
            assert store.get(h) == kept
            break
        except ObjectStoreUnavailableError:
            assert time.monotonic() < deadline, "the store never came back"
            time.sleep(const.OBJECT_PROBE_INTERVAL)


def test_credentials_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "s3.toml"
    path.write_text('access_key_id = "AK"\nsecret_access_key = "very-secret"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_credentials(path)
    path.chmod(0o600)
    assert load_credentials(path) == ("AK", "very-secret")
    path.write_text('access_key_id = "AK"\n')
    with pytest.raises(ConfigError, match="secret_access_key"):
        load_credentials(path)
    store = S3ObjectStore(
        StoreConfig(s3_bucket="b", s3_endpoint="http://127.0.0.1:1"), ("AK", "SK")
    )
    assert "SK" not in repr(store) and "SK" not in str(store.health())


def test_config_checks_the_backend() -> None:
    from p2pacs.config import Config

    cfg = Config()
    cfg.store.backend = "s3"
    assert any("s3_bucket" in p for p in cfg.check())
    cfg.store.s3_bucket = "b"
    cfg.store.s3_addressing = "sideways"
    cfg.store.s3_endpoint = "ftp://x"
    problems = " ".join(cfg.check())
    assert "s3_addressing" in problems and "s3_endpoint" in problems
    cfg.store.backend = "floppy"
    assert any("store.backend" in p for p in cfg.check())
