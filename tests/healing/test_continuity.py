"""A wiped site never replaces its catalogue with an empty one, and ``recover`` always ends.

Separate site processes, a short DHT record TTL: the outages below outlast every record the
wiped site published, which is exactly when the old rule ("no record found: a new site") lost
everything.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dht import DhtNode
from p2pacs.control.client import RUNFILE
from p2pacs.federation.identity import enroll_site, load_identity
from p2pacs.site import Site
from p2pacs.testbed import SiteProcess, Testbed, wait_for

from fault_helpers import SITES, ingest_replicated, lost_at, originals, scrub_clean, studies_of
from test_faults import corrupt_one_blob

pytestmark = pytest.mark.slow

TTL = 6.0  # seconds a DHT record lives here (48 h in production)


@pytest.fixture
def short_ttl_bed(tmp_path: Path) -> Iterator[Testbed]:
    with Testbed(
        tmp_path / "fed",
        SITES,
        replication=2,
        down_after=3.0,
        repair_interval=1.0,
        record_ttl=TTL,
        recover_give_up=8.0,
    ) as bed:
        bed.start()
        yield bed


def _site_record_on_dht(bed: Testbed, of: str, via: str) -> bool:
    """Whether the DHT still holds ``of``'s site record, as a member looking it up through
    ``via`` sees it (a throwaway member of the same federation: its own DHT node)."""
    folder = bed.root / "observer"
    member = (
        Site.open(folder)
        if folder.exists()
        else enroll_site(bed.fed_dir, "observer", folder, discovery=False)
    )
    identity, federation = load_identity(member)
    site_hex = load_identity(bed[of].site)[0].site_id.hex()
    info = json.loads((bed[via].path / RUNFILE).read_text())

    async def look() -> bool:
        node = await DhtNode.start(identity, federation, host="127.0.0.1", port=0)
        try:
            await node.bootstrap([(info["dht"][0], int(info["dht"][1]))])
            return bool(await node.get("site", site_hex))
        finally:
            await node.stop()

    return asyncio.run(look())


def _recovery(site: SiteProcess) -> dict[str, object]:
    fed = site.status()["federation"]
    return {**fed["recovery"], "catalogue": fed["catalogue"], "pending": fed["recovery_pending"]}


def test_wiped_after_outage_longer_than_ttl_recovers_everything(
    short_ttl_bed: Testbed, fault_instances: list[Path]
) -> None:
    clinic = short_ttl_bed["clinic-a"]
    stored, studies = ingest_replicated(clinic, fault_instances)
    clinic.kill()
    # the site record clinic-a published has lapsed on the DHT (the members keep their copies)
    assert wait_for(lambda: not _site_record_on_dht(short_ttl_bed, "clinic-a", "research-lab"),
                    4 * TTL, 0.5)  # fmt: skip
    clinic.wipe()
    clinic.start()
    done = clinic.run_cli("recover", timeout=180)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()[-2000:]
    state = _recovery(clinic)
    assert state["baseline"] == "record" and state["pending"] == 0, state
    assert lost_at(clinic, studies, originals(stored)) == []
    scrub_clean(clinic)


def test_wiped_site_alone_publishes_nothing_then_recovers_when_peers_return(
    short_ttl_bed: Testbed, fault_instances: list[Path]
) -> None:
    clinic = short_ttl_bed["clinic-a"]
    others = [short_ttl_bed[n] for n in SITES if n != "clinic-a"]
    stored, studies = ingest_replicated(clinic, fault_instances)
    clinic.kill()
    for site in others:
        site.stop()
    clinic.wipe()
    clinic.start()
    # it looked for its past, found nobody, and said so instead of publishing an empty catalogue
    assert wait_for(lambda: bool(_recovery(clinic)["error"]), 60, 0.5)
    state = _recovery(clinic)
    assert state["awaiting_record"] is True and state["baseline"] == "awaiting", state
    assert state["catalogue"] == "", state
    # nothing it signed names a catalogue: its DHT store holds no site record of its own
    assert _own_site_record(clinic) is None
    for site in others:
        site.start()
    done = clinic.run_cli("recover", timeout=180)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()[-2000:]
    assert _recovery(clinic)["baseline"] == "record"
    assert lost_at(clinic, studies, originals(stored)) == []


def test_recover_exits_1_naming_a_study_no_holder_can_serve(
    short_ttl_bed: Testbed, fault_instances: list[Path]
) -> None:
    clinic = short_ttl_bed["clinic-a"]
    stored, studies = ingest_replicated(clinic, fault_instances)
    clinic.kill()
    clinic.wipe()
    victim = sorted(studies)[0]
    holders = [short_ttl_bed[n] for n in SITES if n != "clinic-a"]
    holders = [s for s in holders if _holds(s, victim)]
    assert holders
    for site in holders:  # the same blob rots at every other holder of the study
        site.stop()
        corrupt_one_blob(site.path, victim)
        site.start()
    clinic.start()
    done = clinic.run_cli("recover", timeout=180)
    out = done.stdout.decode()
    assert done.returncode == 1, out + done.stderr.decode()[-2000:]
    assert f"not recovered {victim}" in " ".join(out.split()), out
    rest = [p for p in stored if studies_of([p]) != {victim}]  # every other study came back
    assert rest
    assert lost_at(clinic, studies_of(rest), originals(rest)) == []


def _holds(site: SiteProcess, study_uid: str) -> bool:
    with Site.open(site.path).archive() as archive:
        return archive.index.study(study_uid) is not None


def _own_site_record(site: SiteProcess) -> bytes | None:
    """This site's own signed site record in its DHT store (read beside the running process)."""
    from dht.records import derive_dht_key
    from dht.storage import LmdbRecordStore
    from p2pacs.federation.catalogue import SITE_NAMESPACE
    from p2pacs.federation.identity import load_identity

    identity, federation = load_identity(Site.open(site.path))
    dkey = derive_dht_key(federation.key_hash_key, SITE_NAMESPACE, identity.site_id.hex())
    store = LmdbRecordStore(Site.open(site.path).dht_path)
    try:
        own = [e for e in store.own_entries() if e.dht_key == dkey]
        return own[0].sealed if own else None
    finally:
        store.close()
