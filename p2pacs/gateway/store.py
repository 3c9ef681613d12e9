"""C-STORE: archive the encoded dataset exactly as received, durably, before saying success.

The fast path never builds a pydicom Dataset of the pixels: it takes the raw P-DATA bytes from
the request, parses only the header for the index, and waits on the group-committed write.
"""

from __future__ import annotations

import logging
from typing import cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from p2pacs import const
from p2pacs.archive import Archive
from p2pacs.errors import (
    InvalidDicomError,
    ObjectStoreUnavailableError,
    P2PacsError,
    StoreFullError,
)
from p2pacs.gateway import status

__all__ = ["StoreHandler"]

log = logging.getLogger(__name__)


class StoreHandler:
    def __init__(self, archive: Archive):
        self.archive = archive

    def __call__(self, event: evt.Event) -> int:
        try:
            request = cast(C_STORE, event.request)
            if request.DataSet is None:
                return status.CANNOT_UNDERSTAND
            data = request.DataSet.getvalue()
            ts = str(event.context.transfer_syntax)
            calling = event.assoc.requestor.ae_title.strip()
            future = self.archive.submit(data, ts, source_ae=calling)
            future.result(const.WRITE_TIMEOUT)
        except InvalidDicomError as exc:
            log.warning("C-STORE from %s refused: %s", event.assoc.requestor.ae_title, exc)
            return status.MALFORMED_DATASET
        except StoreFullError as exc:
            log.error("C-STORE refused, archive full: %s", exc)
            return status.OUT_OF_RESOURCES
        except ObjectStoreUnavailableError as exc:  # transient: the sender should retry later
            log.error("C-STORE refused, object store unreachable: %s", exc)
            return status.OUT_OF_RESOURCES
        except P2PacsError as exc:
            log.error("C-STORE failed: %s", exc)
            return status.STORE_FAILED
        except Exception:  # a DICOM handler answers with a status, never raises into pynetdicom
            log.exception("C-STORE failed unexpectedly")
            return status.STORE_FAILED
        return status.SUCCESS
