"""The gateway's hooks into the federation: read-through before C-MOVE/C-GET (``ensure_local``)
and Storage Commitment Push Model (N-ACTION answered, N-EVENT-REPORT sent to the requester)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt

from p2pacs.archive import Archive
from p2pacs.dicom.scu import association_handlers, get_study, read_context, store_files
from p2pacs.dicom.uids import (
    PATIENT_ROOT_MOVE,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    STUDY_ROOT_MOVE,
)
from p2pacs.errors import P2PacsError
from p2pacs.gateway import CommitmentResult, Gateway

from gw_helpers import (
    AET,
    TIMEOUT,
    StorageSCP,
    associate,
    dataset_bytes,
    header,
    move,
    running_gateway,
    suboperations,
)

CT_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")


def _testfile(name: str) -> Path:
    return Path(str(get_testdata_file(name, download=False)))


def test_ensure_local_gets_the_study_uids_and_runs_before_matching(
    gw_archive: Archive, tmp_path: Path
) -> None:
    """The hook sees the identifier's StudyInstanceUIDs (a UID list expanded) before the
    gateway matches: a study it brings in (as the federation's read-through does) is served."""
    local, remote = _testfile("CT_small.dcm"), _testfile("MR_small.dcm")
    remote_study = str(header(remote).StudyInstanceUID)
    local_study = str(header(local).StudyInstanceUID)
    calls: list[list[str]] = []
    failing = {"mode": ""}

    def ensure_local(uids: list[str]) -> None:
        calls.append(list(uids))
        if failing["mode"] == "p2pacs":
            raise P2PacsError("no holder reachable")
        if failing["mode"] == "bug":
            raise RuntimeError("unexpected")
        if remote_study in uids and gw_archive.index.instance(read_context(remote)[2]) is None:
            gw_archive.import_file(remote)  # what a fetch from a peer ends with

    with (
        StorageSCP(
            "DEST", {read_context(p)[0]: [read_context(p)[1]] for p in (local, remote)}
        ) as dest,
        running_gateway(
            gw_archive, ensure_local=ensure_local, destinations={"DEST": dest.address}
        ) as gw,
    ):
        host, port = gw.address
        assert not store_files(host, port, AET, [local]).failed
        assert calls == []  # C-STORE does not read through

        got = get_study(host, port, AET, remote_study, [read_context(remote)[:2]])
        assert calls == [[remote_study]]
        assert got == {read_context(remote)[2]: dataset_bytes(remote)}

        rsps = move(
            gw,
            STUDY_ROOT_MOVE,
            "DEST",
            QueryRetrieveLevel="STUDY",
            StudyInstanceUID=[local_study, remote_study, "1.2.3.404"],
        )
        assert calls[-1] == [local_study, remote_study, "1.2.3.404"]
        assert suboperations(rsps[-1]) == (2, 0, 0)
        assert set(dest.received) == {read_context(local)[2], read_context(remote)[2]}

        # no StudyInstanceUID in the identifier: nothing to read through
        n = len(calls)
        rsps = move(
            gw,
            PATIENT_ROOT_MOVE,
            "DEST",
            QueryRetrieveLevel="PATIENT",
            PatientID=str(header(local).PatientID),
        )
        assert int(rsps[-1].Status) == 0x0000 and len(calls) == n

        # a failing read-through is logged; what is local is still served
        for mode in ("p2pacs", "bug"):
            failing["mode"] = mode
            got = get_study(host, port, AET, local_study, [read_context(local)[:2]])
            assert got == {read_context(local)[2]: dataset_bytes(local)}, mode
        assert len(calls) == n + 2


class Requester:
    """A Storage Commitment requester: its AE sends N-ACTION to the gateway and, with an SCP
    of its own, takes the N-EVENT-REPORT the gateway sends back on a new association."""

    def __init__(self, aet: str = "REQ"):
        self.aet = aet
        self.reports: list[tuple[int, Dataset]] = []
        self.arrived = threading.Event()
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
        # the gateway proposes the SCP role for itself (PS3.4 J.3.3): accept that
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[*association_handlers(), (evt.EVT_N_EVENT_REPORT, self._on_report)],
        )

    def _on_report(self, event: evt.Event) -> tuple[int, None]:
        self.reports.append((int(event.event_type or 0), event.event_information))
        self.arrived.set()
        return 0x0000, None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def request(self, gw: Gateway, transaction: str, refs: list[tuple[str, str]]) -> int:
        """Send N-ACTION (Request Storage Commitment); the N-ACTION response status."""
        info = Dataset()
        info.TransactionUID = transaction
        items = []
        for sop_class, sop in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop
            items.append(item)
        info.ReferencedSOPSequence = items
        return self.send(gw, info, 1)

    def send(self, gw: Gateway, info: Dataset, action_type: int) -> int:
        self.arrived.clear()
        assoc = associate(
            gw,
            STORAGE_COMMITMENT_PUSH,
            aet=self.aet,
            ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scp_role=True)],
        )
        assert assoc.is_established
        try:
            st, _ = assoc.send_n_action(
                info, action_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
        finally:
            assoc.release()
        return int(st.Status)

    def report(self) -> tuple[int, Dataset]:
        assert self.arrived.wait(TIMEOUT), "no N-EVENT-REPORT"
        return self.reports[-1]

    def close(self) -> None:
        self.server.shutdown()


@contextmanager
def _requester() -> Iterator[Requester]:
    req = Requester()
    try:
        yield req
    finally:
        req.close()


def _refs(ds: Dataset, keyword: str) -> list[tuple[str, str]]:
    return [
        (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in ds.get(keyword, [])
    ]


def test_storage_commitment_reports_committed_and_failed(gw_archive: Archive) -> None:
    files = [_testfile(n) for n in CT_FILES]
    stored = [(str(header(p).SOPClassUID), str(header(p).SOPInstanceUID)) for p in files]
    unknown = (stored[0][0], "1.2.3.404")
    conflict = ("1.2.840.10008.5.1.4.1.1.7", stored[0][1])  # held, but as another SOP class
    with _requester() as req, running_gateway(gw_archive, destinations={"REQ": req.address}) as gw:
        host, port = gw.address
        assert not store_files(host, port, AET, files).failed

        assert req.request(gw, "1.2.3.77.1", stored) == 0x0000
        event_type, ds = req.report()
        assert event_type == 1  # all committed
        assert str(ds.TransactionUID) == "1.2.3.77.1"
        assert _refs(ds, "ReferencedSOPSequence") == stored
        assert "FailedSOPSequence" not in ds

        assert req.request(gw, "1.2.3.77.2", [*stored, unknown, conflict]) == 0x0000
        event_type, ds = req.report()
        assert event_type == 2  # some failed
        assert str(ds.TransactionUID) == "1.2.3.77.2"
        assert _refs(ds, "ReferencedSOPSequence") == stored
        assert _refs(ds, "FailedSOPSequence") == [unknown, conflict]
        assert [int(i.FailureReason) for i in ds.FailedSOPSequence] == [0x0112, 0x0119]
        assert len(req.reports) == 2


def test_storage_commitment_uses_the_site_check_and_refuses_bad_requests(
    gw_archive: Archive,
) -> None:
    """With a federation the check is "held by R sites" (``commitment``); whatever it decides
    is what the report says. A malformed N-ACTION is refused at once."""
    asked: list[tuple[list[tuple[str, str]], float]] = []

    def federation_check(refs: list[tuple[str, str]], timeout: float) -> CommitmentResult:
        asked.append((list(refs), timeout))
        # the first is on R sites, the second only here so far
        return CommitmentResult(committed=[refs[0]], failed=[(*refs[1], 0x0110)])

    refs = [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.1"), ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.2")]
    with (
        _requester() as req,
        running_gateway(
            gw_archive, destinations={"REQ": req.address}, commitment=federation_check
        ) as gw,
    ):
        assert req.request(gw, "1.2.3.88", refs) == 0x0000
        event_type, ds = req.report()
        assert asked and asked[0][0] == refs and asked[0][1] > 0
        assert event_type == 2
        assert _refs(ds, "ReferencedSOPSequence") == [refs[0]]
        assert _refs(ds, "FailedSOPSequence") == [refs[1]]
        assert int(ds.FailedSOPSequence[0].FailureReason) == 0x0110

        no_refs = Dataset()
        no_refs.TransactionUID = "1.2.3.89"
        assert req.send(gw, no_refs, 1) == 0x0110
        assert req.send(gw, no_refs, 2) == 0x0123  # no such action type
        assert len(asked) == 1
