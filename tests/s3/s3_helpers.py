"""Helpers of the S3 tests: settings for one key prefix of the test cluster's bucket."""

from __future__ import annotations

import itertools

from p2pacs.config import StoreConfig
from p2pacs.seaweed import SeaweedCluster

_prefixes = itertools.count()
BUCKET = "p2pacs-test"  # one bucket per cluster: each new bucket grows its own volumes


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
