"""The DICOM gateway: a pynetdicom SCP in front of the archive.

C-ECHO, C-STORE (all storage SOP classes, every transfer syntax pynetdicom knows, stored as
received), C-FIND and C-MOVE/C-GET for Patient Root and Study Root, and Storage Commitment.
Handlers run on pynetdicom's association threads and always answer with a status.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from p2pacs.archive import Archive
from p2pacs.config import DicomConfig
from p2pacs.dicom import uids
from p2pacs.dicom.scu import association_handlers
from p2pacs.dicom.transcode import deliverable_for_all
from p2pacs.errors import ConfigError
from p2pacs.gateway.commitment import CommitFn, CommitmentHandler, local_commitment
from p2pacs.gateway.contexts import SharedUIDContexts
from p2pacs.gateway.find import FindHandler
from p2pacs.gateway.listen import serve_inherited
from p2pacs.gateway.observe import association_observers, observed
from p2pacs.gateway.rawrecv import fast_receive
from p2pacs.gateway.rawsend import direct_writes_when_sending
from p2pacs.gateway.retrieve import RetrieveHandlers
from p2pacs.gateway.store import StoreHandler

__all__ = ["Gateway"]

# pynetdicom, as acceptor, takes the first syntax of OUR list that the requestor proposed:
# prefer Explicit VR Little Endian, the syntax most archives store, then everything else
STORAGE_SYNTAXES = [
    ExplicitVRLittleEndian,
    *(ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian),
]

log = logging.getLogger(__name__)


def _prefer_deliverable(event: evt.Event) -> None:
    """For C-GET, accept per storage context a syntax every instance can be delivered in.

    pynetdicom, as acceptor, takes the first syntax of OUR list that the requestor proposed.
    On contexts where the requestor proposes the SCP role (a C-GET requestor receiving the
    instances), our list is reordered so that the syntaxes it proposed that any decodable
    instance can be converted to without loss (``transcode.deliverable_for_all``: uncompressed
    little endian, RLE, JPEG-LS, JPEG 2000 lossless) come first, in the requestor's order; the
    rest (lossy ones such as JPEG Baseline) only when it proposed nothing deliverable. A context
    proposing [Explicit VR LE, Implicit VR LE, JPEG Baseline] gets Explicit VR LE: instances
    stored as JPEG Baseline are decoded for it, and nothing stored uncompressed fails (taking
    JPEG Baseline there would leave every uncompressed instance without a context, 0xA702).
    A requestor that proposes several contexts per class can get several syntaxes; each
    instance then goes in the best one (``retrieve``). C-STORE negotiation stays as it is.
    """
    requestor = event.assoc.requestor
    scp_role = {str(uid) for uid, item in requestor.role_selection.items() if item.scp_role}
    if not scp_role:
        return
    wanted: dict[str, list[str]] = {}
    proposed = (
        requestor.primitive.presentation_context_definition_list if requestor.primitive else []
    )
    for cx in proposed:
        if str(cx.abstract_syntax) in scp_role:
            order = wanted.setdefault(str(cx.abstract_syntax), [])
            for ts in cx.transfer_syntax:
                if deliverable_for_all(str(ts)) and str(ts) not in order:
                    order.append(str(ts))
    contexts = event.assoc.acceptor.supported_contexts
    for cx in contexts:
        first = wanted.get(str(cx.abstract_syntax))
        if first:
            ours = [str(ts) for ts in cx.transfer_syntax]
            reordered: list[str | bytes | UID] = [t for t in first if t in ours]
            reordered += [t for t in ours if t not in first]
            if reordered != ours:  # the setter validates every UID again: ~20 ms a C-GET
                cx.transfer_syntax = reordered
    event.assoc.acceptor.supported_contexts = contexts


def _no_forced_collection() -> None:
    """``ThreadedAssociationServer.service_actions``, which pynetdicom calls on every turn of its
    accept loop and which runs a full ``gc.collect()`` every 60 turns (a workaround for
    association threads it saw linger): a full collection walks the whole heap of the process
    (every cached index page and catalogue object of a site), measured at 7 % of the gateway's
    CPU per association on an empty site. An association's cycles are left to the
    interpreter's generational collector, as in any other Python program."""


def _log_association(event: evt.Event) -> None:
    req = event.assoc.requestor
    log.info("association from %s (%s:%s)", req.ae_title.strip(), req.address, req.port)


class Gateway:
    def __init__(
        self,
        archive: Archive,
        config: DicomConfig,
        *,
        ensure_local: Callable[[list[str]], None] | None = None,
        commitment: CommitFn | None = None,
    ):
        self.archive = archive
        self.config = config
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_pdu_size = config.max_pdu
        self.ae.network_timeout = config.network_timeout
        self.ae.acse_timeout = self.ae.dimse_timeout = config.network_timeout
        self.ae.maximum_associations = 64
        if config.allowed_calling_aets:
            self.ae.require_calling_aet = list(config.allowed_calling_aets)
        self.ae.add_supported_context(uids.VERIFICATION)
        for cx in AllStoragePresentationContexts:
            # scp_role lets a C-GET requestor receive the instances on the same association
            self.ae.add_supported_context(
                str(cx.abstract_syntax), STORAGE_SYNTAXES, scu_role=False, scp_role=True
            )
        for model in (*uids.QUERY_RETRIEVE, uids.STORAGE_COMMITMENT_PUSH):
            self.ae.add_supported_context(model)
        self.retrieve = RetrieveHandlers(archive, config, ensure_local)
        self.commitment = CommitmentHandler(config, commitment or local_commitment(archive))
        self.handlers: list[Any] = [
            *association_handlers(),
            (evt.EVT_ESTABLISHED, direct_writes_when_sending),
            (evt.EVT_ESTABLISHED, fast_receive),  # after rawsend's: it wraps its send_msg
            (evt.EVT_REQUESTED, _log_association),
            (evt.EVT_REQUESTED, _prefer_deliverable),
            *association_observers(archive.events),
            (evt.EVT_C_STORE, StoreHandler(archive)),
            (evt.EVT_C_FIND, observed(archive.events, "C-FIND", FindHandler(archive.index))),
            (evt.EVT_C_GET, observed(archive.events, "C-GET", self.retrieve.on_get)),
            (evt.EVT_C_MOVE, observed(archive.events, "C-MOVE", self.retrieve.on_move)),
            (evt.EVT_N_ACTION, self.commitment),
        ]
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    def start(self, listen_fd: int | None = None) -> None:
        """Listen without blocking; port 0 picks a free port (see ``address``). ``listen_fd``:
        accept on this listening socket instead (a worker process, ``gateway.worker``)."""
        with self._lock:
            if self._server is not None:
                return
            if listen_fd is not None:
                server = serve_inherited(self.ae, listen_fd, self.handlers)
            else:
                try:
                    started = self.ae.start_server(
                        (self.config.bind, self.config.port),
                        block=False,
                        evt_handlers=self.handlers,
                    )
                except OSError as exc:
                    raise ConfigError(
                        f"cannot listen for DICOM on {self.config.bind}:{self.config.port}: "
                        f"{exc.strerror}; choose another port with 'serve --port'"
                    ) from exc
                assert started is not None  # block=False returns the running server
                server = started
            # each association copies these: share the UIDs instead of deep-copying ~7,700
            server.contexts = SharedUIDContexts(server.contexts)
            server.service_actions = _no_forced_collection  # type: ignore[method-assign]
            self._server = server

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "gateway not started"
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server = None
