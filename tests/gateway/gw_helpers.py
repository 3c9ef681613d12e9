"""Helpers for the gateway tests: a gateway on port 0, test SCUs and a storage SCP destination.

Everything here opens real associations on 127.0.0.1; nothing is mocked.
"""

from __future__ import annotations

import socket
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation

from p2pacs.archive import Archive
from p2pacs.config import DicomConfig
from p2pacs.dicom import split_part10
from p2pacs.dicom.scu import association_handlers, read_context, store_files
from p2pacs.gateway import Gateway

AET = "P2PACS"
TIMEOUT = 20.0  # seconds: ACSE/DIMSE/network timeouts of the test SCUs and SCPs
UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_gateway(archive: Archive, **kw: Any) -> Gateway:
    """A started gateway on 127.0.0.1, port 0; ``kw``: DicomConfig fields and Gateway hooks."""
    hooks = {k: kw.pop(k) for k in ("ensure_local", "commitment") if k in kw}
    kw.setdefault("network_timeout", TIMEOUT)
    cfg = DicomConfig(ae_title=AET, port=0, bind="127.0.0.1", max_pdu=0, **kw)
    gw = Gateway(archive, cfg, **hooks)
    gw.start()
    return gw


@contextmanager
def running_gateway(archive: Archive, **kw: Any) -> Iterator[Gateway]:
    gw = make_gateway(archive, **kw)
    try:
        yield gw
    finally:
        gw.stop()


def associate(
    gw: Gateway,
    *contexts: str | tuple[str, list[str]],
    aet: str = "TESTSCU",
    ext_neg: list[Any] | None = None,
    handlers: list[Any] | None = None,
) -> Association:
    """An association to the gateway proposing ``contexts`` (a SOP class, or (class, syntaxes))."""
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.maximum_pdu_size = 0
    for c in contexts:
        if isinstance(c, tuple):
            ae.add_requested_context(c[0], c[1])
        else:
            ae.add_requested_context(c)
    host, port = gw.address
    return ae.associate(
        host,
        port,
        ae_title=AET,
        ext_neg=ext_neg,
        evt_handlers=[*association_handlers(), *(handlers or [])],
        max_pdu=0,
    )


def identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def find(gw: Gateway, model: str, **keys: Any) -> tuple[list[Dataset], int]:
    """C-FIND: (pending identifiers, final status)."""
    assoc = associate(gw, model)
    assert assoc.is_established
    try:
        results: list[Dataset] = []
        final = -1
        for st, ds in assoc.send_c_find(identifier(**keys), model):
            assert st is not None and "Status" in st, "C-FIND got no response"
            if st.Status in (0xFF00, 0xFF01):
                results.append(ds)
            else:
                final = int(st.Status)
    finally:
        assoc.release()
    return results, final


def move(gw: Gateway, model: str, destination: str, **keys: Any) -> list[Dataset]:
    """C-MOVE: every response status dataset, the final one last."""
    assoc = associate(gw, model)
    assert assoc.is_established
    try:
        out = [st for st, _ in assoc.send_c_move(identifier(**keys), destination, model)]
    finally:
        assoc.release()
    assert out and all(st is not None and "Status" in st for st in out), "C-MOVE got no response"
    return out


def move_into(
    gw: Gateway,
    model: str,
    aet: str,
    contexts: Mapping[str, Iterable[str]],
    **keys: Any,
) -> tuple[list[Dataset], StorageSCP]:
    """C-MOVE to a fresh storage SCP registered as ``aet`` for the duration of the move."""
    with StorageSCP(aet, contexts) as dest:
        gw.config.destinations[aet] = dest.address
        try:
            return move(gw, model, aet, **keys), dest
        finally:
            del gw.config.destinations[aet]


def decode(transfer_syntax: str, data: bytes) -> Dataset:
    """A dataset's elements from its encoded bytes (inflated first when deflated)."""
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    return read_dataset(BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)


def same_elements(a: tuple[str, bytes], b: tuple[str, bytes]) -> bool:
    """Do two encodings ((syntax, bytes), possibly different syntaxes) hold the same values?"""
    da, db = decode(*a), decode(*b)
    return [(e.tag, e.value) for e in da] == [(e.tag, e.value) for e in db]


def dataset_bytes(path: Path) -> bytes:
    return bytes(split_part10(path.read_bytes()).dataset)


def header(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True)


def suboperations(status: Dataset) -> tuple[int, int, int]:
    """(completed, failed, warning) sub-operations of a C-MOVE/C-GET response."""
    return (
        int(status.get("NumberOfCompletedSuboperations", 0) or 0),
        int(status.get("NumberOfFailedSuboperations", 0) or 0),
        int(status.get("NumberOfWarningSuboperations", 0) or 0),
    )


