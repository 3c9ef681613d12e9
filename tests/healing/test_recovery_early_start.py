"""A wiped site starts its recovery queue from its own tree, before the members' trees land.

Separate site processes. The wiped site copies every member's catalogue tree (who holds each
study) with a failpoint holding each copy back: its queue must be written and reported while
those copies are still under way, and every study must still come back once they land (each
study waits for a tree naming a holder of it, not for all of them)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from p2pacs.samples import generate_instances
from p2pacs.testbed import Testbed, wait_for

from fault_helpers import ingest_replicated

pytestmark = pytest.mark.slow

COPY_DELAY = 6.0  # seconds each copy of a member's tree is held back at the wiped site


def test_queue_starts_before_the_member_trees_are_copied(testbed: Testbed, tmp_path: Path) -> None:
    files = generate_instances(
        tmp_path / "early", studies=6, series_per_study=1, instances_per_series=2,
        rows=64, columns=64, seed=31,
    )  # fmt: skip
    clinic = testbed["clinic-a"]
    _, studies = ingest_replicated(clinic, files)
    clinic.kill()
    clinic.wipe()
    started = time.monotonic()
    clinic.start(env={"P2PACS_FAILPOINTS": f"catalogue.copy=delay:{COPY_DELAY:g}"})

    seen: list[dict[str, object]] = []

    def queued() -> bool:
        rec = clinic.status()["federation"]["recovery"]
        seen.append(rec)
        return rec["studies_total"] == len(studies) and not rec["awaiting_record"]

    assert wait_for(queued, 60, 0.1), seen[-1:]
    planned_after = time.monotonic() - started
    early = seen[-1]
    # the queue is written while the members' trees are still being copied
    assert early["member_trees_copied"] is False, (planned_after, early)

    def back() -> bool:
        rec = clinic.status()["federation"]["recovery"]
        seen.append(rec)
        return rec["studies_done"] == len(studies) and rec["member_trees_copied"] is True

    assert wait_for(back, 120, 0.25), seen[-1:]
    assert clinic.holds_whole(studies, 2)
