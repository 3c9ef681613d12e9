"""The direct send path of C-GET/C-MOVE (``gateway/rawsend.py``): stored chunks framed and
written by the sending thread, responses read by it.

The pure parts (command sets, P-DATA-TF framing, C-STORE-RSP parsing) are checked against
pynetdicom's own encoder; the rest over real associations on port 0: a blob of several LMDB
chunks sent byte for byte over C-GET (small PDUs, fragments straddling chunk boundaries) and
C-MOVE, a corrupt blob refused (or served once repaired), and a C-CANCEL that arrives while
the sender is reading the response to a C-STORE.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode

from p2pacs.archive import Archive
from p2pacs.dicom.scu import association_handlers
from p2pacs.dicom.uids import STUDY_ROOT_GET, STUDY_ROOT_MOVE
from p2pacs.gateway.dimsewire import command_set, pdata_frames, store_response
from p2pacs.samples import generate_instances
from p2pacs.store.layout import chunk_key, digest_of

from gw_helpers import (
    AET,
    TIMEOUT,
    contexts_of,
    dataset_bytes,
    identifier,
    move_into,
    running_gateway,
    suboperations,
)

CT = "1.2.840.10008.5.1.4.1.1.2"


def _pynetdicom_command(primitive: Any) -> bytes:
    table = _RQ_TO_MESSAGE if primitive.MessageIDBeingRespondedTo is None else _RSP_TO_MESSAGE
    msg = table[type(primitive)]()
    msg.primitive_to_message(primitive)
    return bytes(encode(msg.command_set, True, True))


def test_command_sets_are_pynetdicoms() -> None:
    rq = C_STORE()
    rq.MessageID, rq.Priority, rq.DataSet = 7, 0, BytesIO(b"")
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = CT, "1.2.3.45"
    assert command_set(rq) is not None and command_set(rq)[0] == _pynetdicom_command(rq)
    rq.MoveOriginatorApplicationEntityTitle, rq.MoveOriginatorMessageID = "MOVESCU", 3
    assert command_set(rq)[0] == _pynetdicom_command(rq)  # type: ignore[index]
    for cls in (C_GET, C_MOVE):
        rsp = cls()
        rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPClassUID = 1, STUDY_ROOT_GET
        rsp.Status, rsp.NumberOfRemainingSuboperations = 0xFF00, 3
        rsp.NumberOfCompletedSuboperations = 1
        rsp.NumberOfFailedSuboperations = rsp.NumberOfWarningSuboperations = 0
        assert command_set(rsp)[0] == _pynetdicom_command(rsp)  # type: ignore[index]
        rsp.Status, rsp.NumberOfRemainingSuboperations = 0xB000, None
        assert command_set(rsp)[0] == _pynetdicom_command(rsp)  # type: ignore[index]
        rsp.ErrorComment = "rare: left to pynetdicom"
        assert command_set(rsp) is None


def _reassemble(frames: list[Any]) -> list[tuple[int, int, bytes]]:
    """(context ID, control header, data) of each PDU written."""
    wire = b"".join(bytes(f) for f in frames)
    out, pos = [], 0
    while pos < len(wire):
        kind, _, length = struct.unpack_from(">BBL", wire, pos)
        item, cx, control = struct.unpack_from(">LBB", wire, pos + 6)
        assert kind == 0x04 and item == length - 4
        out.append((cx, control, wire[pos + 12 : pos + 6 + length]))
        pos += 6 + length
    return out


def test_pdata_frames_fragment_across_chunks_without_copies() -> None:
    chunks = [bytes(range(256)) * 40, b"x" * 7, bytes(5000)]  # 10240 + 7 + 5000 bytes
    frames = pdata_frames(5, chunks, 0, 4096)
    pdus = _reassemble(frames)
    assert b"".join(d for _, _, d in pdus) == b"".join(chunks)
    assert all(len(d) <= 4090 for _, _, d in pdus)  # max PDU 4096: 6 bytes of PDV header
    assert [c for _, c, _ in pdus] == [0] * (len(pdus) - 1) + [2]  # last fragment flagged
    assert {cx for cx, _, _ in pdus} == {5}
    payload = [f for f in frames if isinstance(f, memoryview)]
    assert sum(len(f) for f in payload) == sum(map(len, chunks))  # views of the chunks
    (whole,) = _reassemble(pdata_frames(1, [b"cmd!"], 1, 0))  # 0: no maximum
    assert whole == (1, 3, b"cmd!")
    with pytest.raises(ValueError):
        pdata_frames(1, [b"x"], 0, 6)


def test_store_response_parsing() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 9, 0x0000
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = CT, "1.2.3"
    command = _pynetdicom_command(rsp)
    parsed = store_response(command, 9)
    assert parsed is not None and parsed.Status == 0 and parsed.MessageIDBeingRespondedTo == 9
    assert store_response(command, 8) is None  # answers another request: pynetdicom's
    assert store_response(command[:-3], 9) is None  # truncated
    rsp.Status, rsp.ErrorComment = 0xA700, "disk full"
    parsed = store_response(_pynetdicom_command(rsp), 9)
    assert parsed is not None and parsed.Status == 0xA700 and parsed.ErrorComment == "disk full"
    cancel = _pynetdicom_command(rsp).replace(b"\x01\x80", b"\xff\x0f")  # a C-CANCEL-RQ
    assert store_response(cancel, 9) is None


@pytest.fixture
def big(gw_archive: Archive, tmp_path: Path) -> tuple[Archive, list[Path]]:
    """Two 2 MiB CT instances (1024 x 1024, 16 bits: three 1 MiB chunks each) and a small one."""
    files = generate_instances(
        tmp_path / "big", studies=1, series_per_study=1, instances_per_series=2,
        rows=1024, columns=1024, implicit_vr_every=0,
    )  # fmt: skip
    files += generate_instances(
        tmp_path / "small", studies=1, series_per_study=1, instances_per_series=1, seed=1
    )
    for f in files:
        gw_archive.import_file(f)
    return gw_archive, files


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _study(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def c_get(
    gw: Any, study: str, *, max_pdu: int, on_first: Any = None
) -> tuple[dict[str, bytes], list[Any]]:
    """C-GET of a study by a pynetdicom SCU receiving PDUs of at most ``max_pdu`` bytes."""
    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        if on_first is not None and len(received) == 1:
            on_first(event)
        return 0x0000

    host, port = gw.address
    assoc = ae.associate(
        host, port, ae_title=AET, max_pdu=max_pdu, ext_neg=[build_role(CT, scp_role=True)],
        evt_handlers=[*association_handlers(), (evt.EVT_C_STORE, on_store)],
    )  # fmt: skip
    assert assoc.is_established
    try:
        query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
        rsps = [st for st, _ in assoc.send_c_get(query, STUDY_ROOT_GET)]
    finally:
        assoc.release()
    return received, rsps


def test_multichunk_blob_byte_identical_over_get_and_move(
    big: tuple[Archive, list[Path]],
) -> None:
    archive, files = big
    large = files[:2]
    rec = archive.index.instance(_sop(large[0]))
    assert rec is not None and archive.blobs.info(rec.current.hash).chunks == 3
    study = _study(large[0])
    with running_gateway(archive) as gw:
        for max_pdu in (16382, 0):  # fragments straddle chunk boundaries; one PDV of 2 MiB
            got, rsps = c_get(gw, study, max_pdu=max_pdu)
            assert int(rsps[-1].Status) == 0 and suboperations(rsps[-1]) == (2, 0, 0)
            assert {s: d for s, d in got.items()} == {_sop(p): dataset_bytes(p) for p in large}
        moved, dest = move_into(
            gw, STUDY_ROOT_MOVE, "DEST", contexts_of(large),
            QueryRetrieveLevel="STUDY", StudyInstanceUID=study,
        )  # fmt: skip
        assert int(moved[-1].Status) == 0 and suboperations(moved[-1]) == (2, 0, 0)
        assert {s: d for s, (_, d) in dest.received.items()} == {
            _sop(p): dataset_bytes(p) for p in large
        }


def _corrupt(archive: Archive, h: str, n: int = 1) -> bytes:
    """Flip one byte of chunk ``n`` of blob ``h``; returns the good chunk."""
    key = chunk_key(digest_of(h), n)
    chunks = archive.blobs._chunks  # type: ignore[attr-defined]
    with archive.db.env.begin(write=True) as txn:
        good = bytes(txn.get(key, db=chunks))
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0xFF
        txn.put(key, bytes(bad), db=chunks)
    return good


def test_corrupt_blob_is_never_sent_and_is_sent_once_repaired(
    big: tuple[Archive, list[Path]],
) -> None:
    archive, files = big
    large = files[:2]
    bad_sop, good_sop = _sop(large[0]), _sop(large[1])
    rec = archive.index.instance(bad_sop)
    assert rec is not None
    h = rec.current.hash
    good_chunk = _corrupt(archive, h)
    study = _study(large[0])
    with running_gateway(archive) as gw:
        got, rsps = c_get(gw, study, max_pdu=0)
        assert set(got) == {good_sop}  # the corrupt one never reaches the wire
        assert int(rsps[-1].Status) == 0xB000 and suboperations(rsps[-1]) == (1, 1, 0)
        moved, dest = move_into(
            gw, STUDY_ROOT_MOVE, "DEST", contexts_of(large),
            QueryRetrieveLevel="STUDY", StudyInstanceUID=study,
        )  # fmt: skip
        assert set(dest.received) == {good_sop} and suboperations(moved[-1]) == (1, 1, 0)

        repaired: list[str] = []

        def repair(blob: str) -> bool:  # as a federation's hook: put the good bytes back
            key = chunk_key(digest_of(blob), 1)
            with archive.db.env.begin(write=True) as txn:
                txn.put(key, good_chunk, db=archive.blobs._chunks)  # type: ignore[attr-defined]
            repaired.append(blob)
            return True

        archive.repair_hook = repair
        try:
            got, rsps = c_get(gw, study, max_pdu=16382)
        finally:
            archive.repair_hook = None
        assert repaired == [h]
        assert int(rsps[-1].Status) == 0 and got == {_sop(p): dataset_bytes(p) for p in large}


def test_cancel_while_a_response_is_awaited(gw_archive: Archive, tmp_path: Path) -> None:
    """The C-CANCEL arrives before the C-STORE-RSP the sender is reading: it goes back to
    pynetdicom, the response is still taken, and the C-GET ends with 0xFE00."""
    files = generate_instances(
        tmp_path / "src", studies=1, series_per_study=1, instances_per_series=12,
        rows=64, columns=64, implicit_vr_every=0,
    )  # fmt: skip
    for f in files:
        gw_archive.import_file(f)

    def cancel(event: evt.Event) -> None:
        event.assoc.send_c_cancel(1, query_model=STUDY_ROOT_GET)  # before the response

    with running_gateway(gw_archive) as gw:
        got, rsps = c_get(gw, _study(files[0]), max_pdu=0, on_first=cancel)
        assert int(rsps[-1].Status) == 0xFE00
        assert 1 <= len(got) < len(files)
        # the association is still usable: a second C-GET of the study gets every instance
        got, rsps = c_get(gw, _study(files[0]), max_pdu=0)
        assert int(rsps[-1].Status) == 0 and len(got) == len(files)
