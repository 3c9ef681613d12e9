"""The gateway over real associations on port 0: a real Archive behind a pynetdicom SCP."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from p2pacs.archive import Archive
from p2pacs.config import DicomConfig
from p2pacs.dicom import split_part10
from p2pacs.dicom.scu import get_study, read_context, store_files
from p2pacs.dicom.uids import (
    PATIENT_ROOT_FIND,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    STUDY_ROOT_FIND,
    STUDY_ROOT_MOVE,
    VERIFICATION,
)
from p2pacs.gateway import Gateway
from p2pacs.samples import generate_instances

AET = "P2PACS"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    arc = Archive(tmp_path / "db", sync=False)
    try:
        yield arc
    finally:
        arc.close()


def _start(archive: Archive, **kw: Any) -> Gateway:
    hooks = {k: kw.pop(k) for k in ("ensure_local", "commitment") if k in kw}
    cfg = DicomConfig(ae_title=AET, port=0, bind="127.0.0.1", max_pdu=0, **kw)
    gw = Gateway(archive, cfg, **hooks)
    gw.start()
    return gw


def _serve(
    ae: AE, address: tuple[str, int], *, evt_handlers: list[Any]
) -> ThreadedAssociationServer:
    server = ae.start_server(address, block=False, evt_handlers=evt_handlers)
    assert server is not None
    return server


def _assoc(gw: Gateway, *contexts: str, aet: str = "TESTSCU") -> Any:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for c in contexts:
        ae.add_requested_context(c)
    host, port = gw.address
    return ae.associate(host, port, ae_title=AET)


def _files(pydicom_files: list[Path], n: int = 40) -> list[Path]:
    """Files with distinct SOP Instance UIDs, compressed ones included."""
    seen: dict[str, Path] = {}
    for p in pydicom_files:
        _, _, sop = read_context(p)
        seen.setdefault(sop, p)
    return list(seen.values())[:n]


def test_echo_and_allowlist(archive: Archive) -> None:
    gw = _start(archive, allowed_calling_aets=["GOOD"])
    try:
        assoc = _assoc(gw, VERIFICATION, aet="GOOD")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        bad = _assoc(gw, VERIFICATION, aet="EVIL")
        assert bad.is_rejected
    finally:
        gw.stop()


def test_store_then_get_and_move_byte_identical(
    archive: Archive, pydicom_files: list[Path]
) -> None:
    files = _files(pydicom_files)
    compressed = [p for p in files if read_context(p)[1].startswith("1.2.840.10008.1.2.4")]
    assert compressed, "want compressed instances among the test files"
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        assert req.DataSet is not None
        received[str(req.AffectedSOPInstanceUID)] = bytes(req.DataSet.getvalue())
        return 0x0000

    dest_ae = AE(ae_title="DEST")
    for p in files:
        c, ts, _ = read_context(p)
        dest_ae.add_supported_context(c, [ts])
    dest = _serve(dest_ae, ("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, on_store)])
    gw = _start(archive, destinations={"DEST": f"127.0.0.1:{dest.server_address[1]}"})
    try:
        host, port = gw.address
        report = store_files(host, port, AET, files)
        assert not report.failed, report.failed
        expected = {}
        contexts = []
        for p in files:
            c, ts, sop = read_context(p)
            expected[sop] = bytes(split_part10(p.read_bytes()).dataset)
            contexts.append((c, ts))
        study = str(dcmread(compressed[0], stop_before_pixels=True).StudyInstanceUID)
        in_study = {
            read_context(p)[2]
            for p in files
            if str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) == study
        }
        got = get_study(host, port, AET, study, contexts)
        assert set(got) == in_study
        assert all(got[s] == expected[s] for s in got)

        assoc = _assoc(gw, STUDY_ROOT_MOVE)
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study
        statuses = [int(s.Status) for s, _ in assoc.send_c_move(q, "DEST", STUDY_ROOT_MOVE)]
        assert statuses[-1] == 0x0000
        unknown = [int(s.Status) for s, _ in assoc.send_c_move(q, "NOWHERE", STUDY_ROOT_MOVE)]
        assert unknown[-1] == 0xA801
        assoc.release()
        assert set(received) == in_study
        assert all(received[s] == expected[s] for s in received)
    finally:
        gw.stop()
        dest.shutdown()


def _find(gw: Gateway, model: str, **keys: Any) -> list[Dataset]:
    assoc = _assoc(gw, model)
    q = Dataset()
    for k, v in keys.items():
        setattr(q, k, v)
    out = [ds for st, ds in assoc.send_c_find(q, model) if st and st.Status == 0xFF00]
    assoc.release()
    return out


def test_find_levels_and_bad_store(archive: Archive, pydicom_files: list[Path]) -> None:
    files = _files(pydicom_files, 20)
    gw = _start(archive)
    try:
        host, port = gw.address
        assert not store_files(host, port, AET, files).failed
        first = dcmread(files[0], stop_before_pixels=True)
        studies = _find(
            gw, STUDY_ROOT_FIND, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="*"
        )
        all_studies = {str(d.StudyInstanceUID) for d in studies}
        assert str(first.StudyInstanceUID) in all_studies
        assert all("Modality" not in d for d in studies)  # only requested keys
        series = _find(
            gw,
            STUDY_ROOT_FIND,
            QueryRetrieveLevel="SERIES",
            StudyInstanceUID=str(first.StudyInstanceUID),
            SeriesInstanceUID="",
        )
        assert str(first.SeriesInstanceUID) in {str(d.SeriesInstanceUID) for d in series}
        images = _find(
            gw,
            PATIENT_ROOT_FIND,
            QueryRetrieveLevel="IMAGE",
            PatientID=str(first.PatientID),
            StudyInstanceUID=str(first.StudyInstanceUID),
            SeriesInstanceUID=str(first.SeriesInstanceUID),
            SOPInstanceUID=[str(first.SOPInstanceUID), "1.2.3.4"],
        )
        assert [str(d.SOPInstanceUID) for d in images] == [str(first.SOPInstanceUID)]
        patients = _find(gw, PATIENT_ROOT_FIND, QueryRetrieveLevel="PATIENT", PatientID="")
        assert str(first.PatientID) in {str(d.PatientID) for d in patients}

        # garbage dataset bytes: a failure status, nothing stored, server still answers
        ct = "1.2.840.10008.5.1.4.1.1.2"
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ct, ["1.2.840.10008.1.2.1"])
        assoc = ae.associate(host, port, ae_title=AET)
        assert assoc.is_established
        junk = Dataset()
        junk.SOPClassUID = ct
        junk.SOPInstanceUID = "1.2.3.999"
        junk.PatientName = "NOUIDS"  # no Study/Series UID: cannot be indexed
        junk.file_meta = FileMetaDataset()
        junk.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
        rsp = assoc.send_c_store(junk)
        assert rsp.Status & 0xF000 in (0xA000, 0xC000)
        assoc.release()
        assert archive.index.instance("1.2.3.999") is None
        assert archive.index.instance(str(first.SOPInstanceUID)) is not None
        echo = _assoc(gw, VERIFICATION)
        assert echo.send_c_echo().Status == 0x0000
        echo.release()
    finally:
        gw.stop()


def test_ensure_local_and_commitment(archive: Archive, pydicom_files: list[Path]) -> None:
    files = _files(pydicom_files, 5)
    calls: list[list[str]] = []
    reports: list[tuple[int, Dataset]] = []
    got_report = threading.Event()

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append((int(event.event_type or 0), event.event_information))
        got_report.set()
        return 0x0000, None

    req_ae = AE(ae_title="REQ")
    req_ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    req_port = _free_port()
    req_srv = _serve(
        req_ae, ("127.0.0.1", req_port), evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    gw = _start(
        archive,
        ensure_local=lambda uids: calls.append(list(uids)),
        destinations={"REQ": f"127.0.0.1:{req_port}", "DEST": "127.0.0.1:1"},
    )
    try:
        host, port = gw.address
        assert not store_files(host, port, AET, files).failed
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assoc = _assoc(gw, STUDY_ROOT_MOVE)
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = [study, "1.2.3.4.5"]
        list(assoc.send_c_move(q, "DEST", STUDY_ROOT_MOVE))
        assoc.release()
        assert calls == [[study, "1.2.3.4.5"]]

        c, _, sop = read_context(files[0])
        ae = AE(ae_title="REQ")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        sc = ae.associate(
            host, port, ae_title=AET, ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scp_role=True)]
        )
        assert sc.is_established
        info = Dataset()
        info.TransactionUID = "1.2.3.77"
        ok, missing = Dataset(), Dataset()
        ok.ReferencedSOPClassUID, ok.ReferencedSOPInstanceUID = c, sop
        missing.ReferencedSOPClassUID, missing.ReferencedSOPInstanceUID = c, "1.2.3.404"
        info.ReferencedSOPSequence = [ok, missing]
        st, _ = sc.send_n_action(info, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
        assert st.Status == 0x0000
        sc.release()
        assert got_report.wait(15)
        event_type, ds = reports[0]
        assert event_type == 2
        assert [str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSOPSequence] == [sop]
        failed = ds.FailedSOPSequence[0]
        assert str(failed.ReferencedSOPInstanceUID) == "1.2.3.404"
        assert int(failed.FailureReason) == 0x0112
    finally:
        gw.stop()
        req_srv.shutdown()


def test_truncated_association_and_uncompressed_destination(
    archive: Archive, pydicom_files: list[Path]
) -> None:
    files = _files(pydicom_files)
    compressed = [p for p in files if read_context(p)[1].startswith("1.2.840.10008.1.2.4")]
    sop_class, _ts, sop = read_context(compressed[0])
    dest_ae = AE(ae_title="PLAIN")
    dest_ae.add_supported_context(sop_class, ["1.2.840.10008.1.2"])  # uncompressed only
    dest_ae.add_supported_context(VERIFICATION)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(cast(C_STORE, event.request).AffectedSOPInstanceUID))
        return 0x0000

    dest = _serve(dest_ae, ("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, on_store)])
    gw = _start(archive, destinations={"PLAIN": f"127.0.0.1:{dest.server_address[1]}"})
    try:
        host, port = gw.address
        assert not store_files(host, port, AET, [compressed[0]]).failed

        # half a P-DATA-TF PDU, then the connection drops
        assoc = _assoc(gw, VERIFICATION)
        assert assoc.is_established
        raw = assoc.dul.socket.socket
        raw.sendall(b"\x04\x00\x00\x00\x10\x00" + b"\x00" * 100)
        raw.close()
        assoc.abort()

        # a compressed instance is never transcoded: the sub-operation fails and is counted
        move = _assoc(gw, STUDY_ROOT_MOVE)
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = str(dcmread(compressed[0], stop_before_pixels=True).StudyInstanceUID)
        q.SeriesInstanceUID = str(dcmread(compressed[0], stop_before_pixels=True).SeriesInstanceUID)
        q.SOPInstanceUID = sop
        final = [s for s, _ in move.send_c_move(q, "PLAIN", STUDY_ROOT_MOVE)][-1]
        move.release()
        assert final.Status in (0xA702, 0xB000)
        assert int(final.NumberOfFailedSuboperations) == 1
        assert received == []
        echo = _assoc(gw, VERIFICATION)
        assert echo.send_c_echo().Status == 0x0000
        echo.release()
    finally:
        gw.stop()
        dest.shutdown()


def test_full_store_is_out_of_resources(tmp_path: Path) -> None:
    big = generate_instances(
        tmp_path / "gen", studies=1, series_per_study=1, instances_per_series=8
    )
    arc = Archive(tmp_path / "small", map_size=2 * 1024 * 1024, sync=False)
    gw = _start(arc)
    try:
        host, port = gw.address
        report = store_files(host, port, AET, big)
        assert report.failed, "a 2 MiB archive should fill up"
        assert any("A700" in msg.upper() for msg in report.failed.values()), report.failed
        echo = _assoc(gw, VERIFICATION)
        assert echo.send_c_echo().Status == 0x0000
        echo.release()
    finally:
        gw.stop()
        arc.close()


def test_duplicate_uid_keeps_versions_newest_wins(archive: Archive) -> None:
    from pydicom.data import get_testdata_file

    little = Path(str(get_testdata_file("MR_small.dcm", download=False)))
    big = Path(str(get_testdata_file("MR_small_bigendian.dcm", download=False)))
    assert read_context(little)[2] == read_context(big)[2]
    gw = _start(archive)
    try:
        host, port = gw.address
        assert not store_files(host, port, AET, [little]).failed
        assert not store_files(host, port, AET, [big]).failed
        sop = read_context(big)[2]
        record = archive.index.instance(sop)
        assert record is not None and len(record.versions) == 2
        study = str(dcmread(big, stop_before_pixels=True).StudyInstanceUID)
        contexts = [read_context(little)[:2], read_context(big)[:2]]
        got = get_study(host, port, AET, study, contexts)
        assert got[sop] == bytes(split_part10(big.read_bytes()).dataset)
    finally:
        gw.stop()
