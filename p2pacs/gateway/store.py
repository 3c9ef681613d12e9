"""C-STORE: archive the encoded dataset exactly as received, durably, before saying success.

The fast path never builds a pydicom Dataset of the pixels: it takes the raw P-DATA bytes from
the request, parses only the header for the index, and waits on the group-committed write.
"""

from __future__ import annotations

import logging
import time
from typing import cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from p2pacs import const
from p2pacs.archive import Archive, Ingested
from p2pacs.errors import (
    InvalidDicomError,
    ObjectStoreUnavailableError,
    P2PacsError,
    StoreFullError,
)
from p2pacs.events import DicomRequest
from p2pacs.gateway import status

__all__ = ["StoreHandler"]

log = logging.getLogger(__name__)


class StoreHandler:
    def __init__(self, archive: Archive):
        self.archive = archive

    def __call__(self, event: evt.Event) -> int:
        started = time.perf_counter()
        code, stored = self._store(event)
        req = event.assoc.requestor
        self.archive.events.emit(
            DicomRequest(
                service="C-STORE",
                status=code,
                seconds=time.perf_counter() - started,
                calling_ae=req.ae_title.strip(),
                address=str(req.address),
                study_uids=(stored.study_uid,) if stored else (),
                patient_ids=(stored.patient_id,) if stored and stored.patient_id else (),
                sop_class_uid=stored.sop_class_uid if stored else "",
                sop_uids=(stored.sop_uid,) if stored else (),
                bytes=stored.size if stored else 0,
                completed=1 if stored else 0,
            )
        )
        return code

    def _store(self, event: evt.Event) -> tuple[int, Ingested | None]:
        try:
            request = cast(C_STORE, event.request)
            if request.DataSet is None:
                return status.CANNOT_UNDERSTAND, None
            data = request.DataSet.getvalue()
            ts = str(event.context.transfer_syntax)
            calling = event.assoc.requestor.ae_title.strip()
            future = self.archive.submit(data, ts, source_ae=calling)
            stored = future.result(const.WRITE_TIMEOUT)
        except InvalidDicomError as exc:
            log.warning("C-STORE from %s refused: %s", event.assoc.requestor.ae_title, exc)
            return status.MALFORMED_DATASET, None
        except StoreFullError as exc:
            log.error("C-STORE refused, archive full: %s", exc)
            return status.OUT_OF_RESOURCES, None
        except ObjectStoreUnavailableError as exc:  # transient: the sender should retry later
            log.error("C-STORE refused, object store unreachable: %s", exc)
            return status.OUT_OF_RESOURCES, None
        except P2PacsError as exc:
            log.error("C-STORE failed: %s", exc)
            return status.STORE_FAILED, None
        except Exception:  # a DICOM handler answers with a status, never raises into pynetdicom
            log.exception("C-STORE failed unexpectedly")
            return status.STORE_FAILED, None
        return status.SUCCESS, stored
