"""A large anti-entropy pass never blocks a site's event loop.

A site starts holding the catalogue of a member that no longer answers (100,000 studies): its
first pass looks at every one of them. The site's own loop-lag probe (``status.loop_lag``) must
stay far below what one pass would take on the loop, and the site must keep answering.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from blake3 import blake3

from p2pacs.federation import cattree
from p2pacs.federation.catalogue import CatalogueEntry
from p2pacs.federation.catstore import CatalogueStore
from p2pacs.testbed import Testbed, wait_for

pytestmark = pytest.mark.slow

STUDIES = 100_000
# the bench's target is 100 ms; a shared 2-core CI machine gets headroom, still far below the
# seconds one pass over 100,000 studies takes when it runs on the loop
LAG_LIMIT_MS = 400


def test_a_pass_over_100k_studies_keeps_the_loop_free(tmp_path: Path) -> None:
    with Testbed(
        tmp_path / "fed", ["clinic", "lab"], replication=2, down_after=3.0, repair_interval=1.0
    ) as bed:
        lab = bed["lab"]
        gone = blake3(b"a member that left").digest()[:20]
        entries = (
            CatalogueEntry(f"1.2.826.0.1.3680043.10.99.{i}", f"{i:064x}", "20250101", 30, 10, 0.0)
            for i in range(STUDIES)
        )
        tree = cattree.build(entries)
        with lab.site.archive() as archive:  # the lab held a copy of that member's catalogue
            store = CatalogueStore(archive.db, archive.blobs, gone)
            store.store_nodes(tree.new)
            store.advance(gone, tree.root)
        bed.start()

        def looked_at_all() -> bool:
            fed = lab.status()["federation"]
            return fed["repair_passes"] >= 1 and fed["under_replicated"] >= STUDIES

        assert wait_for(looked_at_all, 120, 0.5), lab.status()["federation"]
        status = lab.status()
        assert status["loop_lag"]["max_ms"] < LAG_LIMIT_MS, status["loop_lag"]
