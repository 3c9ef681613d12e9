"""Surplus copies trimmed back to R, with every site a real process.

A site killed and brought back finds that repair made a copy of its studies meanwhile: after
``trim_after`` seconds with every member up, exactly R copies remain, each instance is still
retrieved byte for byte from the sites that hold it, and nothing was dropped while a member
was down.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pacs.testbed import SiteProcess, Testbed, wait_for

from fault_helpers import SITES, ingest_replicated, lost_at, originals, scrub_clean

pytestmark = pytest.mark.slow

TRIM_AFTER = 4.0  # seconds: short, so a test sees it; long enough to observe "not yet"


@pytest.fixture
def trim_bed(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Testbed]:
    names = getattr(request, "param", SITES)
    with Testbed(
        tmp_path / "fed", names, replication=2, down_after=3.0, repair_interval=1.0,
        trim_after=TRIM_AFTER,
    ) as bed:  # fmt: skip
        bed.start()
        yield bed


def holds(site: SiteProcess, uid: str) -> bool:
    """Whether ``site`` itself holds ``uid`` whole (its own row in ``find``)."""
    return any(row["name"].endswith("(this site)") for row in site.find(uid))


def copies(bed: Testbed, uid: str) -> list[str]:
    return [s.name for s in bed.sites.values() if s.running and holds(s, uid)]


def trimmed(bed: Testbed) -> dict[str, int]:
    return {s.name: s.status()["federation"]["trimmed"] for s in bed.sites.values() if s.running}


def passes(site: SiteProcess) -> int:
    return int(site.status()["federation"]["repair_passes"])


def wait_passes(site: SiteProcess, n: int) -> None:
    """Let ``site`` run ``n`` more anti-entropy passes (each one may trim what is due)."""
    start = passes(site)
    assert wait_for(lambda: passes(site) >= start + n, 60, 0.25), "anti-entropy stalled"


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
    wait_passes(clinic, int(2 * TRIM_AFTER / 1.0) + 2)
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
        of_study = {sop: v for sop, v in sent.items() if sop in _sops(stored, uid)}
        for name in copies(bed, uid):
            assert lost_at(bed[name], {uid}, of_study) == []
    for site in bed.sites.values():
        scrub_clean(site)
    # and it stays at R: nothing is pulled back
    wait_passes(clinic, 3)
    assert all(len(copies(bed, uid)) == 2 for uid in studies)


@pytest.mark.parametrize("trim_bed", [(*SITES, "clinic-c")], indirect=True)
def test_nothing_trimmed_while_any_member_is_down(
    trim_bed: Testbed, fault_instances: list[Path]
) -> None:
    """Four sites: a surplus study still has R + 1 live copies while a fourth site (not one of
    its holders) is down; it is dropped only once that site is back."""
    bed = trim_bed
    clinic = bed["clinic-a"]
    stored, studies = ingest_replicated(clinic, fault_instances)
    uid = sorted(studies)[0]
    second = next(s for s in bed.sites.values() if s is not clinic and holds(s, uid))
    second.kill()
    assert wait_for(lambda: len(copies(bed, uid)) == 2, 60, 0.5)
    (third,) = [s for s in bed.sites.values() if s.running and s is not clinic and holds(s, uid)]
    (bystander,) = [s for s in bed.sites.values() if s not in (clinic, second, third)]
    second.start()
    assert wait_for(lambda: len(copies(bed, uid)) == 3, 60, 0.25)
    bystander.kill()  # well within TRIM_AFTER of the return: nothing was due yet
    assert sum(trimmed(bed).values()) == 0
    wait_passes(clinic, int(2 * TRIM_AFTER / 1.0) + 2)
    assert len(copies(bed, uid)) == 3  # R + 1 live copies, but a member is down
    assert sum(trimmed(bed).values()) == 0
    bystander.start()
    assert wait_for(lambda: len(copies(bed, uid)) == 2, 90, 0.5), copies(bed, uid)
    sent = {sop: v for sop, v in originals(stored).items() if sop in _sops(stored, uid)}
    for name in copies(bed, uid):
        assert lost_at(bed[name], {uid}, sent) == []


def _sops(files: list[Path], study_uid: str) -> set[str]:
    from p2pacs.dicom.header import extract_attributes
    from p2pacs.dicom.part10 import split_part10

    out = set()
    for path in files:
        part = split_part10(path.read_bytes())
        attrs = extract_attributes(part.dataset, part.transfer_syntax)
        if attrs["StudyInstanceUID"] == study_uid:
            out.add(str(attrs["SOPInstanceUID"]))
    return out
