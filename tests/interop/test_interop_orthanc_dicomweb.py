"""Orthanc's DICOMweb plugin (Debian's orthanc-dicomweb) as a client of ``p2pacs.dicomweb``:
p2pacs is registered in Orthanc's ``DicomWeb.Servers``; Orthanc searches it (QIDO-RS),
retrieves a study from it (WADO-RS) and stores into it (STOW-RS), all unchanged."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from aiohttp import web
from pydicom.uid import generate_uid

from p2pacs.archive import Archive
from p2pacs.dicomweb import dicomweb_app
from p2pacs.samples import generate_instances

from interop_peers import Orthanc, require_tools, serve_app

pytestmark = pytest.mark.interop

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def test_orthanc_dicomweb_plugin_searches_retrieves_and_stores(
    tmp_path: Path, pydicom_all_files: list[Path]
) -> None:
    require_tools("Orthanc")
    if not PLUGIN.exists():
        pytest.skip("orthanc-dicomweb not installed (apt-get install orthanc-dicomweb)")
    paths = generate_instances(
        tmp_path / "gen", studies=1, series_per_study=1, instances_per_series=3, rows=64,
        columns=64, seed=9,
    )  # fmt: skip
    paths += [p for p in pydicom_all_files if p.name == "MR_small_jp2klossless.dcm"]
    archive = Archive(tmp_path / "db", map_size=1 << 30, sync=False)
    originals = {}
    for p in paths:
        archive.import_file(p)
        ds = pydicom.dcmread(p)
        originals[str(ds.SOPInstanceUID)] = ds
    parent = web.Application()
    parent.add_subapp("/dicomweb", dicomweb_app(archive))
    try:
        with serve_app(parent, "/dicomweb/") as url:
            extra = {
                "Plugins": [str(PLUGIN)],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {"p2pacs": [url]}},
            }
            with Orthanc(tmp_path / "orthanc", "ORTHANC", extra=extra) as orthanc:
                _search(orthanc, originals)
                _retrieve(orthanc, originals)
                _store(orthanc, archive, pydicom_all_files)
    finally:
        archive.close()


def _search(orthanc: Orthanc, originals: dict[str, pydicom.Dataset]) -> None:
    found = orthanc.post("/dicom-web/servers/p2pacs/get", {"Uri": "/studies"})
    assert {s["0020000D"]["Value"][0] for s in found} == {
        str(d.StudyInstanceUID) for d in originals.values()
    }
    mr = next(d for d in originals.values() if str(d.PatientID).startswith("4MR"))
    found = orthanc.post(
        "/dicom-web/servers/p2pacs/qido",
        {"Uri": "/studies", "Arguments": {"PatientID": str(mr.PatientID)}},
    )
    assert len(found) == 1, found


def _retrieve(orthanc: Orthanc, originals: dict[str, pydicom.Dataset]) -> None:
    studies = sorted({str(d.StudyInstanceUID) for d in originals.values()})
    orthanc.post(
        "/dicom-web/servers/p2pacs/retrieve",
        {"Resources": [{"Study": s} for s in studies]},
    )
    ids = orthanc.get("/instances")
    assert len(ids) == len(originals)
    for oid in ids:
        ds = pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{oid}/file")))
        want = originals[str(ds.SOPInstanceUID)]
        assert np.array_equal(ds.pixel_array, want.pixel_array), ds.SOPInstanceUID


def _store(orthanc: Orthanc, archive: Archive, pydicom_all_files: list[Path]) -> None:
    ct = pydicom.dcmread(next(p for p in pydicom_all_files if p.name == "CT_small.dcm"))
    ct.SOPInstanceUID = generate_uid()
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID
    ct.StudyInstanceUID = generate_uid()
    buf = io.BytesIO()
    ct.save_as(buf, enforce_file_format=True)
    oid = orthanc.upload(buf.getvalue())["ID"]
    orthanc.post("/dicom-web/servers/p2pacs/stow", {"Resources": [oid]})
    rec = archive.index.instance(str(ct.SOPInstanceUID))
    assert rec is not None and rec.study_uid == str(ct.StudyInstanceUID)
