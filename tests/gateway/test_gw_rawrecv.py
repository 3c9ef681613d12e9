"""The C-STORE receive fast path (``gateway/rawrecv.py``): the pure parts against pynetdicom's
own encoders, then real associations: data sets in any fragmentation stored byte for byte,
other messages still served by pynetdicom, and every malformed P-DATA-TF aborting the
association with nothing stored while the gateway keeps serving."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import build_context

from p2pacs.archive import Archive
from p2pacs.config import DicomConfig
from p2pacs.dicom import build_prefix, split_part10
from p2pacs.dicom.uids import VERIFICATION
from p2pacs.gateway import Gateway
from p2pacs.gateway.rawrecv import (
    DatasetBuffer,
    InvalidPduError,
    pdv_header,
    store_request,
    store_response_command,
)
from p2pacs.store.blobs import hash_bytes

from gw_helpers import AET, TIMEOUT, associate, associate_rq, running_gateway

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
CT_UID = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"  # CT_small's SOP Instance UID


def _ct_small() -> tuple[Path, bytes]:
    path = Path(str(get_testdata_file("CT_small.dcm", download=False)))
    return path, bytes(split_part10(path.read_bytes()).dataset)


def _store_rq(
    message_id: int = 7, sop_uid: str = CT_UID, originator: str | None = None
) -> tuple[bytes, C_STORE]:
    """A C-STORE-RQ command set as pynetdicom encodes it, and the primitive it came from."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Priority = 2
    primitive.DataSet = BytesIO(b"\0\0")
    if originator is not None:
        primitive.MoveOriginatorApplicationEntityTitle = originator
        primitive.MoveOriginatorMessageID = 3
    msg = C_STORE_RQ()
    msg.primitive_to_message(primitive)
    command = encode(msg.command_set, True, True)
    assert command is not None
    return command, primitive


# --- pure parts ----------------------------------------------------------------------------------


def test_pdv_header_accepts_items_that_fit_and_refuses_the_rest() -> None:
    head = struct.pack(">LBB", 102, 1, 0x02)
    assert pdv_header(head, 106) == (100, 1, 0x02)
    assert pdv_header(head, 4000) == (100, 1, 0x02)
    with pytest.raises(InvalidPduError, match="left of its PDU"):
        pdv_header(head, 105)
    with pytest.raises(InvalidPduError, match="at least 2"):
        pdv_header(struct.pack(">LBB", 1, 1, 0), 100)


@pytest.mark.parametrize("originator", [None, "MOVER"])
@pytest.mark.parametrize("sop_uid", [CT_UID, "1.2.3.4"])  # even and odd (padded) lengths
def test_store_request_reads_what_pynetdicom_encodes(sop_uid: str, originator: str | None) -> None:
    command, sent = _store_rq(sop_uid=sop_uid, originator=originator)
    parsed = store_request(command)
    assert parsed is not None and parsed.has_dataset
    got = parsed.primitive(BytesIO(b"xy"), 3)
    # what pynetdicom itself makes of the same bytes
    msg = C_STORE_RQ()
    msg.command_set = decode(BytesIO(command), True, True)
    msg.context_id = 3
    msg.data_set = BytesIO(b"xy")
    theirs = msg.message_to_primitive()
    for keyword in (
        "MessageID",
        "AffectedSOPClassUID",
        "AffectedSOPInstanceUID",
        "Priority",
        "MoveOriginatorApplicationEntityTitle",
        "MoveOriginatorMessageID",
    ):
        assert getattr(got, keyword) == getattr(theirs, keyword) == getattr(sent, keyword)
    assert got._context_id == 3
    assert got.DataSet is not None and got.DataSet.getvalue() == b"xy"


def test_store_request_leaves_everything_else_to_pynetdicom() -> None:
    command, _ = _store_rq()
    assert store_request(command[:-3]) is None  # cut inside the last element
    assert store_request(command + command[12:30]) is None  # an element twice
    echo = struct.pack("<HHL", 0, 0x0100, 2) + struct.pack("<H", 0x0030)  # C-ECHO-RQ
    assert store_request(echo) is None
    rare = command + struct.pack("<HHL", 0, 0x0902, 4) + b"oops"  # not a C-STORE-RQ element
    assert store_request(rare) is None
    assert store_request(struct.pack("<HHL", 2, 0x0010, 0)) is None  # not group 0000


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC210])
def test_store_response_command_is_byte_identical_to_pynetdicom(status: int) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 9
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = "1.2.3.45"
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    assert store_response_command(rsp) == encode(msg.command_set, True, True)
    rsp.ErrorComment = "refused"
    assert store_response_command(rsp) is None  # rare elements: pynetdicom encodes them
    request = C_STORE()
    request.MessageID = 1
    assert store_response_command(request) is None


