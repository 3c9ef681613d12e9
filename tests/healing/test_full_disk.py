"""A full archive during recovery: the work stops with a clear error, what is stored is still
served, and recovery resumes once there is room again (a small LMDB map, then a larger one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pacs import const
from p2pacs.samples import generate_instances
from p2pacs.site import Site
from p2pacs.testbed import SiteProcess, Testbed, wait_for

from fault_helpers import ingest_replicated, lost_at, originals, scrub_clean, studies_of

pytestmark = pytest.mark.slow

SMALL_MAP = 3 * 1024 * 1024  # bytes: the site database fits a few of the studies below


def _set_map_size(site: SiteProcess, size: int) -> None:
    config = Site.open(site.path)
    config.config.store.map_size = size
    config.save_config()


def test_full_archive_pauses_recovery_serves_what_is_stored_and_resumes(
    testbed: Testbed, tmp_path: Path
) -> None:
    files = generate_instances(
        tmp_path / "full",
        studies=6,
        series_per_study=1,
        instances_per_series=4,
        rows=256,
        columns=256,
        seed=5,
    )  # fmt: skip  (6 studies of 4 x 128 KiB: about 3 MiB)
    clinic = testbed["clinic-a"]
    stored, studies = ingest_replicated(clinic, files)
    clinic.kill()
    clinic.wipe()
    _set_map_size(clinic, SMALL_MAP)
    clinic.start()

    def paused() -> bool:
        return bool(clinic.status()["federation"]["recovery"]["full"])

    assert wait_for(paused, 90, 0.5)
    done = clinic.run_cli("recover", timeout=120)
    message = " ".join((done.stdout + done.stderr).decode().split())
    assert done.returncode == 1 and "archive is full" in message, message
    assert "recovery paused" in clinic.log_path.read_text()
    # what is stored is still served, whole
    held = [uid for uid in studies if any("this site" in h["name"] for h in clinic.find(uid))]
    assert held, "the small map should still hold some whole studies"
    files_held = [p for p in stored if studies_of([p]) <= set(held)]
    assert lost_at(clinic, set(held), originals(files_held)) == []
    assert clinic.status()["instances"] < len(stored)
    # room again: a larger map, a restart, and recovery finishes on its own
    clinic.stop()
    _set_map_size(clinic, const.DEFAULT_MAP_SIZE)
    clinic.start()
    done = clinic.run_cli("recover", timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-2000:]
    assert lost_at(clinic, studies, originals(stored)) == []
    scrub_clean(clinic)
