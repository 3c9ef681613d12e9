"""Three sites as separate processes: find, fetch, read-through C-MOVE, and outsiders kept out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest

from dht import DhtError, DhtNode
from p2pacs.control.client import RUNFILE
from p2pacs.dicom.part10 import split_part10
from p2pacs.errors import P2PacsError
from p2pacs.federation.identity import create_federation_dir, enroll_site, load_identity
from p2pacs.testbed import Testbed, free_port, wait_for
from p2pacs.transfer import Peer, PeerClient

from fault_helpers import (
    SITES,
    dcmtk,
    ingest,
    ingest_replicated,
    lost_at,
    originals,
    scrub_clean,
    studies_of,
    wait_replicated,
)

pytestmark = pytest.mark.slow


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_find_and_fetch_from_another_site(testbed: Testbed, fault_instances: list[Path]) -> None:
    clinic, lab = testbed["clinic-a"], testbed["research-lab"]
    stored = ingest(clinic, fault_instances[:10])
    (study,) = studies_of(stored)
    wait_replicated(clinic, {study}, 2)
    found = lab.run_cli("find", study, timeout=60)
    assert found.returncode == 0, found.stderr.decode()
    assert "clinic-a" in found.stdout.decode()
    fetched = lab.run_cli("fetch", study, timeout=120)
    assert fetched.returncode == 0, fetched.stderr.decode()
    assert lab.status()["instances"] == 10
    assert lost_at(lab, {study}, originals(stored)) == []
    status = json.loads(lab.run_cli("status", "--json").stdout)
    assert status["federation"]["sites_up"] == 3
    assert {m["name"] for m in status["federation"]["members"]} == set(SITES) - {"research-lab"}


def test_fetch_keeps_the_newest_version_current(
    testbed: Testbed, fault_instances: list[Path], tmp_path: Path
) -> None:
    """An instance re-sent with corrections has two versions; a fetching site must index them
    oldest first, so it serves the correction, while single versions are indexed on arrival."""
    clinic, lab = testbed["clinic-a"], testbed["research-lab"]
    first = fault_instances[:5]
    corrected = tmp_path / "corrected.dcm"
    ds = pydicom.dcmread(first[2])
    ds.ImageComments = "corrected after the first send"
    ds.save_as(corrected)
    ingest(clinic, first)
    ingest(clinic, [corrected])
    (study,) = studies_of(first)
    wait_replicated(clinic, {study}, 2)
    fetched = lab.run_cli("fetch", study, timeout=120)
    assert fetched.returncode == 0, fetched.stderr.decode()
    assert lab.status()["instances"] == 5
    newest = [*first[:2], corrected, *first[3:]]
    assert originals(newest) != originals(first)
    assert lost_at(lab, {study}, originals(newest)) == []


def test_read_through_cmove_from_dcmtk(tmp_path: Path, fault_instances: list[Path]) -> None:
    movescu, storescp = dcmtk("movescu"), dcmtk("storescp")
    if movescu is None or storescp is None:
        pytest.skip("dcmtk's movescu/storescp are not installed (make test installs them)")
    with Testbed(tmp_path / "fed", SITES, replication=1, down_after=3.0) as bed:
        lab = bed["research-lab"]
        dest_port = free_port()
        site = lab.site
        site.config.dicom.destinations["STORESCP"] = f"127.0.0.1:{dest_port}"
        site.save_config()
        bed.start()
        clinic = bed["clinic-a"]
        stored = ingest(clinic, fault_instances[:6])
        (study,) = studies_of(stored)
        # the lab holds nothing; it learns from the DHT that clinic-a holds the study
        assert wait_for(lambda: [h["name"] for h in lab.find(study)] == ["clinic-a"], 30, 0.2)
        assert lab.status()["instances"] == 0
        out = tmp_path / "received"
        out.mkdir()
        env = {**os.environ, "TCP_NODELAY": "1"}
        scp = subprocess.Popen(
            [storescp, "+xa", "-od", str(out), str(dest_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert wait_for(lambda: _listening(dest_port), 10, 0.05), "storescp did not start"
            move = subprocess.run(
                [movescu, "-S", "-aet", "MOVESCU", "-aec", lab.aet, "-aem", "STORESCP",
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                 "127.0.0.1", str(lab.dicom_port)],
                env=env, capture_output=True, timeout=120, check=False,
            )  # fmt: skip
        finally:
            scp.terminate()
            scp.wait(10)
        assert move.returncode == 0, move.stderr.decode()
        received = {}
        for path in out.iterdir():
            part = split_part10(path.read_bytes())
            received[bytes(part.dataset)] = path
        sent = originals(stored)
        assert len(received) == len(sent)
        assert {data for _, _, data in sent.values()} == set(received)


def test_non_member_cannot_join_read_or_fetch(
    testbed: Testbed, fault_instances: list[Path], tmp_path: Path
) -> None:
    clinic = testbed["clinic-a"]
    stored = ingest(clinic, fault_instances[:4])
    (study,) = studies_of(stored)
    wait_replicated(clinic, {study}, 2)
    info = json.loads((clinic.path / RUNFILE).read_text())
    dht_addr = (info["dht"][0], int(info["dht"][1]))
    transfer = (info["transfer"][0], int(info["transfer"][1]))
    blob = clinic.status()  # the site answers its own members
    assert blob["instances"] == 4
    fed = create_federation_dir(tmp_path / "other-fed", "intruders")
    site = enroll_site(fed, "intruder", tmp_path / "intruder", discovery=False)
    identity, federation = load_identity(site)

    async def intrude() -> tuple[list[object], str]:
        node = await DhtNode.start(identity, federation, port=0)
        try:
            with contextlib.suppress(DhtError):
                await node.bootstrap([dht_addr])
            clinic_id = load_identity(clinic.site)[0].site_id.hex()
            entries = list(await node.get("site", clinic_id))
            assert node.contacts() == []
        finally:
            await node.stop()
        async with PeerClient(identity, federation, timeout=5) as client:
            peer = Peer(b"", "clinic-a", *transfer)
            try:
                await client.health(peer)
            except P2PacsError as exc:
                return entries, str(exc)
        return entries, "served"

    entries, refused = asyncio.run(intrude())
    assert entries == []
    assert refused != "served"


def test_storage_commitment_reports_success_once_r_sites_hold_it(
    tmp_path: Path, fault_instances: list[Path]
) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role, evt

    from p2pacs.dicom.uids import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH

    reports: list[tuple[int, Dataset, int]] = []
    port = free_port()

    def on_report(event: evt.Event) -> tuple[int, None]:
        holders = [h for h in clinic.find(study) if h["instances"] == len(stored)]
        reports.append((event.event_type, event.event_information, len(holders)))
        return 0x0000, None

    scu = AE(ae_title="COMMITSCU")
    scu.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    server = scu.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    try:
        with Testbed(tmp_path / "fed", SITES, replication=2, down_after=3.0) as bed:
            clinic = bed["clinic-a"]
            site = clinic.site
            site.config.dicom.destinations["COMMITSCU"] = f"127.0.0.1:{port}"
            site.save_config()
            bed.start()
            stored = ingest(clinic, fault_instances[:4])
            (study,) = studies_of(stored)
            request = Dataset()
            request.TransactionUID = "1.2.826.0.1.3680043.8.498.1"
            refs = []
            for sop_uid, (sop_class, _, _) in originals(stored).items():
                item = Dataset()
                item.ReferencedSOPClassUID = sop_class
                item.ReferencedSOPInstanceUID = sop_uid
                refs.append(item)
            unknown = Dataset()
            unknown.ReferencedSOPClassUID = refs[0].ReferencedSOPClassUID
            unknown.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
            request.ReferencedSOPSequence = [*refs, unknown]
            ae = AE(ae_title="COMMITSCU")
            ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
            assoc = ae.associate(
                "127.0.0.1", clinic.dicom_port, ae_title=clinic.aet,
                ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scu_role=True)],
            )  # fmt: skip
            assert assoc.is_established
            status, _ = assoc.send_n_action(
                request, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
            assoc.release()
            assert status.Status == 0x0000
            assert wait_for(lambda: bool(reports), 60, 0.2), "no N-EVENT-REPORT arrived"
    finally:
        server.shutdown()
    event_type, info, holders_then = reports[0]
    assert event_type == 2  # some failed: the unknown instance
    committed = {str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence}
    assert committed == {str(r.ReferencedSOPInstanceUID) for r in refs}
    (failed,) = info.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == "1.2.3.4.5.6.7.8.9"
    assert failed.FailureReason == 0x0112
    assert holders_then >= 2  # reported only once two sites held every instance


def test_corrupt_blob_is_repaired_when_read(testbed: Testbed, fault_instances: list[Path]) -> None:
    from test_faults import corrupt_one_blob

    clinic = testbed["clinic-a"]
    stored, studies = ingest_replicated(clinic, fault_instances[:6])
    clinic.stop()
    corrupt_one_blob(clinic.path)
    clinic.start()
    # C-GET must never serve the rotten copy: it is replaced from a peer, then served
    assert lost_at(clinic, studies, originals(stored)) == []
    scrub_clean(clinic)
