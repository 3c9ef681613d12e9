"""Storage Commitment Push Model SCP (PS3.4 Annex J).

N-ACTION is answered at once; a worker then asks the site whether each referenced instance is
safe (held by R sites) and reports the outcome with N-EVENT-REPORT on a new association to the
requesting AE (found in the configured destinations), acting in the SCP role (PS3.4 J.3.3).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt

from p2pacs.archive import Archive
from p2pacs.config import DicomConfig, parse_hostport
from p2pacs.dicom.scu import association_handlers
from p2pacs.dicom.uids import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from p2pacs.errors import ConfigError
from p2pacs.gateway import status

__all__ = ["CommitmentHandler", "CommitmentResult"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0  # seconds to wait for R copies before reporting failures


@dataclass(slots=True)
class CommitmentResult:
    committed: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)


CommitFn = Callable[[list[tuple[str, str]], float], CommitmentResult]


def local_commitment(archive: Archive) -> CommitFn:
    """Without a federation: committed iff this site holds the instance."""

    def check(refs: list[tuple[str, str]], timeout: float) -> CommitmentResult:
        result = CommitmentResult()
        for sop_class, sop in refs:
            rec = archive.index.instance(sop)
            if rec is None:
                result.failed.append((sop_class, sop, status.NO_SUCH_SOP_INSTANCE))
            elif rec.sop_class_uid != sop_class:
                result.failed.append((sop_class, sop, status.CLASS_INSTANCE_CONFLICT))
            else:
                result.committed.append((sop_class, sop))
        return result

    return check


class CommitmentHandler:
    def __init__(self, config: DicomConfig, check: CommitFn, timeout: float = DEFAULT_TIMEOUT):
        self.config = config
        self.check = check
        self.timeout = timeout
        self.reports_sent = 0

    def __call__(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """N-ACTION: 0x0000 once the request is taken (the outcome follows by N-EVENT-REPORT),
        0x0110 when it cannot be; never an exception into pynetdicom."""
        try:
            return self._take(event)
        except Exception:
            log.exception("storage commitment request failed unexpectedly")
            return status.PROCESSING_FAILURE, None

    def _take(self, event: evt.Event) -> tuple[int, Dataset | None]:
        if event.action_type != 1:
            return status.NO_SUCH_ACTION_TYPE, None
        try:
            info = event.action_information
            transaction = str(info.TransactionUID)
            refs = [
                (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
                for item in info.ReferencedSOPSequence
            ]
        except Exception as exc:  # the requestor's dataset, decoded lazily (OSError, ValueError...)
            log.warning("malformed storage commitment request: %s", exc)
            return status.PROCESSING_FAILURE, None
        requestor = event.assoc.requestor.ae_title.strip()
        threading.Thread(
            target=self._report,
            args=(requestor, transaction, refs),
            name=f"commitment-{transaction[-8:]}",
            daemon=True,
        ).start()
        return status.SUCCESS, None

    def _report(self, requestor: str, transaction: str, refs: list[tuple[str, str]]) -> None:
        """The worker thread: check, then report. It never raises: an exception would end the
        thread with nothing in the log."""
        try:
            self._send(requestor, self._outcome(transaction, refs))
        except Exception:
            log.exception("storage commitment %s: cannot report to %s", transaction, requestor)

    def _outcome(self, transaction: str, refs: list[tuple[str, str]]) -> Dataset:
        """The N-EVENT-REPORT Event Information (PS3.4 J.3.3); every reference failed with
        0x0110 when the check raises or answers something that is not a result."""
        try:
            return _event_information(transaction, self.check(refs, self.timeout))
        except Exception:
            log.exception("storage commitment check failed")
            failed = [(c, s, status.PROCESSING_FAILURE) for c, s in refs]
            return _event_information(transaction, CommitmentResult(failed=failed))

    def _send(self, requestor: str, ds: Dataset) -> None:
        address = self.config.destinations.get(requestor)
        if address is None:
            log.error(
                "cannot report storage commitment to %s: add it to [dicom] destinations", requestor
            )
            return
        try:
            host, port = parse_hostport(address)
        except ConfigError as exc:
            log.error("bad destination for %s: %s", requestor, exc)
            return
        event_type = 2 if "FailedSOPSequence" in ds else 1
        ae = AE(ae_title=self.config.ae_title)
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        assoc = ae.associate(
            host,
            port,
            ae_title=requestor,
            ext_neg=[cast(Any, build_role(STORAGE_COMMITMENT_PUSH, scp_role=True))],
            evt_handlers=association_handlers(),
        )
        if not assoc.is_established:
            log.error("cannot reach %s at %s to report storage commitment", requestor, address)
            return
        try:
            rsp, _ = assoc.send_n_event_report(
                ds, event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
            self.reports_sent += 1
            log.info(
                "storage commitment %s: %d committed, %d failed (reply 0x%04X)",
                ds.TransactionUID,
                len(ds.get("ReferencedSOPSequence", [])),
                len(ds.get("FailedSOPSequence", [])),
                int(getattr(rsp, "Status", 0xFFFF)),
            )
        finally:
            assoc.release()


def _event_information(transaction: str, result: CommitmentResult) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    if result.committed:
        ds.ReferencedSOPSequence = [_ref(c, s) for c, s in result.committed]
    if result.failed:
        items = []
        for c, s, reason in result.failed:
            item = _ref(c, s)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    return ds


def _ref(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item