def test_dataset_buffer_grows_in_place_and_hands_over_without_a_copy() -> None:
    data = bytes(range(256)) * 1000
    buffer = DatasetBuffer(1000)
    pos = 0
    for size in (10, 990, 5000, 0, 100_000, len(data) - 106_000):

        def read_into(view: memoryview, start: int = pos) -> None:
            view[:] = data[start : start + len(view)]

        buffer.fill(size, read_into)
        pos += size
    out = buffer.finish()
    value = out.getvalue()
    assert value == data
    assert out.getvalue() is value  # the buffer itself, not a copy
    assert out.read(4) == data[:4]  # a plain BytesIO for anything else that reads it


# --- real associations ---------------------------------------------------------------------------


def _server_reader(gw: Gateway) -> Any:
    server = gw._server
    assert server is not None
    (assoc,) = server.active_associations
    return assoc.p2pacs_reader


def _uid(n: int) -> str:
    """A SOP Instance UID as long as CT_small's, so swapping it in moves nothing."""
    return f"{CT_UID[:-5]}{n:05d}"


def _swap_uid(data: bytes, uid: str) -> bytes:
    """CT_small's data set with another SOP Instance UID."""
    assert len(uid) == len(CT_UID) and data.count(CT_UID.encode()) == 1
    return data.replace(CT_UID.encode(), uid.encode())


def _instance_file(tmp_path: Path, uid: str) -> tuple[Path, bytes]:
    """CT_small under another SOP Instance UID as a Part-10 file; (path, data set bytes)."""
    _, ct = _ct_small()
    data = _swap_uid(ct, uid)
    path = tmp_path / f"{uid}.dcm"
    path.write_bytes(build_prefix(CT, uid, EXPLICIT) + data)
    return path, data


@contextmanager
def _gateway(
    archive: Archive,
    max_pdu: int = 0,
    handlers: list[Any] | None = None,
    network_timeout: float = TIMEOUT,
) -> Iterator[Gateway]:
    """A gateway on port 0 accepting PDUs of at most ``max_pdu`` bytes (0: any), with extra
    ``handlers`` bound."""
    config = DicomConfig(
        ae_title=AET, port=0, bind="127.0.0.1", max_pdu=max_pdu, network_timeout=network_timeout
    )
    gw = Gateway(archive, config)
    gw.handlers.extend(handlers or [])
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def _stored_hashes(archive: Archive, uid: str) -> list[str]:
    stored = archive.index.instance(uid)
    return [] if stored is None else [v.hash for v in stored.versions]


@pytest.mark.parametrize("max_pdu", [0, 4096, 16382, 131072])
def test_instances_arrive_byte_for_byte_in_any_fragmentation(
    gw_archive: Archive, tmp_path: Path, raw_sends: None, max_pdu: int
) -> None:
    files = [_instance_file(tmp_path, _uid(i)) for i in range(3)]
    with _gateway(gw_archive, max_pdu) as gw:
        assoc = associate(gw, (CT, [EXPLICIT]), VERIFICATION)
        assert assoc.is_established
        try:
            for path, _ in files:
                assert int(assoc.send_c_store(path).Status) == 0x0000
            assert int(assoc.send_c_echo().Status) == 0x0000  # handed to pynetdicom
            reader = _server_reader(gw)
            assert (reader.fast_messages, reader.passed_messages) == (3, 1)
            assert reader.fast_responses == 3
        finally:
            assoc.release()
    for i, (_, data) in enumerate(files):
        assert _stored_hashes(gw_archive, _uid(i)) == [hash_bytes(data)]


