"""Fault tests with every site a separate process: kill -9, wipe, restart; nothing is lost.

Each test ends by retrieving every acknowledged instance with C-GET (compared byte for byte
with what was sent) and re-hashing every stored blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest

from p2pacs.dicom.scu import store_files
from p2pacs.errors import P2PacsError
from p2pacs.federation.identity import load_identity
from p2pacs.samples import generate_instances
from p2pacs.site import Site
from p2pacs.store import hash_bytes
from p2pacs.testbed import SiteProcess, Testbed, wait_for
from p2pacs.transfer.client import Peer, PeerClient

from fault_helpers import (
    SITES,
    ingest,
    ingest_replicated,
    lost_at,
    originals,
    scrub_clean,
    studies_of,
    wait_replicated,
)

pytestmark = pytest.mark.slow


def test_sigkill_during_ingest_keeps_every_acknowledged_instance(
    testbed: Testbed, fault_instances: list[Path]
) -> None:
    clinic = testbed["clinic-a"]
    acknowledged: list[Path] = []

    def send() -> None:
        for path in fault_instances:  # one association per file: a kill ends only the current one
            acknowledged.extend(
                store_files("127.0.0.1", clinic.dicom_port, clinic.aet, [path]).stored
            )

    sender = threading.Thread(target=send)
    sender.start()
    assert wait_for(lambda: len(acknowledged) >= len(fault_instances) // 3, 60, 0.01)
    clinic.kill()
    sender.join(120)
    assert 0 < len(acknowledged) < len(fault_instances)
    clinic.start()
    sent = originals(acknowledged)
    assert lost_at(clinic, studies_of(acknowledged), sent) == []
    scrub_clean(clinic)


def test_wiped_site_recovers_and_resumes_after_sigkill(testbed: Testbed, tmp_path: Path) -> None:
    """Killed after some but not all studies are back, the recovery resumes and fetches none
    of what it already stored again."""
    files = generate_instances(
        tmp_path / "resume", studies=8, series_per_study=1, instances_per_series=2,
        rows=64, columns=64, seed=11,
    )  # fmt: skip
    clinic = testbed["clinic-a"]
    stored, studies = ingest_replicated(clinic, files)
    clinic.kill()
    clinic.wipe()
    # each study takes a second (queue and anti-entropy alike): studies come back a few at a
    # time, so there is a moment with some but not all back
    clinic.start(env={"P2PACS_FAILPOINTS": "recovery.study=delay:1.0,repair.pull=delay:1.0"})

    def partial() -> bool:
        return 0 < clinic.status()["studies"] < len(studies)

    assert wait_for(partial, 60, 0.05)
    clinic.kill()
    with clinic.site.archive() as archive:
        held_before = archive.index.counts()[2]  # instances
        back = sum(1 for uid in studies if archive.index.study(uid) is not None)
    assert 0 < back < len(studies)
    clinic.start()
    done = clinic.run_cli("recover", timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    status = clinic.status()
    assert status["federation"]["recovery_pending"] == 0
    # every instance fetched after the restart was new here: nothing stored was fetched again
    assert status["instances"] == len(stored)
    assert status["federation"]["instance_blobs_fetched"] == len(stored) - held_before
    assert "recovery finished" in clinic.log_path.read_text()
    assert lost_at(clinic, studies, originals(stored)) == []
    scrub_clean(clinic)


def test_two_sites_restarted_at_once_lose_nothing(
    testbed: Testbed, fault_instances: list[Path]
) -> None:
    clinic = testbed["clinic-a"]
    stored, studies = ingest_replicated(clinic, fault_instances)
    others = [testbed[n] for n in SITES if n != "clinic-a"]
    for site in [clinic, others[0]]:
        site.kill()
    for site in [clinic, others[0]]:
        site.start()
    wait_replicated(others[1], studies, 2)
    sent = originals(stored)
    for site in [clinic, *others]:  # read-through fills in whatever a site does not hold
        assert lost_at(site, studies, sent) == []
        scrub_clean(site)


def test_restart_republishes_only_what_changed(
    testbed: Testbed, fault_instances: list[Path]
) -> None:
    """A restarted site reads what it last published instead of publishing every study again,
    and its catalogue comes back the same."""
    clinic = testbed["clinic-a"]
    _, studies = ingest_replicated(clinic, fault_instances)

    def published(site: SiteProcess) -> dict[str, Any]:
        fed = site.status()["federation"]
        return {"catalogue": fed["catalogue"], "studies_published": fed["studies_published"]}

    assert published(clinic)["studies_published"] >= len(studies)
    before = published(clinic)["catalogue"]
    clinic.stop()
    clinic.start()
    assert wait_for(lambda: published(clinic)["catalogue"] == before, 30, 0.25)
    assert published(clinic)["studies_published"] == 0


def test_survivors_restore_r_when_a_site_dies(
    testbed: Testbed, fault_instances: list[Path]
) -> None:
    clinic = testbed["clinic-a"]
    stored, studies = ingest_replicated(clinic, fault_instances)
    survivors = ("research-lab", "clinic-b")
    # a study's placement may already be the two survivors (then clinic-a's copy is surplus and
    # nothing needs repair): whether a copy goes missing depends on the sites' random keys
    held = {
        uid: {h["name"].removesuffix(" (this site)") for h in clinic.find(uid)} for uid in studies
    }
    copies_missing = any(not set(survivors) <= names for names in held.values())
    clinic.kill()
    lab = testbed["research-lab"]

    def clinic_down() -> bool:
        rows = {m["name"]: m for m in lab.status()["federation"]["members"]}
        return rows["clinic-a"]["state"] == "down"

    assert wait_for(clinic_down, 30, 0.25)  # else clinic-a still counts as a live holder
    wait_replicated(lab, studies, 2, timeout=90)  # the two survivors now both hold everything
    for name in ("research-lab", "clinic-b"):
        assert lost_at(testbed[name], studies, originals(stored)) == []

    def after_the_kill(site_name: str) -> str:
        text = testbed[site_name].log_path.read_text()
        down = text.find("member clinic-a is down")
        return text[down:] if down >= 0 else ""

    # each survivor logs the death; if copies went missing, the one pulling them logs the
    # repair's end
    assert wait_for(
        lambda: (
            all(map(after_the_kill, survivors))
            and (
                not copies_missing or any("repair finished" in after_the_kill(n) for n in survivors)
            )
        ),
        30,
        0.25,
    )


def test_corrupt_blob_repaired_by_scrub(testbed: Testbed, fault_instances: list[Path]) -> None:
    clinic = testbed["clinic-a"]
    _, studies = ingest_replicated(clinic, fault_instances[:10])
    victim = (
        testbed["clinic-b"]
        if any(h["name"].startswith("clinic-b") for uid in studies for h in clinic.find(uid))
        else testbed["research-lab"]
    )
    victim.stop()
    corrupted = corrupt_one_blob(victim.path)
    victim.start()
    done = victim.run_cli("scrub", "--repair", timeout=120)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "1 corrupt, 1 repaired" in out, out
    scrub_clean(victim)
    assert corrupted


def corrupt_one_blob(site_dir: Path, study_uid: str | None = None) -> str:
    """Flip a byte of one stored instance blob (the first of ``study_uid``, or of the first
    study), below the store's API, as disk rot would."""
    from p2pacs.site import Site

    with Site.open(site_dir).archive() as archive:
        study = study_uid or next(iter(archive.index.studies())).study_uid
        h = archive.index.study_instances(study)[0].current.hash
        digest = bytes.fromhex(h)
        chunks = archive.db.db("chunks")

        def flip(txn: object) -> None:
            key = digest + (0).to_bytes(4, "big")
            data = bytearray(txn.get(key, db=chunks))  # type: ignore[attr-defined]
            data[len(data) // 2] ^= 0xFF
            txn.put(key, bytes(data), db=chunks)  # type: ignore[attr-defined]

        archive.db.write(flip)
        assert not archive.blobs.verify_blob(h)
    return h


def test_corrupt_blob_found_while_serving_a_peer_is_repaired_there(
    tmp_path: Path, fault_instances: list[Path]
) -> None:
    """Every site holds every study (R=3); one copy rots; a peer's fetch from that site finds
    the mismatch, and the serving site replaces its copy from another holder on its own."""
    with Testbed(
        tmp_path / "fed", SITES, replication=3, down_after=3.0, repair_interval=1.0
    ) as bed:
        bed.start()
        clinic, lab, other = bed["clinic-a"], bed["research-lab"], bed["clinic-b"]
        files = fault_instances[:10]
        stored = ingest(clinic, files)
        studies = studies_of(stored)
        wait_replicated(clinic, studies, 3)
        lab.stop()
        rotten = corrupt_one_blob(lab.path)
        lab.start()
        assert lab.status()["federation"]["corrupt_repaired"] == 0

        async def fetch_from_lab() -> bytes:
            identity, federation = load_identity(Site.open(other.path))
            lab_site = Site.open(lab.path)
            lab_id, _ = load_identity(lab_site)
            port = lab_site.config.federation.transfer_port
            peer = Peer(lab_id.site_id, "research-lab", "127.0.0.1", port)
            async with PeerClient(identity, federation) as client:
                got = b""
                with contextlib.suppress(P2PacsError):
                    async for piece in client.fetch_blob(peer, rotten):
                        got += piece
                return got

        served = asyncio.run(fetch_from_lab())
        assert hash_bytes(served) != rotten  # cut short: never a whole wrong blob

        def repaired() -> bool:
            fed = lab.status()["federation"]
            return bool(fed["corrupt_served"] >= 1 and fed["corrupt_repaired"] == 1)

        assert wait_for(repaired, 60, 0.25)
        assert hash_bytes(asyncio.run(fetch_from_lab())) == rotten
        assert lost_at(lab, studies, originals(stored)) == []
        scrub_clean(lab)
