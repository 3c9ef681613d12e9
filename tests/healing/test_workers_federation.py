"""Sites whose gateway runs as worker processes (``dicom.workers = 2``): what the workers ingest
reaches the federation through the change log; commitment and the repair of a blob found rotten
while a worker reads it go through the main process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt

from p2pacs.dicom.uids import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from p2pacs.testbed import Testbed, free_port, wait_for

from fault_helpers import ingest, lost_at, originals, studies_of, wait_replicated

pytestmark = pytest.mark.slow

SITES = ("clinic-a", "clinic-b")


def test_worker_ingest_replicates_and_commitment_is_answered(
    tmp_path: Path, fault_instances: list[Path]
) -> None:
    reports: list[tuple[int, Dataset]] = []
    port = free_port()

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append((int(event.event_type or 0), event.event_information))
        return 0x0000, None

    scu = AE(ae_title="COMMITSCU")
    scu.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    server = scu.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    try:
        with Testbed(tmp_path / "fed", SITES, replication=2, down_after=3.0, workers=2) as bed:
            a, b = bed["clinic-a"], bed["clinic-b"]
            site = a.site  # a fresh Site read from disk each time
            site.config.dicom.destinations["COMMITSCU"] = f"127.0.0.1:{port}"
            site.save_config()
            bed.start()
            files = fault_instances[:20]  # two studies, sent on two associations at once
            with ThreadPoolExecutor(2) as senders:
                halves = [senders.submit(ingest, a, files[i::2]) for i in range(2)]
                stored = [p for h in halves for p in h.result(120)]
            studies = studies_of(stored)
            assert len(studies) == 2
            wait_replicated(a, studies, 2)
            wait_replicated(b, studies, 2)
            assert lost_at(b, studies, originals(stored)) == []  # from B's workers, byte for byte

            request = Dataset()
            request.TransactionUID = "1.2.826.0.1.3680043.8.498.2"
            refs = []
            for sop_uid, (sop_class, _, _) in originals(stored).items():
                item = Dataset()
                item.ReferencedSOPClassUID = sop_class
                item.ReferencedSOPInstanceUID = sop_uid
                refs.append(item)
            request.ReferencedSOPSequence = refs
            ae = AE(ae_title="COMMITSCU")
            ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
            assoc = ae.associate(
                "127.0.0.1", a.dicom_port, ae_title=a.aet,
                ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scu_role=True)],
            )  # fmt: skip
            assert assoc.is_established
            status, _ = assoc.send_n_action(
                request, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
            assoc.release()
            assert status.Status == 0x0000
            assert wait_for(lambda: bool(reports), 60, 0.2), "no N-EVENT-REPORT arrived"

            # a blob rotten on disk at B is repaired from A when B's worker reads it for a C-GET
            b.stop()
            assert b.corrupt_blob(0.5) is not None
            b.start()
            assert lost_at(b, studies, originals(stored)) == []
    finally:
        server.shutdown()
    event_type, info = reports[0]
    assert event_type == 1, "both sites hold every instance: all committed"
    committed = {str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence}
    assert committed == {str(r.ReferencedSOPInstanceUID) for r in refs}
