"""p2pacs as a DICOM client: send files with C-STORE, pull a study back with C-GET.

Used by the demo, the benchmarks and the fault tests, which talk to sites exactly as a PACS
would. Every association sets TCP_NODELAY (pynetdicom never does; without it each C-STORE
stalls ~40 ms on Nagle's algorithm) and sends files as they are, never decoding pixel data.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.dimse_primitives import C_STORE

from p2pacs.dicom import loghandlers, reactor
from p2pacs.dicom.uids import STUDY_ROOT_GET
from p2pacs.errors import InvalidDicomError, PeerUnavailableError

__all__ = ["StoreReport", "association_handlers", "get_study", "read_context", "store_files"]

log = logging.getLogger(__name__)

reactor.install()  # every association p2pacs makes or accepts waits on events, never polls
loghandlers.install()  # pynetdicom formats its log records only when they would be shown

MAX_CONTEXTS = 120  # an association may carry 128 presentation contexts; keep a margin
SUCCESS_OR_WARNING = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}  # PS3.4 C-STORE statuses


def _nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reactor_leaves_messages(event: evt.Event) -> None:
    """Work around a pynetdicom race (pydicom/pynetdicom#875): a requestor's reactor thread
    polls the DIMSE queue every millisecond and can take the response a ``send_*`` call is
    waiting for. ``send_*`` pauses the reactor, but trusts a flag the reactor sets just before
    its pause point, so the pause can come too late; the response is then dropped as
    "unexpected" and the caller waits out the DIMSE timeout (measured: 5 C-STOREs in 58,000
    on loopback). p2pacs's requestor associations never serve requests (C-GET's
    sub-operations are handled by ``send_c_get`` itself), so the reactor's polls see nothing."""
    assoc = event.assoc
    if not assoc.is_requestor:
        return
    dimse = assoc.dimse
    get_msg = dimse.get_msg

    def guarded(block: bool = False) -> Any:
        if not block and threading.current_thread() is assoc:
            return None, None
        return get_msg(block)

    dimse.get_msg = guarded  # type: ignore[method-assign]


def association_handlers() -> list[Any]:
    """Handlers for every association p2pacs opens or accepts (and the event-driven reactors,
    ``reactor.install``, which must be in place before the association is created)."""
    reactor.install()
    return [(evt.EVT_CONN_OPEN, _nodelay), (evt.EVT_CONN_OPEN, _reactor_leaves_messages)]


def read_context(path: Path) -> tuple[str, str, str]:
    """(SOP Class UID, Transfer Syntax UID, SOP Instance UID) of a Part-10 file."""
    try:
        meta = read_file_meta_info(path)
        return (
            str(meta.MediaStorageSOPClassUID),
            str(meta.TransferSyntaxUID),
            str(meta.MediaStorageSOPInstanceUID),
        )
    except Exception as exc:
        raise InvalidDicomError(f"{path} is not a DICOM Part-10 file: {exc}") from exc


@dataclass(slots=True)
class StoreReport:
    stored: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)


def _ae(calling_aet: str) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.maximum_pdu_size = 0
    return ae


def store_files(
    host: str,
    port: int,
    called_aet: str,
    files: Iterable[Path],
    *,
    calling_aet: str = "P2PACS-SCU",
) -> StoreReport:
    """C-STORE every file, one association per group of up to MAX_CONTEXTS contexts."""
    report = StoreReport()
    groups: list[dict[tuple[str, str], list[Path]]] = [{}]
    for path in files:
        try:
            sop_class, ts, _ = read_context(path)
        except InvalidDicomError as exc:
            report.failed[path] = str(exc)
            continue
        if (sop_class, ts) not in groups[-1] and len(groups[-1]) >= MAX_CONTEXTS:
            groups.append({})
        groups[-1].setdefault((sop_class, ts), []).append(path)
    # send each file's dataset bytes as they are on disk, never decoded and re-encoded
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = _ae(calling_aet)
    for group in groups:
        if not group:
            continue
        contexts = [build_context(c, [t]) for c, t in group]
        assoc = ae.associate(
            host,
            port,
            contexts,
            ae_title=called_aet,
            max_pdu=0,
            evt_handlers=association_handlers(),
        )
        if not assoc.is_established:
            for paths in group.values():
                for p in paths:
                    report.failed[p] = f"association to {called_aet}@{host}:{port} failed"
            continue
        try:
            for paths in group.values():
                for path in paths:
                    if not assoc.is_established:  # aborted by the peer: one new association
                        assoc = ae.associate(
                            host, port, contexts, ae_title=called_aet, max_pdu=0,
                            evt_handlers=association_handlers(),
                        )  # fmt: skip
                    try:
                        status = assoc.send_c_store(path)
                    except (AttributeError, ValueError, OSError, RuntimeError) as exc:
                        report.failed[path] = str(exc)
                        continue
                    code = int(getattr(status, "Status", -1))
                    if code in SUCCESS_OR_WARNING:
                        report.stored.append(path)
                    else:
                        report.failed[path] = f"status 0x{code:04X}" if code >= 0 else "no reply"
        finally:
            assoc.release()
    return report


def get_study(
    host: str,
    port: int,
    called_aet: str,
    study_uid: str,
    contexts: Sequence[tuple[str, str]],
    *,
    calling_aet: str = "P2PACS-SCU",
) -> dict[str, bytes]:
    """C-GET a study; returns SOP Instance UID -> dataset bytes exactly as received."""
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        if request.DataSet is None:
            return 0xC000
        received[str(request.AffectedSOPInstanceUID)] = bytes(request.DataSet.getvalue())
        return 0x0000

    # one presentation context per (SOP class, transfer syntax): an acceptor picks a single
    # transfer syntax per context, so several stored syntaxes of one class need several contexts
    pairs = sorted(set(contexts))[:MAX_CONTEXTS]
    ae = _ae(calling_aet)
    ae.add_requested_context(STUDY_ROOT_GET)
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, [ts])
    roles: list[Any] = [build_role(c, scp_role=True) for c in sorted({c for c, _ in pairs})]
    handlers = [*association_handlers(), (evt.EVT_C_STORE, on_store)]
    assoc = ae.associate(
        host, port, ae_title=called_aet, ext_neg=roles, evt_handlers=handlers, max_pdu=0
    )
    if not assoc.is_established:
        raise PeerUnavailableError(f"C-GET association to {called_aet}@{host}:{port} failed")
    try:
        from pydicom.dataset import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        for status, _ in assoc.send_c_get(query, STUDY_ROOT_GET):
            code = int(getattr(status, "Status", -1))
            if code not in (0xFF00, 0xFF01) and code not in SUCCESS_OR_WARNING:
                log.warning("C-GET of %s ended with status 0x%04X", study_uid, code)
    finally:
        assoc.release()
    return received
