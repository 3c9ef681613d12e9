"""C-GET from a requester that accepts only JPEG Baseline, over a real association: with
``lossy_transcoding`` an 8-bit colour instance stored RLE arrives as JPEG Baseline (Pillow's
encoder) marked lossy and close to the original; a 16-bit CT cannot go and is a counted
failure; without the setting nothing is sent lossy."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import build_role, evt
from pynetdicom.dimse_primitives import C_STORE

from p2pacs.archive import Archive
from p2pacs.dicom.transcode import Plan, transcode
from p2pacs.dicom.uids import STUDY_ROOT_GET

from gw_helpers import associate, identifier, running_gateway, suboperations


def _get(gw: Any, sop_class: str, study: str) -> tuple[Dataset, dict[str, tuple[str, bytes]]]:
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        assert req.DataSet is not None
        received[str(req.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax),
            bytes(req.DataSet.getvalue()),
        )
        return 0x0000

    assoc = associate(
        gw,
        STUDY_ROOT_GET,
        (sop_class, [JPEGBaseline8Bit]),
        ext_neg=[build_role(sop_class, scp_role=True)],
        handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
        rsps = [st for st, _ in assoc.send_c_get(query, STUDY_ROOT_GET)]
    finally:
        assoc.release()
    return rsps[-1], received


def test_jpeg_baseline_only_requester(tmp_path: Path, pydicom_all_files: list[Path]) -> None:
    rgb = next(p for p in pydicom_all_files if p.name == "SC_rgb_rle_2frame.dcm")
    ct = next(p for p in pydicom_all_files if p.name == "CT_small.dcm")
    archive = Archive(tmp_path / "db", map_size=1 << 28, sync=False)
    try:
        for p in (rgb, ct):
            archive.import_file(p)
        heads = {p: pydicom.dcmread(p) for p in (rgb, ct)}
        h = heads[rgb]
        with running_gateway(archive) as gw:  # lossy off (the default): nothing goes
            final, received = _get(gw, str(h.SOPClassUID), str(h.StudyInstanceUID))
        assert not received and suboperations(final) == (0, 1, 0)
        with running_gateway(archive, lossy_transcoding=True) as gw:
            final, received = _get(gw, str(h.SOPClassUID), str(h.StudyInstanceUID))
            assert suboperations(final) == (1, 0, 0)
            ((ts, data),) = received.values()
            assert ts == JPEGBaseline8Bit
            native = transcode(data, ts, Plan(ExplicitVRLittleEndian))  # GDCM decodes it
            ds = pydicom.dcmread(io.BytesIO(native), force=True)
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            assert ds.LossyImageCompression == "01"
            assert ds.LossyImageCompressionMethod == "ISO_10918_1"
            want = h.pixel_array.astype(float)
            assert np.abs(ds.pixel_array.astype(float) - want).mean() < 4.0
            c = heads[ct]  # 16-bit: JPEG Baseline cannot hold it, a counted failure
            final, received = _get(gw, str(c.SOPClassUID), str(c.StudyInstanceUID))
            assert not received and suboperations(final) == (0, 1, 0)
        rec = archive.index.instance(str(h.SOPInstanceUID))
        assert rec is not None and rec.current.transfer_syntax == str(h.file_meta.TransferSyntaxUID)
    finally:
        archive.close()
