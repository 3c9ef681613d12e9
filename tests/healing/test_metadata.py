"""Federation metadata whose cost follows the change, between real site processes.

A site holding 1,000 studies publishes one more: the member copies a few catalogue nodes, not
the catalogue; the superseded nodes and manifests are collected after the grace period, and
a wiped site still rebuilds its whole list from the member's copy afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pacs.samples import generate_instances
from p2pacs.testbed import SiteProcess, Testbed, wait_for

from fault_helpers import ingest, studies_of

pytestmark = pytest.mark.slow

STUDIES = 1_000
ONE_CHANGE = 24_000  # bytes: a leaf of up to 64 studies and its path of 16-way inner nodes


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Testbed]:
    with Testbed(
        tmp_path / "fed", ["hospital", "archive"], replication=1, down_after=3.0,
        repair_interval=1.0, metadata_grace=1.0,
    ) as bed:  # fmt: skip
        bed.start()
        yield bed


def member(site: SiteProcess, name: str) -> dict[str, Any]:
    (m,) = [m for m in site.status()["federation"]["members"] if m["name"] == name]
    return m


def test_one_new_study_costs_a_path_not_the_catalogue(pair: Testbed, tmp_path: Path) -> None:
    hospital, archive = pair["hospital"], pair["archive"]
    files = generate_instances(
        tmp_path / "many", studies=STUDIES, series_per_study=1, instances_per_series=1,
        rows=8, columns=8, seed=5,
    )  # fmt: skip
    ingest(hospital, files)
    studies = studies_of(files)

    def settled() -> bool:
        fed = hospital.status()["federation"]
        return fed["catalogue_studies"] == STUDIES and member(archive, "hospital")["catalogue_held"]

    assert wait_for(settled, 120, 0.5), hospital.status()["federation"]
    whole = archive.status()["federation"]["metadata"]["catalogue_bytes_fetched"]
    assert whole > STUDIES * 80, "the first copy brings every entry"

    one = generate_instances(tmp_path / "one", studies=1, instances_per_series=1,
                             series_per_study=1, rows=8, columns=8, seed=99)  # fmt: skip
    ingest(hospital, one)

    def copied_again() -> bool:
        return (
            hospital.status()["federation"]["catalogue_studies"] == STUDIES + 1
            and member(archive, "hospital")["catalogue_held"]
        )

    assert wait_for(copied_again, 60, 0.2)
    after = archive.status()["federation"]["metadata"]["catalogue_bytes_fetched"]
    assert after - whole < ONE_CHANGE, (after - whole, whole)
    assert (after - whole) * 10 < whole

    # superseded nodes and manifests go once their grace period is over; what is named stays
    assert wait_for(
        lambda: (
            hospital.status()["federation"]["metadata"]["garbage"] == 0
            and hospital.status()["federation"]["metadata"]["collected"] > 0
        ),
        30,
        0.5,
    ), hospital.status()["federation"]["metadata"]

    # the member's copy is whole after the collection: a wiped site rebuilds its full list
    # from it (its images had no other copy at R = 1; the list is what is checked here)
    hospital.stop()
    hospital.wipe()
    hospital.start()
    assert wait_for(
        lambda: hospital.status()["federation"]["recovery"]["studies_total"] == STUDIES + 1,
        60,
        0.5,
    ), hospital.status()["federation"]["recovery"]
    assert len(studies) == STUDIES
