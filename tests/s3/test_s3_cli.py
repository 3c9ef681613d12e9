"""``p2pacs store sweep`` and ``store migrate`` on a site folder, in-process, on SeaweedFS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pacs.cli import main
from p2pacs.seaweed import SeaweedCluster
from p2pacs.site import Site
from p2pacs.store import hash_bytes, object_key
from p2pacs.store.s3 import S3ObjectStore

from s3_helpers import s3_settings

pytestmark = pytest.mark.slow


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _site(tmp_path: Path, cluster: SeaweedCluster, **changes: object) -> Site:
    site = Site.init(tmp_path / "site")
    site.config.store = s3_settings(cluster, **changes)
    site.save_config()
    return site


def test_sweep_removes_orphans_and_keeps_indexed_objects(
    seaweed: SeaweedCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site(tmp_path, seaweed)
    with site.archive() as archive:
        kept = archive.blobs.put(os.urandom(100_000))
    objects = S3ObjectStore(site.config.store)
    orphan = os.urandom(100_000)
    objects.put(object_key(objects.prefix, hash_bytes(orphan)), orphan)  # a PUT never indexed
    objects.put(f"{objects.prefix}not-a-blob.txt", b"someone else's")  # not ours: left alone
    code, out, err = _run(capsys, "--site", str(site.path), "store", "sweep")
    assert (code, out.strip()) == (0, "removed 0 orphan objects"), err  # too young
    code, out, err = _run(capsys, "--site", str(site.path), "store", "sweep", "--grace", "0")
    assert (code, out.strip()) == (0, "removed 1 orphan objects"), err
    keys = {key for key, _ in objects.list()}
    assert keys == {object_key(objects.prefix, kept), f"{objects.prefix}not-a-blob.txt"}


def test_migrate_refuses_without_a_store_or_with_a_missing_bucket(
    seaweed: SeaweedCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = Site.init(tmp_path / "plain")
    code, _, err = _run(capsys, "--site", str(plain.path), "store", "migrate", "--to", "s3")
    assert code == 1 and "no object store configured" in err
    site = _site(tmp_path, seaweed, s3_bucket="no-such-bucket", backend="lmdb")
    with site.archive() as archive:
        h = archive.blobs.put(os.urandom(100_000))
    code, _, err = _run(capsys, "--site", str(site.path), "store", "migrate", "--to", "s3")
    assert code == 1 and "does not exist" in err, err
    assert Site.open(site.path).config.store.backend == "lmdb"  # unchanged
    with site.archive() as archive:
        assert not archive.blobs.info(h).in_objects and archive.blobs.verify_blob(h)