def test_a_watched_association_takes_pynetdicom_path(
    gw_archive: Archive, tmp_path: Path, raw_sends: None
) -> None:
    path, data = _instance_file(tmp_path, _uid(5))
    seen: list[Any] = []
    watch = [(evt.EVT_PDU_RECV, lambda event: seen.append(event.pdu))]
    with _gateway(gw_archive, handlers=watch) as gw:
        assoc = associate(gw, (CT, [EXPLICIT]))
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(path).Status) == 0x0000
            reader = _server_reader(gw)
            assert (reader.fast_messages, reader.fast_responses) == (0, 0)
        finally:
            assoc.release()
    assert seen  # the handler saw the PDUs
    assert _stored_hashes(gw_archive, _uid(5)) == [hash_bytes(data)]


# --- hand-built PDUs on a raw socket -------------------------------------------------------------


def _associate_rq(port: int) -> bytes:
    """An A-ASSOCIATE-RQ proposing CT Image Storage (context 1, explicit VR little endian)
    and Verification (context 3), with no maximum PDU length."""
    ct = build_context(CT, [EXPLICIT])
    ct.context_id = 1
    echo = build_context(VERIFICATION)
    echo.context_id = 3
    return associate_rq(port, [ct, echo], max_length=0)


def _pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment


