"""C-STORE sub-operations answered by the sending thread (``rawsend._Writer.store``).

pynetdicom's ``send_c_store`` pauses the association's reactor before every request and waits
until it is paused (its loop sleeps 1 ms a turn); on a C-MOVE sub-association that wait came on
every instance. The direct writer reads the response itself, so it pauses nothing, except when
the response cannot be read in one piece and pynetdicom's reader must take it. Checked over
real associations on port 0 to a pynetdicom storage SCP: the pure command-set packing against
pynetdicom's encoder, the pauses counted on the association's own checkpoint, and every byte
compared with what was stored.
"""

from __future__ import annotations

import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from p2pacs.dicom import split_part10
from p2pacs.dicom.scu import association_handlers
from p2pacs.gateway.dimsewire import command_set, plain_store_status, store_request
from p2pacs.gateway.rawsend import StoredInstance, direct_writes
from p2pacs.samples import generate_instances

from gw_helpers import TIMEOUT, StorageSCP, contexts_of, dataset_bytes

CT = "1.2.840.10008.5.1.4.1.1.2"


def _encoded(command_set: Dataset) -> bytes:
    """A command set as pynetdicom encodes it (implicit VR little endian)."""
    raw = encode(command_set, True, True)
    assert raw is not None
    return bytes(raw)


def test_store_request_is_pynetdicoms() -> None:
    for aet, origin in ((None, None), ("MOVESCU", 3), ("ODD", 65535), ("PADDED  ", 1)):
        for sop_uid in ("1.2.3.45", "1.2.3.4"):  # odd and even lengths (UI pads with NUL)
            rq = C_STORE()
            rq.MessageID, rq.Priority, rq.DataSet = 7, 2, BytesIO(b"")
            rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = CT, sop_uid
            if aet is not None:
                rq.MoveOriginatorApplicationEntityTitle, rq.MoveOriginatorMessageID = aet, origin
            msg = _RQ_TO_MESSAGE[C_STORE]()
            msg.primitive_to_message(rq)
            expected = _encoded(msg.command_set)
            fast = command_set(rq)
            assert fast is not None and fast[0] == expected
            packed = store_request(
                CT, sop_uid, 7, priority=2, originator_aet=aet, originator_id=origin
            )
            assert packed == expected, (aet, sop_uid)


def _response(status: int, message_id: int = 9, **extra: Any) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = message_id, status
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = CT, "1.2.3"
    for k, v in extra.items():
        setattr(rsp, k, v)
    msg = _RSP_TO_MESSAGE[C_STORE]()
    msg.primitive_to_message(rsp)
    return _encoded(msg.command_set)


def test_plain_store_status() -> None:
    assert plain_store_status(_response(0x0000), 9) == 0x0000
    assert plain_store_status(memoryview(_response(0xA700)), 9) == 0xA700
    assert plain_store_status(_response(0x0000), 8) is None  # answers another request
    assert plain_store_status(_response(0x0000)[:-2], 9) is None  # truncated
    # anything worth reporting is left to pynetdicom's decoder (``store_response``)
    assert plain_store_status(_response(0xB000, ErrorComment="coerced"), 9) is None


class _Checkpoint(threading.Event):
    """An association's reactor checkpoint that counts how often it was cleared (paused)."""

    def __init__(self) -> None:
        super().__init__()
        self.set()
        self.pauses = 0

    def clear(self) -> None:
        self.pauses += 1
        super().clear()


class _WarningSCP(StorageSCP):
    """Answers each C-STORE with Warning 0xB000 and an Error Comment (a non-plain response)."""

    def _on_store(self, event: evt.Event) -> Any:
        super()._on_store(event)
        status = Dataset()
        status.Status = 0xB000
        status.ErrorComment = "kept with coercion"
        return status


def _stored(path: Path) -> StoredInstance:
    part = split_part10(path.read_bytes())
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return StoredInstance(
        str(header.SOPClassUID),
        str(header.SOPInstanceUID),
        part.transfer_syntax,
        part.prefix,
        bytes(part.dataset),
    )


