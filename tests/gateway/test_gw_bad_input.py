"""Bad input at the DICOM boundary: a clear failure status or a dropped connection, never a
crash; nothing half-stored; the server keeps serving and earlier instances stay retrievable."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom.presentation import build_context

from p2pacs.archive import Archive
from p2pacs.config import Config
from p2pacs.dicom import build_prefix
from p2pacs.dicom.scu import get_study, read_context, store_files
from p2pacs.dicom.uids import VERIFICATION
from p2pacs.gateway import Gateway
from p2pacs.node import SiteNode
from p2pacs.samples import generate_instances
from p2pacs.site import Site

from gw_helpers import (
    AET,
    TIMEOUT,
    associate,
    associate_rq,
    dataset_bytes,
    header,
    running_gateway,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"


def _reference(gw: Gateway) -> tuple[Path, str]:
    """Store CT_small through the gateway; (its path, its study UID)."""
    path = Path(str(get_testdata_file("CT_small.dcm", download=False)))
    host, port = gw.address
    assert not store_files(host, port, AET, [path]).failed
    return path, str(header(path).StudyInstanceUID)


def _still_serving(gw: Gateway, path: Path, study: str) -> None:
    """C-ECHO answers and the reference instance comes back byte for byte."""
    echo = associate(gw, VERIFICATION)
    assert echo.is_established
    assert int(echo.send_c_echo().Status) == 0x0000
    echo.release()
    host, port = gw.address
    got = get_study(host, port, AET, study, [read_context(path)[:2]])
    assert got == {read_context(path)[2]: dataset_bytes(path)}


def _raw_file(tmp_path: Path, name: str, ts: str, body: bytes) -> Path:
    """A Part-10 file with valid file meta and ``body`` as its dataset bytes."""
    path = tmp_path / name
    path.write_bytes(build_prefix(CT, f"1.2.3.999.{len(name)}", ts) + body)
    return path


def test_garbage_datasets_are_refused_and_nothing_is_stored(
    gw_archive: Archive, tmp_path: Path
) -> None:
    element = struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 26) + b"1.2.840.10008.5.1.4.1.1.2\0"
    bad_files = [
        _raw_file(tmp_path, "junk.dcm", EXPLICIT, b"\xde\xad\xbe\xef" * 64),
        _raw_file(tmp_path, "cut.dcm", EXPLICIT, element[:-9]),  # value cut short
        _raw_file(tmp_path, "huge-length.dcm", EXPLICIT, element[:6] + b"\xff\xff" + element[8:]),
        _raw_file(tmp_path, "noinflate.dcm", DEFLATED, b"not deflate data at all!"),
        _raw_file(tmp_path, "only-class.dcm", EXPLICIT, element),  # no UIDs to file it under
    ]
    with running_gateway(gw_archive) as gw:
        path, study = _reference(gw)
        before = gw_archive.index.counts()
        host, port = gw.address
        report = store_files(host, port, AET, bad_files)
        assert not report.stored
        assert set(report.failed) == set(bad_files)
        for p, msg in report.failed.items():
            code = int(msg.removeprefix("status "), 16)
            assert code & 0xF000 == 0xC000, (p.name, msg)
        # a dataset that parses but lacks StudyInstanceUID / SeriesInstanceUID
        ds = Dataset()
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = "1.2.3.999.1"
        ds.PatientName = "NO^UIDS"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(EXPLICIT)
        assoc = associate(gw, (CT, [EXPLICIT]))
        assert assoc.is_established
        rsp = assoc.send_c_store(ds)
        assoc.release()
        assert int(rsp.Status) == 0xC210
        assert gw_archive.index.counts() == before
        assert gw_archive.index.instance("1.2.3.999.1") is None
        _still_serving(gw, path, study)


def _associate_rq(port: int, calling: str = "RAW") -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification."""
    cx = build_context(VERIFICATION)
    cx.context_id = 1
    return associate_rq(port, [cx], calling=calling)


