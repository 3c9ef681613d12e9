"""dcmtk against ``p2pacs serve``: echo, store, find, move and get, checked byte for byte."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from interop_helpers import Stored, dataset_bytes
from peers import P2pacsServe, require_tools, run_dcmtk

pytestmark = pytest.mark.interop


def test_echo(tmp_path: Path) -> None:
    require_tools("echoscu")
    with P2pacsServe(tmp_path / "site", "ECHOTEST") as serve:
        proc = run_dcmtk("echoscu", "-aec", serve.aet, "127.0.0.1", serve.port)
        assert proc.returncode == 0


def test_storescu_archived_everything(stored: Stored, tmp_path: Path) -> None:
    from p2pacs.site import Site

    stored.serve.stop()  # the site's LMDB is ours to read only once serve is gone
    try:
        with Site.open(stored.serve.site_dir).archive() as arc:
            syntaxes = {str(h.file_meta.TransferSyntaxUID) for h in stored.headers.values()}
            # uncompressed (both endians, implicit), deflate and JPEG/JPEG-LS/J2K/RLE as sent
            assert len(syntaxes) >= 8, syntaxes
            compared = 0
            for uid, path in stored.files.items():
                record = arc.index.instance(uid)
                assert record is not None, f"{path.name} ({uid}) was not archived"
                header = stored.headers[uid]
                if header.file_meta.TransferSyntaxUID.is_compressed:  # kept as sent, not decoded
                    assert record.current.transfer_syntax == header.file_meta.TransferSyntaxUID
                ts, sent = stored.wire.get(uid, ("", b""))
                if ts == record.current.transfer_syntax:  # storescu re-encodes some files
                    compared += 1
                    assert arc.dataset_bytes(record) == sent, path.name
                if str(header.get("PatientID", "")).startswith("P11"):  # generated: sent unchanged
                    assert arc.dataset_bytes(record) == dataset_bytes(path.read_bytes())
            assert compared >= 0.6 * len(stored.files)
    finally:
        stored.serve.start()


def _findscu(
    stored: Stored, out: Path, model: str, level: str, **keys: str
) -> list[pydicom.Dataset]:
    """Run findscu and read back its responses (-X writes one file per response)."""
    out.mkdir()
    args = [
        "-aet",
        "FINDSCU",
        "-aec",
        stored.serve.aet,
        model,
        "-X",
        "-od",
        out,
        "-k",
        f"QueryRetrieveLevel={level}",
    ]
    for kw, value in keys.items():
        args += ["-k", f"{kw}={value}" if value else kw]
    run_dcmtk("findscu", *args, "127.0.0.1", stored.serve.port)
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _generated(stored: Stored) -> list[pydicom.Dataset]:
    """Headers of the generated instances (seed 11: patient IDs P11...), in file order."""
    return [
        stored.headers[u]
        for u in sorted(stored.files, key=lambda u: stored.files[u].name)
        if str(stored.headers[u].get("PatientID", "")).startswith("P11")
    ]


def _of(stored: Stored, kw: str, **where: str) -> set[str]:
    return {
        str(h.get(kw, ""))
        for h in stored.headers.values()
        if all(str(h.get(k, "")) == v for k, v in where.items())
    }


def test_findscu_each_level(stored: Stored, tmp_path: Path) -> None:
    require_tools("findscu")
    rows = _findscu(stored, tmp_path / "p", "-P", "PATIENT", PatientID="", PatientName="")
    assert {str(r.get("PatientID", "")) for r in rows} == _of(stored, "PatientID")

    rows = _findscu(
        stored,
        tmp_path / "s",
        "-S",
        "STUDY",
        StudyInstanceUID="",
        PatientID="",
        StudyDate="",
        NumberOfStudyRelatedInstances="",
    )
    studies = _of(stored, "StudyInstanceUID")
    assert {str(r.StudyInstanceUID) for r in rows} == studies
    generated = _generated(stored)
    first = generated[0]
    mine = [h for h in stored.headers.values() if h.StudyInstanceUID == first.StudyInstanceUID]
    by_study = {str(r.StudyInstanceUID): r for r in rows}
    assert by_study[first.StudyInstanceUID].NumberOfStudyRelatedInstances == len(mine)

    family = str(first.PatientName).split("^")[0]
    rows = _findscu(
        stored,
        tmp_path / "w",
        "-S",
        "STUDY",
        StudyInstanceUID="",
        PatientName=f"{family.lower()}*",
        StudyDate=f"{first.StudyDate}-",
    )
    want = {
        str(h.StudyInstanceUID)
        for h in stored.headers.values()
        if str(h.get("PatientName", "")).lower().startswith(family.lower())
        and str(h.get("StudyDate", "")) >= str(first.StudyDate)
    }
    assert want and {str(r.StudyInstanceUID) for r in rows} == want

    study = str(first.StudyInstanceUID)
    rows = _findscu(
        stored,
        tmp_path / "se",
        "-S",
        "SERIES",
        StudyInstanceUID=study,
        SeriesInstanceUID="",
        Modality="",
    )
    assert {str(r.SeriesInstanceUID) for r in rows} == _of(
        stored, "SeriesInstanceUID", StudyInstanceUID=study
    )
    assert {str(r.Modality) for r in rows} == {str(first.Modality)}

    series = str(first.SeriesInstanceUID)
    rows = _findscu(
        stored,
        tmp_path / "i",
        "-P",
        "IMAGE",
        PatientID=str(first.PatientID),
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        SOPInstanceUID="",
    )
    assert {str(r.SOPInstanceUID) for r in rows} == _of(
        stored, "SOPInstanceUID", SeriesInstanceUID=series
    )


def _dataset_of(folder: Path) -> dict[str, bytes]:
    out = {}
    for path in folder.iterdir():
        out[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = dataset_bytes(
            path.read_bytes()
        )
    return out


def _archived(stored: Stored, uids: set[str]) -> dict[str, bytes]:
    """What the site holds for these instances: the generated files, sent unchanged."""
    return {u: dataset_bytes(stored.files[u].read_bytes()) for u in uids}


def test_movescu_to_storescp(stored: Stored) -> None:
    require_tools("movescu")
    generated = _generated(stored)
    study = str(generated[-1].StudyInstanceUID)
    run_dcmtk(
        "movescu",
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        stored.serve.aet,
        "-aem",
        stored.storescp.aet,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        "127.0.0.1",
        stored.serve.port,
    )
    got = _dataset_of(stored.storescp.out_dir)
    uids = _of(stored, "SOPInstanceUID", StudyInstanceUID=study)
    assert got == _archived(stored, uids)


def _getscu_series(stored: Stored, out: Path, *flags: str) -> tuple[dict[str, bytes], set[str]]:
    generated = _generated(stored)
    series = str(generated[0].SeriesInstanceUID)
    out.mkdir()
    run_dcmtk(
        "getscu",
        "-S",
        "-aet",
        "GETSCU",
        "-aec",
        stored.serve.aet,
        "+B",
        *flags,
        "-od",
        out,
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={generated[0].StudyInstanceUID}",
        "-k",
        f"SeriesInstanceUID={series}",
        "127.0.0.1",
        stored.serve.port,
    )
    return _dataset_of(out), _of(stored, "SOPInstanceUID", SeriesInstanceUID=series)


def _stored_as(stored: Stored, uids: set[str], implicit: bool) -> set[str]:
    return {
        u for u in uids if stored.headers[u].file_meta.TransferSyntaxUID.is_implicit_VR is implicit
    }


def test_getscu_one_syntax_byte_identical(stored: Stored, tmp_path: Path) -> None:
    """With one proposed syntax, instances stored in it must arrive unchanged (others are
    converted). getscu 3.6.7's +xi in fact proposes only Explicit VR LE (see its -d output)."""
    require_tools("getscu")
    got, uids = _getscu_series(stored, tmp_path / "get", "+xi")
    assert set(got) == uids
    explicit = _stored_as(stored, uids, False)
    assert explicit and {u: got[u] for u in explicit} == _archived(stored, explicit)
    for uid in uids - explicit:  # converted: same header, other encoding
        assert got[uid] != _archived(stored, {uid})[uid]