def _pdu(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(PDU type, body), or (0, b"") when the connection closed."""
    data = b""
    while len(data) < 6:
        try:
            chunk = sock.recv(6 - len(data))
        except ConnectionResetError:
            return 0, b""
        if not chunk:
            return 0, b""
        data += chunk
    kind, _, length = struct.unpack(">BBL", data)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed mid-PDU"
        body += chunk
    return kind, body


@contextmanager
def _raw_association(gw: Gateway) -> Iterator[socket.socket]:
    sock = socket.create_connection(gw.address, timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.sendall(_associate_rq(gw.address[1]))
        assert _read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        yield sock
    finally:
        sock.close()


def _status(body: bytes) -> int:
    """The Status of the C-STORE-RSP in a P-DATA-TF body (one command PDV)."""
    return int(decode(BytesIO(body[6:]), True, True).Status)


def _fragments(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_hand_built_fragmentations_are_stored(gw_archive: Archive) -> None:
    _, ct = _ct_small()
    shapes = {
        # command and the whole data set in one PDU
        _uid(11): [_pdu(_pdv(1, 0x03, b"CMD"), _pdv(1, 0x02, b"DATA"))],
        # the command split over two PDUs, the data set in many PDVs of one PDU
        _uid(12): [
            _pdu(_pdv(1, 0x01, b"CMD1")),
            _pdu(_pdv(1, 0x03, b"CMD2")),
            _pdu(*(_pdv(1, 0x00, b"PIECE") for _ in range(9)), _pdv(1, 0x02, b"END")),
        ],
        # the data set's last fragment and the next message's command in one PDU: the echo
        _uid(13): [
            _pdu(_pdv(1, 0x03, b"CMD"), _pdv(1, 0x00, b"PIECE")),
            _pdu(_pdv(1, 0x02, b"END"), _pdv(3, 0x03, b"ECHO")),
        ],
    }
    with running_gateway(gw_archive) as gw, _raw_association(gw) as sock:
        for n, (uid, template) in enumerate(shapes.items()):
            command, _ = _store_rq(message_id=n + 1, sop_uid=uid)
            data = _swap_uid(ct, uid)
            sock.sendall(_fill(template, command, data))
            kind, body = _read_pdu(sock)
            assert kind == 0x04 and _status(body) == 0x0000, uid
            assert _stored_hashes(gw_archive, uid) == [hash_bytes(data)]
        kind, body = _read_pdu(sock)  # the C-ECHO-RSP to the last shape's second message
        assert kind == 0x04 and _status(body) == 0x0000
        assert int(decode(BytesIO(body[6:]), True, True).CommandField) == 0x8030


def _echo_rq(message_id: int) -> bytes:
    body = struct.pack("<HHL", 0, 0x0002, 18) + VERIFICATION.encode() + b"\0"
    body += struct.pack("<HHLH", 0, 0x0100, 2, 0x0030)
    body += struct.pack("<HHLH", 0, 0x0110, 2, message_id)
    body += struct.pack("<HHLH", 0, 0x0800, 2, 0x0101)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _fill(templates: list[bytes], command: bytes, data: bytes) -> bytes:
    """The templates' placeholder fragments made real: CMD (CMD1, CMD2: its halves) the
    command set, ECHO a C-ECHO-RQ, PIECE/DATA/END consecutive parts of the data set."""
    parsed = []
    for template in templates:
        pos, pdvs = 6, []
        while pos < len(template):
            item, cx, control = struct.unpack_from(">LBB", template, pos)
            pdvs.append((cx, control, template[pos + 6 : pos + 4 + item]))
            pos += 4 + item
        parsed.append(pdvs)
    pieces = sum(1 for pdvs in parsed for _, _, f in pdvs if f in (b"PIECE", b"DATA", b"END"))
    chunks = _fragments(data, -(-len(data) // pieces))
    half = len(command) // 2
    fixed = {
        b"CMD": command,
        b"CMD1": command[:half],
        b"CMD2": command[half:],
        b"ECHO": _echo_rq(99),
    }
    out = b""
    for pdvs in parsed:
        out += _pdu(*(_pdv(cx, c, fixed[f] if f in fixed else chunks.pop(0)) for cx, c, f in pdvs))
    assert not chunks
    return out


MALFORMED: dict[str, Any] = {
    "pdv-longer-than-pdu": lambda cmd, data: (
        struct.pack(">BBL", 0x04, 0, 20) + struct.pack(">LBB", 100, 1, 0x03) + b"x" * 14
    ),
    "data-before-command": lambda cmd, data: _pdu(_pdv(1, 0x02, data)),
    "command-inside-data": lambda cmd, data: (
        _pdu(_pdv(1, 0x03, cmd), _pdv(1, 0x00, data[:100])) + _pdu(_pdv(1, 0x03, cmd))
    ),
    "context-switch": lambda cmd, data: (
        _pdu(_pdv(1, 0x03, cmd), _pdv(1, 0x00, data[:100])) + _pdu(_pdv(3, 0x02, data[100:]))
    ),
    "pdv-header-cut": lambda cmd, data: struct.pack(">BBL", 0x04, 0, 4) + b"\0\0\0\0",
    "unknown-pdu-type": lambda cmd, data: struct.pack(">BBL", 0x09, 0, 2) + b"\0\0",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_pdata_aborts_and_stores_nothing(gw_archive: Archive, name: str) -> None:
    _, ct = _ct_small()
    uid = _uid(21)
    command, _ = _store_rq(sop_uid=uid)
    with running_gateway(gw_archive) as gw:
        with _raw_association(gw) as sock:
            sock.sendall(MALFORMED[name](command, _swap_uid(ct, uid)))
            kind, _ = _read_pdu(sock)
            assert kind in (0, 0x07)  # an A-ABORT, or the connection just closes
        assert gw_archive.index.instance(uid) is None
        _echo(gw)


def test_connection_closed_mid_dataset_stores_nothing(gw_archive: Archive) -> None:
    _, ct = _ct_small()
    uid = _uid(22)
    command, _ = _store_rq(sop_uid=uid)
    data = _swap_uid(ct, uid)
    with running_gateway(gw_archive) as gw:
        with _raw_association(gw) as sock:
            whole = _pdu(_pdv(1, 0x03, command), _pdv(1, 0x02, data))
            sock.sendall(whole[: len(whole) - 1000])
        # the server notices the close: a fresh association is served meanwhile and after
        _echo(gw)
        assert gw_archive.index.instance(uid) is None


@pytest.mark.parametrize("where", ["mid-pdu", "between-pdus"])
def test_a_peer_stalling_mid_message_is_aborted_after_the_network_timeout(
    gw_archive: Archive, where: str
) -> None:
    _, ct = _ct_small()
    uid = _uid(23)
    command, _ = _store_rq(sop_uid=uid)
    data = _swap_uid(ct, uid)
    first = _pdu(_pdv(1, 0x03, command), _pdv(1, 0x00, data[:1000]))
    second = _pdu(_pdv(1, 0x02, data[1000:]))
    sent = first + second[: len(second) // 2] if where == "mid-pdu" else first
    with _gateway(gw_archive, network_timeout=1.0) as gw:
        with _raw_association(gw) as sock:
            sock.sendall(sent)  # and then nothing more, the connection left open
            sock.settimeout(15.0)
            kind, _ = _read_pdu(sock)
            assert kind in (0, 0x07)  # the gateway gave up on it: A-ABORT, or closed
        assert gw_archive.index.instance(uid) is None
        _echo(gw)


def _echo(gw: Gateway) -> None:
    echo = associate(gw, VERIFICATION)
    assert echo.is_established
    assert int(echo.send_c_echo().Status) == 0x0000
    echo.release()
