"""Surplus copies trimmed back to R, with every site a real process.

A site killed and brought back finds that repair made a copy of its studies meanwhile: after
``trim_after`` seconds with every member up, exactly R copies remain, each instance is still
retrieved byte for byte from the sites that hold it, and nothing was dropped while the member
was down.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pacs.testbed import Testbed, wait_for

from fault_helpers import SITES, ingest_replicated, lost_at, originals, scrub_clean
from trim_helpers import copies, holds, outlast_trim_after, sops_of, trim_bed, trimmed

pytestmark = pytest.mark.slow
__all__ = ["trim_bed"]  # the fixture, imported for pytest


def test_surplus_copy_trimmed_after_a_member_returns(
    trim_bed: Testbed, fault_instances: list[Path]
) -> None:
    bed = trim_bed
    clinic = bed["clinic-a"]
    stored, studies = ingest_replicated(clinic, fault_instances)
    sent = originals(stored)
    others = [bed[n] for n in SITES if n != "clinic-a"]
    # the member holding the most studies goes down; repair copies its studies to the third
    victim = max(others, key=lambda s: sum(holds(s, uid) for uid in studies))
    surplus = {uid for uid in studies if holds(victim, uid)}
    assert surplus
    victim.kill()
    assert wait_for(lambda: all(len(copies(bed, uid)) == 2 for uid in studies), 60, 0.5)
    # nothing is dropped while a member is down, however long that lasts
    outlast_trim_after(clinic)
    assert sum(trimmed(bed).values()) == 0
    assert all(len(copies(bed, uid)) == 2 for uid in studies)

    victim.start()
    assert wait_for(lambda: all(len(copies(bed, uid)) == 3 for uid in surplus), 60, 0.25) or (
        sum(trimmed(bed).values()) > 0  # (the first trim may already have happened)
    )
    assert wait_for(lambda: all(len(copies(bed, uid)) == 2 for uid in studies), 90, 0.5), {
        uid: copies(bed, uid) for uid in studies
    }
    counts = trimmed(bed)
    assert sum(counts.values()) == len(surplus), counts
    for name, n in counts.items():
        log = bed[name].log_path.read_text()
        assert log.count("trimmed study ") == n
    # every instance, byte for byte, from each site that still holds it
    for uid in studies:
        of_study = {sop: v for sop, v in sent.items() if sop in sops_of(stored, uid)}
        for name in copies(bed, uid):
            assert lost_at(bed[name], {uid}, of_study) == []
    for site in bed.sites.values():
        scrub_clean(site)
    # and it stays at R: nothing is pulled back
    outlast_trim_after(clinic)
    assert all(len(copies(bed, uid)) == 2 for uid in studies)
