"""A network partition between sites (network namespaces, a link set down) and its healing."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pacs.testbed import Testbed, wait_for

from fault_helpers import (
    SITES,
    ingest,
    lost_at,
    originals,
    scrub_clean,
    studies_of,
    wait_replicated,
)
from netns_helpers import Lan, netns_available

pytestmark = [pytest.mark.slow, pytest.mark.netns]


def test_partitioned_site_is_replaced_then_rejoins(
    tmp_path: Path, fault_instances: list[Path]
) -> None:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    with Lan(len(SITES)) as lan:
        hosts = {name: lan.hosts[i] for i, name in enumerate(SITES)}
        prefixes = {name: lan.prefix(i) for i, name in enumerate(SITES)}
        bed = Testbed(
            tmp_path / "fed", SITES, replication=2, down_after=3.0, repair_interval=1.0,
            hosts=hosts, prefixes=prefixes,
        )  # fmt: skip
        with bed:
            bed.start()
            lab, clinic_a, clinic_b = (bed[n] for n in SITES)
            stored = ingest(clinic_a, fault_instances)
            studies = studies_of(stored)
            wait_replicated(clinic_a, studies, 2)
            lan.cut(SITES.index("clinic-b"))

            def b_down() -> bool:
                members = lab.status()["federation"]["members"]
                return any(m["name"] == "clinic-b" and not m["up"] for m in members)

            assert wait_for(b_down, 30, 0.5), "the lab never noticed clinic-b was cut off"
            # the two sites still connected hold every study between them
            wait_replicated(lab, studies, 2, timeout=90)
            sent = originals(stored)
            for site in (lab, clinic_a):
                assert lost_at(site, studies, sent) == []
            lan.heal(SITES.index("clinic-b"))

            def b_up() -> bool:
                members = lab.status()["federation"]["members"]
                return any(m["name"] == "clinic-b" and m["up"] for m in members)

            assert wait_for(b_up, 30, 0.5), "clinic-b did not rejoin after the link came back"
            for site in (lab, clinic_a, clinic_b):
                assert lost_at(site, studies, sent) == []
                scrub_clean(site)
