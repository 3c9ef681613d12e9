"""A fetched byte is hashed once: the fetching site process counts every byte it hashes.

The study has the three shapes that used to be read back and hashed again after the fetch: an
instance with two versions, a multi-frame instance over the 8 MiB batch limit (streamed), and
the manifests themselves.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from p2pacs.federation.identity import load_identity
from p2pacs.healing.placement import placement
from p2pacs.samples import generate_instances
from p2pacs.testbed import Testbed, wait_for

from fault_helpers import ingest, lost_at, originals, studies_of, wait_replicated

pytestmark = pytest.mark.slow

SLACK = 256 * 1024  # bytes: this site's own small blobs (its manifest, its catalogue) and copies
# of the members' catalogues, which are hashed when written or fetched too


def test_fetch_hashes_each_byte_once(testbed: Testbed, tmp_path: Path) -> None:
    ids = {n: load_identity(testbed[n].site)[0].site_id for n in testbed.sites}
    # every site sees every other live before anything is sent: all place the study alike, so
    # only its placed sites ever copy it
    assert wait_for(
        lambda: all(testbed[n].status()["federation"]["sites_up"] == 3 for n in ids), 30, 0.2
    )
    # a study whose placement includes the ingesting site: the other placed site pulls it and
    # the third never holds it, so the third is the fetcher (no surplus copy to race with)
    for seed in range(31, 61):
        files = generate_instances(
            tmp_path / f"study-{seed}",
            studies=1,
            series_per_study=1,
            instances_per_series=4,
            rows=512,
            columns=512,
            seed=seed,
            multiframe_frames=20,
        )  # fmt: skip  (one 10 MiB multi-frame instance among them)
        (uid,) = studies_of(files)
        if ids["clinic-a"] in placement(uid, ids.values(), 2):
            break
    corrected = tmp_path / "corrected.dcm"
    ds = pydicom.dcmread(files[1])
    ds.ImageComments = "corrected after the first send"
    ds.save_as(corrected)
    clinic = testbed["clinic-a"]
    ingest(clinic, files)
    ingest(clinic, [corrected])
    study = studies_of(files)
    wait_replicated(clinic, study, 2)
    targets = placement(uid, ids.values(), 2)
    (fetcher,) = [testbed[n] for n in ("research-lab", "clinic-b") if ids[n] not in targets]
    before = fetcher.status()
    done = fetcher.run_cli("fetch", *study, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    after = fetcher.status()
    fetched = after["bytes"] - before["bytes"]
    hashed = after["hashed_bytes"] - before["hashed_bytes"]
    assert fetched > 10 * 1024 * 1024, after
    assert hashed <= fetched + SLACK, (hashed, fetched)
    newest = [files[0], corrected, *files[2:]]
    assert lost_at(fetcher, study, originals(newest)) == []