class StorageSCP:
    """A pynetdicom storage SCP (a C-MOVE destination) that keeps each received dataset's
    bytes exactly as they came off the wire: SOP Instance UID -> (transfer syntax, bytes)."""

    def __init__(self, aet: str, contexts: Mapping[str, Iterable[str]]):
        self.aet = aet
        self.received: dict[str, tuple[str, bytes]] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title=aet)
        ae.maximum_pdu_size = 0
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
        ae.add_supported_context("1.2.840.10008.1.1")
        for sop_class, syntaxes in contexts.items():
            ae.add_supported_context(sop_class, list(syntaxes))
        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[*association_handlers(), (evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        if req.DataSet is None:
            return 0xC000
        with self._lock:
            self.received[str(req.AffectedSOPInstanceUID)] = (
                str(event.context.transfer_syntax),
                bytes(req.DataSet.getvalue()),
            )
        return 0x0000

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()

    def __enter__(self) -> StorageSCP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def contexts_of(files: Iterable[Path]) -> dict[str, set[str]]:
    """SOP class -> transfer syntaxes of ``files`` (what a destination must accept)."""
    out: dict[str, set[str]] = {}
    for p in files:
        c, ts, _ = read_context(p)
        out.setdefault(c, set()).add(ts)
    return out


@dataclass
class Loaded:
    """A running gateway holding pydicom's test files, and what retrieval must return, keyed by
    the dataset's SOP Instance UID (some pydicom files carry another UID in their file meta)."""

    gateway: Gateway
    archive: Archive
    files: list[Path]
    expected: dict[str, bytes] = field(default_factory=dict)  # SOP UID -> newest dataset bytes
    expected_ts: dict[str, str] = field(default_factory=dict)  # SOP UID -> its transfer syntax
    study_of: dict[str, str] = field(default_factory=dict)  # SOP UID -> StudyInstanceUID
    series_of: dict[str, str] = field(default_factory=dict)  # SOP UID -> SeriesInstanceUID
    class_of: dict[str, str] = field(default_factory=dict)  # SOP UID -> SOP Class UID
    patient_of: dict[str, str] = field(default_factory=dict)  # SOP UID -> PatientID
    duplicates: int = 0  # files sent again under a SOP UID already held

    def studies(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for sop, study in self.study_of.items():
            out.setdefault(study, set()).add(sop)
        return out

    def contexts(self) -> list[tuple[str, str]]:
        """Every (SOP class, transfer syntax) pair the files were sent in, and the pairs the
        gateway will send them back in (dataset SOP class, stored syntax)."""
        pairs = {read_context(p)[:2] for p in self.files}
        return sorted(pairs | {(self.class_of[s], self.expected_ts[s]) for s in self.expected})


def load(gw: Gateway, archive: Archive, files: list[Path]) -> Loaded:
    """C-STORE ``files`` with ``scu.store_files``: first one file per SOP Instance UID in one
    call, then each duplicate (same UID, other bytes: MR_small in several syntaxes...) in a
    call of its own, in a known order, so the last one sent is the newest."""
    first: dict[str, Path] = {}
    again: list[Path] = []
    headers = {p: header(p) for p in files}
    for p in files:
        sop = str(headers[p].SOPInstanceUID)
        if sop in first:
            again.append(p)
        else:
            first[sop] = p
    state = Loaded(gw, archive, list(files), duplicates=len(again))
    host, port = gw.address
    report = store_files(host, port, AET, list(first.values()))
    assert not report.failed, report.failed
    for p in again:
        report = store_files(host, port, AET, [p])
        assert not report.failed, report.failed
    for sop, p in first.items():  # an instance stays filed where it was first received
        state.study_of[sop] = str(headers[p].StudyInstanceUID)
        state.series_of[sop] = str(headers[p].SeriesInstanceUID)
        state.class_of[sop] = str(headers[p].SOPClassUID)
        state.patient_of[sop] = str(headers[p].get("PatientID", ""))
    for p in [*first.values(), *again]:  # in the order sent: the last one is the newest
        sop = str(headers[p].SOPInstanceUID)
        state.expected[sop] = dataset_bytes(p)
        state.expected_ts[sop] = read_context(p)[1]
    return state


def associate_rq(
    port: int,
    contexts: list[PresentationContext],
    *,
    calling: str = "RAW",
    max_length: int = 16382,
) -> bytes:
    """The bytes of an A-ASSOCIATE-RQ to the gateway on ``port`` proposing ``contexts`` (their
    IDs set by the caller), built with pynetdicom's PDUs, for tests that speak raw sockets."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = AET
    prim.calling_presentation_address = AddressInformation("127.0.0.1", 0)
    prim.called_presentation_address = AddressInformation("127.0.0.1", port)
    prim.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = max_length
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = UID("1.2.826.0.1.3680043.9.9999.1")
    prim.user_information = [length, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())
