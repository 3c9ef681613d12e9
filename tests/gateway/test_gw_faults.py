"""A fault below a handler is a failure status, never an exception into pynetdicom.

Each test opens real associations on port 0 and injects the fault in the layer below the
handler (the live index or archive object, the thread a storage commitment report runs on,
the federation's ``commitment`` hook), then checks three things: the requestor gets the
documented failure status (C-FIND/C-MOVE/C-GET 0xC001 "Unable to process", PS3.4 C.4.1.1.4,
C.4.2.1.4, C.4.3.1.4; N-ACTION 0x0110 "Processing failure"), the gateway's own log holds the
traceback, and the same association then answers a normal request correctly.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from itertools import islice
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from p2pacs.archive import Archive
from p2pacs.dicom.scu import association_handlers, read_context, store_files
from p2pacs.dicom.uids import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
)
from p2pacs.gateway import CommitmentResult, Gateway
from p2pacs.gateway import commitment as commitment_module
from p2pacs.samples import generate_instances

from gw_helpers import (
    AET,
    TIMEOUT,
    StorageSCP,
    associate,
    dataset_bytes,
    header,
    identifier,
    running_gateway,
    suboperations,
)

UNABLE_TO_PROCESS = 0xC001
PROCESSING_FAILURE = 0x0110


class InjectedFault(RuntimeError):
    """The fault a test puts below a handler."""


def fail_once(monkeypatch: pytest.MonkeyPatch, obj: object, name: str, good: int = 0) -> None:
    """``obj.name`` raises InjectedFault on call number ``good + 1``, and works otherwise."""
    real = getattr(obj, name)
    calls = 0

    def faulty(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == good + 1:
            raise InjectedFault(f"{name} failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, faulty)


def tracebacks(
    caplog: pytest.LogCaptureFixture, logger: str, kind: type[Exception] = InjectedFault
) -> list[logging.LogRecord]:
    """What ``logger`` logged with the traceback of a ``kind`` exception."""
    return [
        r
        for r in caplog.records
        if r.name == logger and r.exc_info and isinstance(r.exc_info[1], kind)
    ]


def pynetdicom_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What pynetdicom's service classes logged as errors: they do when a handler raises
    into them, or yields what they cannot use."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pynetdicom.service_class" and r.levelno >= logging.ERROR
    ]


@pytest.fixture
def study(tmp_path: Path) -> tuple[str, list[Path]]:
    """One study of three small Explicit VR CT instances: (its UID, the files)."""
    files = generate_instances(
        tmp_path / "study",
        studies=1,
        series_per_study=1,
        instances_per_series=3,
        rows=16,
        columns=16,
        implicit_vr_every=0,
    )
    return str(header(files[0]).StudyInstanceUID), files


def _store(gw: Gateway, files: list[Path]) -> None:
    host, port = gw.address
    assert not store_files(host, port, AET, files).failed


def _find(assoc: Association, **keys: Any) -> list[tuple[int, Dataset | None]]:
    return [
        (int(st.Status), ds) for st, ds in assoc.send_c_find(identifier(**keys), STUDY_ROOT_FIND)
    ]


def test_c_find_fault_is_unable_to_process(
    gw_archive: Archive,
    study: tuple[str, list[Path]],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    study_uid, files = study
    keys = {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study_uid, "SOPInstanceUID": ""}
    real_find = gw_archive.index.find

    def find_then_fail(*args: Any) -> Iterator[Any]:
        yield from islice(real_find(*args), 1)
        raise InjectedFault("index read failed mid-query")

    with running_gateway(gw_archive) as gw:
        _store(gw, files)
        assoc = associate(gw, STUDY_ROOT_FIND)
        assert assoc.is_established
        try:
            fail_once(monkeypatch, gw_archive.index, "find")
            assert [st for st, _ in _find(assoc, **keys)] == [UNABLE_TO_PROCESS]
            assert len(tracebacks(caplog, "p2pacs.gateway.find")) == 1

            monkeypatch.setattr(gw_archive.index, "find", find_then_fail)
            assert [st for st, _ in _find(assoc, **keys)] == [0xFF00, UNABLE_TO_PROCESS]
            assert len(tracebacks(caplog, "p2pacs.gateway.find")) == 2

            monkeypatch.undo()
            rsps = _find(assoc, **keys)
            assert [st for st, _ in rsps] == [0xFF00] * 3 + [0x0000]
            found = {str(ds.SOPInstanceUID) for _, ds in rsps[:-1] if ds is not None}
            assert found == {read_context(p)[2] for p in files}
        finally:
            assoc.release()
    assert pynetdicom_errors(caplog) == []


Retriever = tuple[Callable[[Dataset], list[Dataset]], dict[str, tuple[str, bytes]]]


@contextmanager
def _getter(gw: Gateway, sop_class: str, ts: str) -> Iterator[Retriever]:
    """A C-GET requestor on one association: (retrieve, SOP UID -> (syntax, bytes) received)."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        assert req.DataSet is not None
        received[str(req.AffectedSOPInstanceUID)] = (ts, bytes(req.DataSet.getvalue()))
        return 0x0000

    assoc = associate(
        gw,
        STUDY_ROOT_GET,
        (sop_class, [ts]),
        ext_neg=[build_role(sop_class, scp_role=True)],
        handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        yield (lambda q: [st for st, _ in assoc.send_c_get(q, STUDY_ROOT_GET)]), received
    finally:
        assoc.release()


@contextmanager
def _mover(gw: Gateway, sop_class: str, ts: str) -> Iterator[Retriever]:
    """A C-MOVE requestor on one association, moving to a storage SCP of its own."""
    with StorageSCP("DEST", {sop_class: [ts]}) as dest:
        gw.config.destinations["DEST"] = dest.address
        assoc = associate(gw, STUDY_ROOT_MOVE)
        assert assoc.is_established
        try:
            yield (
                (lambda q: [st for st, _ in assoc.send_c_move(q, "DEST", STUDY_ROOT_MOVE)]),
                dest.received,
            )
        finally:
            assoc.release()


@pytest.mark.parametrize("requestor", [_getter, _mover], ids=["C-GET", "C-MOVE"])
def test_retrieve_fault_before_and_after_the_count_is_unable_to_process(
    requestor: Callable[[Gateway, str, str], AbstractContextManager[Retriever]],
    gw_archive: Archive,
    study: tuple[str, list[Path]],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    study_uid, files = study
    query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid)
    with running_gateway(gw_archive) as gw:
        _store(gw, files)
        with requestor(gw, *read_context(files[0])[:2]) as (retrieve, received):
            # before the number of sub-operations is known: matching fails
            fail_once(monkeypatch, gw_archive.index, "find")
            rsps = retrieve(query)
            assert [int(r.Status) for r in rsps] == [UNABLE_TO_PROCESS]
            assert received == {}

            # after: the second instance cannot be read; it and the third count as failed
            fail_once(monkeypatch, gw_archive, "blob", good=1)
            rsps = retrieve(query)
            assert [int(r.Status) for r in rsps] == [0xFF00, UNABLE_TO_PROCESS]
            assert suboperations(rsps[-1]) == (1, 2, 0)
            assert len(received) == 1
            assert len(tracebacks(caplog, "p2pacs.gateway.retrieve")) == 2

            monkeypatch.undo()
            received.clear()
            rsps = retrieve(query)
            assert [int(r.Status) for r in rsps] == [0xFF00] * 3 + [0x0000]
            assert suboperations(rsps[-1]) == (3, 0, 0)
            assert {s: data for s, (_, data) in received.items()} == {
                read_context(p)[2]: dataset_bytes(p) for p in files
            }
    assert pynetdicom_errors(caplog) == []


class Requester:
    """A Storage Commitment requester on one association to the gateway; its own SCP takes
    the N-EVENT-REPORTs (the gateway reports on a new association, PS3.4 J.3.3)."""

    def __init__(self) -> None:
        self.reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()
        ae = AE(ae_title="REQ")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[*association_handlers(), (evt.EVT_N_EVENT_REPORT, self._on_report)],
        )
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.assoc: Association | None = None

    def _on_report(self, event: evt.Event) -> tuple[int, None]:
        self.reports.put((int(event.event_type or 0), event.event_information))
        return 0x0000, None

    def request(self, transaction: str, refs: list[tuple[str, str]]) -> int:
        """N-ACTION Request Storage Commitment; the response status."""
        assert self.assoc is not None
        info = Dataset()
        info.TransactionUID = transaction
        info.ReferencedSOPSequence = []
        for sop_class, sop in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop
            info.ReferencedSOPSequence.append(item)
        st, _ = self.assoc.send_n_action(
            info, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        return int(st.Status)

    def report(self) -> tuple[int, Dataset]:
        return self.reports.get(timeout=TIMEOUT)


def _join_worker(transaction: str) -> None:
    """Wait for the thread that checks and reports ``transaction`` to end."""
    for t in threading.enumerate():
        if t.name == f"commitment-{transaction[-8:]}":
            t.join(TIMEOUT)
            assert not t.is_alive()


@pytest.mark.filterwarnings("ignore:Invalid value:UserWarning")
def test_n_action_fault_is_processing_failure(
    gw_archive: Archive,
    study: tuple[str, list[Path]],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, files = study
    refs = [(str(header(p).SOPClassUID), str(header(p).SOPInstanceUID)) for p in files]
    fault = {"check": ""}
    local = commitment_module.local_commitment(gw_archive)

    def check(refs: list[tuple[str, str]], timeout: float) -> CommitmentResult:
        if fault["check"] == "raise":
            raise InjectedFault("no site reachable")
        if fault["check"] == "unencodable":  # FailureReason is a 16-bit US
            return CommitmentResult(failed=[(c, s, 0x10000) for c, s in refs])
        return local(refs, timeout)

    req = Requester()
    try:
        with running_gateway(gw_archive, commitment=check, destinations={"REQ": req.address}) as gw:
            _store(gw, files)
            req.assoc = associate(
                gw,
                STORAGE_COMMITMENT_PUSH,
                aet="REQ",
                ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scp_role=True)],
            )
            assert req.assoc.is_established
            try:
                # the worker that would check and report cannot start (out of threads)
                threads = SimpleNamespace(Thread=threading.Thread)
                fail_once(monkeypatch, threads, "Thread")
                monkeypatch.setattr(commitment_module, "threading", threads)
                assert req.request("1.2.3.66.1", refs) == PROCESSING_FAILURE
                assert len(tracebacks(caplog, "p2pacs.gateway.commitment")) == 1
                monkeypatch.undo()

                # the federation's check raises: every instance is reported failed
                fault["check"] = "raise"
                assert req.request("1.2.3.66.2", refs) == 0x0000
                event_type, ds = req.report()
                assert event_type == 2 and str(ds.TransactionUID) == "1.2.3.66.2"
                assert [int(i.FailureReason) for i in ds.FailedSOPSequence] == [0x0110] * 3
                assert len(tracebacks(caplog, "p2pacs.gateway.commitment")) == 2

                # the check answers what cannot be encoded: the worker logs it and ends
                fault["check"] = "unencodable"
                assert req.request("1.2.3.66.3", refs) == 0x0000
                _join_worker("1.2.3.66.3")
                assert len(tracebacks(caplog, "p2pacs.gateway.commitment", ValueError)) == 1

                fault["check"] = ""
                assert req.request("1.2.3.66.4", refs) == 0x0000
                event_type, ds = req.report()
                assert event_type == 1 and str(ds.TransactionUID) == "1.2.3.66.4"
                assert sorted(
                    (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                    for i in ds.ReferencedSOPSequence
                ) == sorted(refs)
                assert req.reports.empty()
            finally:
                req.assoc.release()
    finally:
        req.server.shutdown()
    assert pynetdicom_errors(caplog) == []
