"""Nothing is trimmed while any member is down, even a study with R + 1 live copies (four
real site processes): the surplus copy goes only once every member is back."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pacs.testbed import Testbed, wait_for

from fault_helpers import SITES, ingest_replicated, lost_at, originals
from trim_helpers import copies, holds, outlast_trim_after, sops_of, trim_bed, trimmed

pytestmark = pytest.mark.slow
__all__ = ["trim_bed"]  # the fixture, imported for pytest


@pytest.mark.parametrize("trim_bed", [(*SITES, "clinic-c")], indirect=True)
def test_nothing_trimmed_while_any_member_is_down(
    trim_bed: Testbed, fault_instances: list[Path]
) -> None:
    """A study held at R + 1 live sites while a fourth site, not one of its holders, is down
    keeps its surplus copy until that site is back."""
    bed = trim_bed
    clinic = bed["clinic-a"]
    stored, studies = ingest_replicated(clinic, fault_instances)
    uid = sorted(studies)[0]
    second = next(s for s in bed.sites.values() if s is not clinic and holds(s, uid))
    second.kill()
    assert wait_for(lambda: len(copies(bed, uid)) == 2, 60, 0.5)
    (third,) = [s for s in bed.sites.values() if s.running and s is not clinic and holds(s, uid)]
    (bystander,) = [s for s in bed.sites.values() if s not in (clinic, second, third)]
    bystander.kill()  # before ``second`` returns: from then on a member is always down
    second.start()
    assert wait_for(lambda: len(copies(bed, uid)) == 3, 60, 0.25)
    outlast_trim_after(clinic)
    assert len(copies(bed, uid)) == 3  # R + 1 live copies, but a member is down
    assert sum(trimmed(bed).values()) == 0
    bystander.start()
    assert wait_for(lambda: all(len(copies(bed, u)) == 2 for u in studies), 90, 0.5), {
        u: copies(bed, u) for u in studies
    }
    assert sum(trimmed(bed).values()) >= 1
    sent = {sop: v for sop, v in originals(stored).items() if sop in sops_of(stored, uid)}
    for name in copies(bed, uid):
        assert lost_at(bed[name], {uid}, sent) == []
