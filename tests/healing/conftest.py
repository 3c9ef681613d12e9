"""Fixtures for multi-process federation tests: sample instances and a fresh testbed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pacs.samples import generate_instances
from p2pacs.testbed import Testbed

from fault_helpers import SITES


@pytest.fixture(scope="session")
def fault_instances(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Small but real instances: 3 studies x 2 series x 5 instances of 128x128 16-bit."""
    out = tmp_path_factory.mktemp("fault-instances")
    return generate_instances(
        out, studies=3, series_per_study=2, instances_per_series=5, rows=128, columns=128, seed=7
    )


@pytest.fixture
def testbed(tmp_path: Path) -> Iterator[Testbed]:
    with Testbed(
        tmp_path / "fed", SITES, replication=2, down_after=3.0, repair_interval=1.0
    ) as bed:
        bed.start()
        yield bed
