"""A wiped site gets its studies back newest first, through one order.

Separate site processes; the recovering site is slowed per study with a failpoint so that C-FIND
polls can see each study reappear. Only studies fetched at the same time may overtake each
other, and anti-entropy pulls wait for the queue instead of bringing studies back in UID order.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore

from p2pacs.dicom.header import extract_attributes
from p2pacs.dicom.part10 import split_part10
from p2pacs.healing.recovery import STUDIES_AT_ONCE
from p2pacs.samples import generate_instances
from p2pacs.testbed import SiteProcess, Testbed

from fault_helpers import ingest_replicated

pytestmark = pytest.mark.slow


def _studies_at(site: SiteProcess) -> set[str]:
    """StudyInstanceUIDs a C-FIND at STUDY level returns from the site."""
    ae = AE(ae_title="ORDER-PROBE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(site.host, site.dicom_port, ae_title=site.aet)
    if not assoc.is_established:
        return set()
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    found: set[str] = set()
    try:
        for status, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status is not None and status.Status == 0xFF00 and ds is not None:
                found.add(str(ds.StudyInstanceUID))
    finally:
        assoc.release()
    return found


def test_wiped_site_gets_studies_back_newest_first(testbed: Testbed, tmp_path: Path) -> None:
    files = generate_instances(
        tmp_path / "order", studies=12, series_per_study=1, instances_per_series=1,
        rows=64, columns=64, seed=23,
    )  # fmt: skip
    dates: dict[str, str] = {}
    for path in files:
        part = split_part10(path.read_bytes())
        attrs = extract_attributes(part.dataset, part.transfer_syntax)
        dates[str(attrs["StudyInstanceUID"])] = str(attrs["StudyDate"])
    clinic = testbed["clinic-a"]
    ingest_replicated(clinic, files)
    clinic.kill()
    clinic.wipe()
    clinic.start(env={"P2PACS_FAILPOINTS": "recovery.study=delay:0.4"})
    appeared: list[str] = []
    deadline = time.monotonic() + 120
    while len(appeared) < len(dates) and time.monotonic() < deadline:
        for uid in sorted(_studies_at(clinic) - set(appeared), key=dates.__getitem__, reverse=True):
            appeared.append(uid)  # studies seen in one poll: count them newest first (kindest)
    assert sorted(appeared) == sorted(dates), "not every study came back"
    # a study may be overtaken only by studies fetched at the same time as it
    for i, uid in enumerate(appeared):
        older_before = sum(dates[u] < dates[uid] for u in appeared[:i])
        assert older_before <= STUDIES_AT_ONCE - 1, (i, uid, [dates[u] for u in appeared])
    recovery = clinic.status()["federation"]["recovery"]
    assert recovery["recent_day"] == max(dates.values())
    assert recovery["recent_day_s"] is not None and recovery["recent_day_s"] > 0
