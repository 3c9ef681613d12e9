"""The baseline rule on a real site database: positive evidence only, never absence."""

from __future__ import annotations

import shutil
from pathlib import Path

from p2pacs.federation.continuity import Evidence, mark_baseline, read_baseline, settle_at_start
from p2pacs.federation.identity import create_federation_dir, enroll_site
from p2pacs.store import SiteDB


def test_an_empty_archive_without_evidence_awaits(tmp_path: Path) -> None:
    db = SiteDB(tmp_path / "db")
    try:
        assert read_baseline(db) is None
        first = settle_at_start(db, holds_studies=False)
        assert first.evidence is Evidence.AWAITING and not first.known
        # studies received while awaiting never pass for the site's past
        again = settle_at_start(db, holds_studies=True)
        assert again.evidence is Evidence.AWAITING
        # nor does --new-site once the archive holds something
        assert not settle_at_start(db, holds_studies=True, new_site=True).known
        found = mark_baseline(db, Evidence.RECORD, "seq 7")
        assert found.known and read_baseline(db) == found
    finally:
        db.close()


def test_explicit_new_site_and_existing_archive(tmp_path: Path) -> None:
    new = SiteDB(tmp_path / "new")
    old = SiteDB(tmp_path / "old")
    try:
        assert (
            settle_at_start(new, holds_studies=False, new_site=True).evidence is Evidence.NEW_SITE
        )
        assert settle_at_start(old, holds_studies=True).evidence is Evidence.EXISTING
        assert settle_at_start(old, holds_studies=False).evidence is Evidence.EXISTING
    finally:
        new.close()
        old.close()


def test_enrollment_is_evidence_and_a_wipe_loses_it(tmp_path: Path) -> None:
    fed = create_federation_dir(tmp_path / "fed", "t")
    site = enroll_site(fed, "clinic", tmp_path / "clinic", discovery=False)
    with site.archive() as archive:
        baseline = read_baseline(archive.db)
        assert baseline is not None and baseline.evidence is Evidence.ENROLLED
    shutil.rmtree(site.db_path)
    with site.archive() as archive:
        assert read_baseline(archive.db) is None
        assert settle_at_start(archive.db, holds_studies=False).evidence is Evidence.AWAITING
