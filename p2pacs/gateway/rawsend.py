"""Send stored instances byte for byte: a dataset that carries its encoded bytes.

pynetdicom's C-GET/C-MOVE service takes ``Dataset`` objects from the handler and re-encodes
them for each C-STORE sub-operation, which would change deflated, big-endian or unusual
encodings. ``StoredInstance`` is a ``Dataset`` with just the identifying elements plus the
stored bytes; the encoder used by ``Association.send_c_store`` is wrapped so that, when the
negotiated transfer syntax has the stored encoding, those bytes are sent unchanged. For any
other negotiated syntax the full dataset is decoded and encoded as pynetdicom normally would.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pynetdicom.association
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

__all__ = ["StoredInstance", "install"]

_original_encode = getattr(pynetdicom.association, "encode")  # noqa: B009


class StoredInstance(Dataset):
    """Identifying elements and file meta of an instance, plus its encoded dataset bytes."""

    def __init__(
        self, sop_class: str, sop_uid: str, transfer_syntax: str, prefix: bytes, raw: bytes
    ):
        super().__init__()
        ts = UID(transfer_syntax)
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = ts
        self.SOPClassUID = UID(sop_class)
        self.SOPInstanceUID = UID(sop_uid)
        self.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian)
        self.p2pacs_encoding = (ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        self.p2pacs_part10 = (prefix, raw)


def _encode(
    ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> Any:
    if isinstance(ds, StoredInstance):
        prefix, raw = ds.p2pacs_part10
        if ds.p2pacs_encoding == (is_implicit_vr, is_little_endian, deflated):
            return raw
        ds = dcmread(BytesIO(prefix + raw))
    return _original_encode(ds, is_implicit_vr, is_little_endian, deflated)


def install() -> None:
    """Route pynetdicom's C-STORE encoding through ``_encode`` (idempotent)."""
    setattr(pynetdicom.association, "encode", _encode)  # noqa: B010
