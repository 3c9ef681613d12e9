"""Orthanc against ``p2pacs serve``: Orthanc sends and queries, p2pacs moves into a second Orthanc.

The files the second Orthanc ends up with must hold the original dataset bytes (file meta aside).
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from interop_helpers import dataset_bytes
from interop_peers import Orthanc, P2pacsServe, free_tcp_port, require_tools, run_dcmtk

pytestmark = pytest.mark.interop


def _study_files(generated_dir: Path, index: int) -> tuple[str, list[Path]]:
    by_study: dict[str, list[Path]] = {}
    for path in sorted(generated_dir.glob("*.dcm")):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        by_study.setdefault(uid, []).append(path)
    uid = list(by_study)[index]
    return uid, by_study[uid]


def test_orthanc_store_query_move(tmp_path: Path, generated_dir: Path) -> None:
    require_tools("Orthanc", "movescu")
    study_uid, files = _study_files(generated_dir, 1)
    originals = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    serve_port = free_tcp_port()
    with (
        Orthanc(tmp_path / "orthanc-b", "ORTHANCB") as second,
        P2pacsServe(
            tmp_path / "site",
            "P2PACS",
            serve_port,
            destinations={"ORTHANCB": f"127.0.0.1:{second.dicom_port}"},
        ) as serve,
        Orthanc(
            tmp_path / "orthanc-a",
            "ORTHANCA",
            modalities={"p2pacs": ("P2PACS", "127.0.0.1", serve.port)},
        ) as first,
    ):
        ids = {first.upload(p.read_bytes())["ParentStudy"] for p in files}
        assert len(ids) == 1
        sent = first.post("/modalities/p2pacs/store", {"Resources": list(ids), "Synchronous": True})
        assert sent["InstancesCount"] == len(files), sent
        assert sent["FailedInstancesCount"] == 0, sent

        query = first.post(
            "/modalities/p2pacs/query",
            {
                "Level": "Study",
                "Query": {
                    "StudyInstanceUID": study_uid,
                    "PatientID": "",
                    "NumberOfStudyRelatedInstances": "",
                },
            },
        )
        answers = first.get(f"/queries/{query['ID']}/answers?expand&simplify")
        assert len(answers) == 1
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert answers[0]["PatientID"] == header.PatientID
        assert answers[0]["NumberOfStudyRelatedInstances"] == str(len(files))

        missing = first.post(
            "/modalities/p2pacs/query", {"Level": "Study", "Query": {"PatientID": "NOBODY"}}
        )
        assert first.get(f"/queries/{missing['ID']}/answers") == []

        run_dcmtk(
            "movescu",
            "-S",
            "-aet",
            "MOVESCU",
            "-aec",
            serve.aet,
            "-aem",
            "ORTHANCB",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            serve.port,
        )
        received = {}
        for oid in second.get("/instances"):
            data = second.request("GET", f"/instances/{oid}/file")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            received[str(ds.SOPInstanceUID)] = dataset_bytes(data)
        assert set(received) == set(originals)
        for uid, path in originals.items():
            assert received[uid] == dataset_bytes(path.read_bytes()), path.name
