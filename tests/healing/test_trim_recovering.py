"""Trimming never counts a copy that is not there: a wiped member recovering keeps listing its
studies in its catalogue, so the surplus copy stays until the member stores them again (real
processes; the member's recovery is slowed by a failpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pacs.healing.placement import trimmer
from p2pacs.samples import generate_instances
from p2pacs.testbed import Testbed, wait_for

from fault_helpers import SITES, ingest_replicated, lost_at, originals
from trim_helpers import TRIM_AFTER, copies, holds, sops_of, trim_bed, trimmed

pytestmark = pytest.mark.slow
__all__ = ["trim_bed"]  # the fixture, imported for pytest


def test_a_recovering_member_is_not_counted_until_its_blobs_are_back(
    trim_bed: Testbed, tmp_path: Path
) -> None:
    """A wiped member keeps listing the studies it has not got back yet: the surplus copy
    stays until the member really stores them (asked, not read from its catalogue)."""
    bed = trim_bed
    clinic = bed["clinic-a"]
    files = generate_instances(
        tmp_path / "in", studies=6, series_per_study=1, instances_per_series=2,
        rows=32, columns=32, seed=23,
    )  # fmt: skip
    stored, studies = ingest_replicated(clinic, files)
    ids = {s.name: bytes.fromhex(s.status()["federation"]["site_id"]) for s in bed.sites.values()}
    live = set(ids.values())
    # a member to wipe and one of its studies whose surplus copy another site would drop
    # (the trimmer is the surplus holder ranked last; the wiped member itself would not try)
    choice = [
        (victim, uid, by)
        for victim in (bed[n] for n in SITES if n != "clinic-a")
        for uid in sorted(studies)
        if holds(victim, uid)
        for by in bed.sites.values()
        if trimmer(uid, live, live, 2) == ids[by.name] and by is not victim
    ]
    assert choice, "every surplus copy would be the wiped member's own: pick other studies"
    victim, watched, by = choice[0]
    victim.kill()
    victim.wipe()
    assert wait_for(lambda: all(len(copies(bed, uid)) == 2 for uid in studies), 60, 0.5)
    victim.start(env={"P2PACS_FAILPOINTS": f"recovery.study=delay:{4 * TRIM_AFTER}"})

    def recovering() -> bool:
        return int(victim.status()["federation"]["recovery_pending"]) > 0

    assert wait_for(recovering, 30, 0.25)  # it found its record and queued its studies
    kept = f"surplus copy of {watched} kept: only 1 other sites verified"
    # once every member is up for trim_after, the trimmer looks, asks, and keeps its copy
    assert wait_for(lambda: kept in by.log_path.read_text(), 60, 0.25)
    assert recovering(), "the recovery ended too soon for this test to mean anything"
    assert sum(trimmed(bed).values()) == 0
    assert holds(by, watched)
    assert wait_for(lambda: not recovering(), 120, 0.5)
    assert wait_for(lambda: all(len(copies(bed, uid)) == 2 for uid in studies), 90, 0.5), {
        uid: copies(bed, uid) for uid in studies
    }
    assert not holds(by, watched)
    sent = originals(stored)
    for uid in studies:
        of_study = {sop: v for sop, v in sent.items() if sop in sops_of(stored, uid)}
        for name in copies(bed, uid):
            assert lost_at(bed[name], {uid}, of_study) == []