def _connect(gw: Gateway) -> socket.socket:
    sock = socket.create_connection(gw.address, timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        assert chunk, "connection closed before a PDU arrived"
        head += chunk
    length = struct.unpack(">I", head[2:])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed mid-PDU"
        body += chunk
    return head[0], body


def _half_pdata() -> bytes:
    """The first part of a P-DATA-TF PDU that announces 1000 bytes."""
    return b"\x04\x00" + struct.pack(">I", 1000) + struct.pack(">I", 996) + b"\x01\x03" + b"\0" * 90


def test_truncated_and_foreign_connections_leave_the_server_serving(gw_archive: Archive) -> None:
    with running_gateway(gw_archive) as gw:
        path, study = _reference(gw)
        rq = _associate_rq(gw.address[1])
        # associated, then half a P-DATA-TF PDU, then the connection drops
        with _connect(gw) as sock:
            sock.sendall(rq)
            assert _read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
            sock.sendall(_half_pdata())
        # half an A-ASSOCIATE-RQ, then the connection drops
        with _connect(gw) as sock:
            sock.sendall(rq[: len(rq) // 2])
        # not DICOM at all
        with _connect(gw) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(TIMEOUT)
            try:
                data = sock.recv(4096)  # an A-ABORT (0x07), or the connection just closes
            except ConnectionResetError:
                data = b""
            assert data[:1] in (b"", b"\x07")
        # a peer that stalls mid-PDU and stays connected does not block anyone else
        with _connect(gw) as stalled:
            stalled.sendall(rq)
            assert _read_pdu(stalled)[0] == 0x02
            stalled.sendall(_half_pdata())
            _still_serving(gw, path, study)
        _still_serving(gw, path, study)


def test_calling_ae_not_allowed_is_rejected(gw_archive: Archive) -> None:
    with running_gateway(gw_archive, allowed_calling_aets=["GOOD"]) as gw:
        good = associate(gw, VERIFICATION, aet="GOOD")
        assert good.is_established
        assert int(good.send_c_echo().Status) == 0x0000
        good.release()
        assert associate(gw, VERIFICATION, aet="EVIL").is_rejected
        with _connect(gw) as sock:
            sock.sendall(_associate_rq(gw.address[1], calling="EVIL"))
            kind, body = _read_pdu(sock)
        # A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE not recognised
        assert (kind, body[1], body[2], body[3]) == (0x03, 1, 1, 3)


@pytest.mark.asyncio
async def test_full_archive_answers_out_of_resources(tmp_path: Path) -> None:
    """A site whose store is full answers 0xA700; what it had stored stays intact."""
    files = generate_instances(
        tmp_path / "gen", studies=1, series_per_study=1, instances_per_series=8, seed=21
    )  # 8 x 0.5 MB against a 2 MiB store
    config = Config()
    config.store.map_size = 2 * 1024 * 1024
    config.store.sync = False
    config.dicom.ae_title = AET
    config.dicom.bind = "127.0.0.1"
    config.dicom.port = 0
    config.dicom.workers = 1  # the in-process gateway (node.gateway)
    site = Site.init(tmp_path / "site", config)
    async with SiteNode(site) as node:
        assert node.gateway is not None and node.archive is not None
        gw, archive = node.gateway, node.archive
        host, port = gw.address
        report = store_files(host, port, AET, files)
        assert report.stored, "the first instances fit"
        assert report.failed, "a 2 MiB store must fill up"
        assert set(report.failed.values()) == {"status 0xA700"}, report.failed
        stored = {read_context(p)[2]: dataset_bytes(p) for p in report.stored}
        assert archive.index.counts()[2] == len(stored)
        for p in report.failed:
            assert archive.index.instance(read_context(p)[2]) is None
        study = str(header(files[0]).StudyInstanceUID)
        got = get_study(host, port, AET, study, [read_context(files[0])[:2]])
        assert got == stored
        echo = associate(gw, VERIFICATION)
        assert int(echo.send_c_echo().Status) == 0x0000
        echo.release()
