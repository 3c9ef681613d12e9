"""Helpers for the trimming tests: a testbed with a short ``trim_after``, who holds what."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pacs.dicom.header import extract_attributes
from p2pacs.dicom.part10 import split_part10
from p2pacs.testbed import SiteProcess, Testbed, wait_for

from fault_helpers import SITES

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


def outlast_trim_after(site: SiteProcess) -> None:
    """Let ``site`` keep making anti-entropy passes (each one would drop what is due) for
    twice ``trim_after``: nothing observable marks a copy *not* dropped, so this asserts the
    absence over that time, on passes that did run."""
    start, since = passes(site), time.monotonic()

    def done() -> bool:
        return passes(site) >= start + 2 * TRIM_AFTER and time.monotonic() - since >= 2 * TRIM_AFTER

    assert wait_for(done, 60, 0.25), "anti-entropy stalled"


def sops_of(files: list[Path], study_uid: str) -> set[str]:
    out = set()
    for path in files:
        part = split_part10(path.read_bytes())
        attrs = extract_attributes(part.dataset, part.transfer_syntax)
        if attrs["StudyInstanceUID"] == study_uid:
            out.add(str(attrs["SOPInstanceUID"]))
    return out