def _associate(dest: StorageSCP, files: list[Path], max_pdu: int) -> Association:
    """A requestor association with direct writes, as the gateway opens to a C-MOVE
    destination, its reactor checkpoint replaced by a counting one."""
    ae = AE(ae_title="P2PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    for sop_class, syntaxes in contexts_of(files).items():
        for ts in sorted(syntaxes):
            ae.add_requested_context(sop_class, [ts])
    host, port = dest.address.rsplit(":", 1)
    assoc = ae.associate(
        host, int(port), ae_title=dest.aet, max_pdu=max_pdu,
        evt_handlers=[*association_handlers(), (evt.EVT_ESTABLISHED, direct_writes)],
    )  # fmt: skip
    assert assoc.is_established
    assoc._reactor_checkpoint = _Checkpoint()
    return assoc


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return generate_instances(
        tmp_path / "src", studies=1, series_per_study=2, instances_per_series=4,
        rows=64, columns=64, implicit_vr_every=2,
    )  # fmt: skip


def _send(assoc: Association, files: list[Path]) -> tuple[list[Dataset], int]:
    """Each file sent as a stored instance: the statuses, and how often the reactor was
    paused meanwhile (the release at the end pauses it too, as it should)."""
    checkpoint = assoc._reactor_checkpoint
    assert isinstance(checkpoint, _Checkpoint)
    try:
        statuses = [
            assoc.send_c_store(_stored(f), msg_id=i + 1, originator_aet="MOVESCU", originator_id=5)
            for i, f in enumerate(files)
        ]
        return statuses, checkpoint.pauses
    finally:
        assoc.release()


def test_stored_instances_go_without_pausing_the_reactor(files: list[Path]) -> None:
    with StorageSCP("DEST", contexts_of(files)) as dest:
        statuses, pauses = _send(_associate(dest, files, max_pdu=0), files)
    assert [int(s.Status) for s in statuses] == [0] * len(files)
    assert pauses == 0
    expected = {}
    for f in files:
        header = pydicom.dcmread(f, stop_before_pixels=True)
        ts = str(header.file_meta.TransferSyntaxUID)
        expected[str(header.SOPInstanceUID)] = (ts, dataset_bytes(f))
    assert dest.received == expected


def test_a_response_with_a_comment_is_decoded_as_pynetdicom_does(files: list[Path]) -> None:
    with _WarningSCP("DEST", contexts_of(files)) as dest:
        statuses, pauses = _send(_associate(dest, files[:2], max_pdu=0), files[:2])
    assert pauses == 0
    assert [(int(s.Status), str(s.ErrorComment)) for s in statuses] == [
        (0xB000, "kept with coercion")
    ] * 2
    assert set(dest.received) == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files[:2]}


def test_a_fragmented_response_goes_to_pynetdicoms_reader(files: list[Path]) -> None:
    """With a maximum PDU of 64 bytes the destination splits each C-STORE-RSP over several
    PDUs: the writer gives what it read back, pauses the reactor as pynetdicom would, and the
    response still arrives through pynetdicom's reader; the next instance goes the same way."""
    with StorageSCP("DEST", contexts_of(files)) as dest:
        statuses, pauses = _send(_associate(dest, files[:3], max_pdu=64), files[:3])
    assert [int(s.Status) for s in statuses] == [0, 0, 0]
    assert pauses == 3
    assert {u: d for u, (_, d) in dest.received.items()} == {
        str(pydicom.dcmread(f).SOPInstanceUID): dataset_bytes(f) for f in files[:3]
    }


def test_read_ahead_keeps_one_instance_ahead_in_order() -> None:
    """``retrieve._read_ahead``: each record comes with its own load, in order, and while one
    is handed out only the next has been started (so at most two blobs are held)."""
    from concurrent.futures import ThreadPoolExecutor

    from p2pacs.gateway.retrieve import _read_ahead

    started: list[int] = []

    def load(n: int) -> int:
        started.append(n)
        if n == 3:
            raise ValueError("unreadable")  # stays with its own record
        return n * 10

    seen = []
    with ThreadPoolExecutor(1) as reader:
        for n, loading in _read_ahead(reader, list(range(6)), load):
            assert max(started) <= n + 1
            try:
                seen.append(loading.result(timeout=TIMEOUT))
            except ValueError:
                seen.append(-1)
    assert seen == [0, 10, 20, -1, 40, 50] and started == list(range(6))