def test_getscu_explicit_vr_byte_identical(stored: Stored, tmp_path: Path) -> None:
    require_tools("getscu")
    got, uids = _getscu_series(stored, tmp_path / "get")
    assert set(got) == uids
    explicit = _stored_as(stored, uids, False)
    assert explicit and {u: got[u] for u in explicit} == _archived(stored, explicit)


def test_move_to_unknown_destination_fails(stored: Stored) -> None:
    require_tools("movescu")
    generated = _generated(stored)
    proc = run_dcmtk(
        "movescu",
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        stored.serve.aet,
        "-aem",
        "NOWHERE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={generated[0].StudyInstanceUID}",
        "127.0.0.1",
        stored.serve.port,
        check=False,
    )
    assert proc.returncode != 0 and "MoveDestinationUnknown" in proc.stderr


def test_findscu_bad_level_is_refused(stored: Stored, tmp_path: Path) -> None:
    require_tools("findscu")
    proc = run_dcmtk(
        "findscu",
        "-v",
        "-S",
        "-aec",
        stored.serve.aet,
        "-X",
        "-od",
        tmp_path,
        "-k",
        "QueryRetrieveLevel=FRAME",
        "-k",
        "StudyInstanceUID",
        "127.0.0.1",
        stored.serve.port,
        check=False,
    )
    assert not list(tmp_path.glob("rsp*.dcm"))
    # PS3.4 C.4.1.1.4: an unknown level is "Identifier does not match SOP Class" (0xA900)
    assert "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in proc.stderr
