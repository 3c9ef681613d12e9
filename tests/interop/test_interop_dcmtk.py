"""dcmtk against ``p2pacs serve``: echo, store, find, move and get, checked byte for byte.

"Byte for byte" means: the dataset bytes (after the file meta, which every receiver rebuilds)
that come back equal the bytes that went over the wire when storescu sent the file, as a bare
pynetdicom SCP negotiating like the gateway recorded them.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from interop_helpers import GETSCU_PREFER, Stored, dataset_bytes, read_folder, syntax_mix
from interop_peers import StoreSCP, require_tools, run_dcmtk

pytestmark = pytest.mark.interop

COMPRESSED = {
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
}


def _generated(stored: Stored) -> list[pydicom.Dataset]:
    """Headers of the generated instances (seed 11: patient IDs P11...), in file order."""
    return [
        stored.headers[u]
        for u in sorted(stored.sent, key=lambda u: stored.files[u].name)
        if str(stored.headers[u].get("PatientID", "")).startswith("P11")
    ]


def _echo(stored: Stored) -> None:
    run_dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", stored.serve.aet, "127.0.0.1", stored.serve.port)


def test_echoscu(stored: Stored) -> None:
    require_tools("echoscu")
    _echo(stored)


def test_storescu_mixed_folder_all_sent(stored: Stored) -> None:
    """storescu sent every file of the mixed folder (many SOP classes, every syntax of
    pydicom's test files) and the site acknowledged it; the reference SCP got the same."""
    mix = syntax_mix({u: stored.headers[u] for u in stored.sent})
    assert COMPRESSED <= set(mix), mix
    assert len(mix) >= 9, mix
    classes = {str(stored.headers[u].SOPClassUID) for u in stored.sent}
    assert len(classes) >= 10, classes
    failed = {stored.files[u].name: s for u, s in stored.statuses.items() if s != "Success"}
    assert not failed, failed
    assert stored.sent == set(stored.wire)


def _movescu(stored: Stored, level: str, dest: str, *keys: str) -> str:
    proc = run_dcmtk(
        "movescu",
        "-v",
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        stored.serve.aet,
        "-aem",
        dest,
        "-k",
        f"QueryRetrieveLevel={level}",
        *(a for k in keys for a in ("-k", k)),
        "127.0.0.1",
        stored.serve.port,
        check=False,
    )
    return proc.stdout + proc.stderr + f"\nexit {proc.returncode}"


def test_every_sent_file_is_retrievable(stored: Stored, move_dest: StoreSCP) -> None:
    """C-MOVE of every study storescu sent: each acknowledged instance comes back, in the
    syntax it went in, with the very bytes that went over the wire."""
    require_tools("movescu")
    studies = sorted(stored.values("StudyInstanceUID"))
    out = _movescu(stored, "STUDY", move_dest.aet, "StudyInstanceUID=" + "\\".join(studies))
    assert "exit 0" in out, out
    got = read_folder(move_dest.out_dir)
    missing = [stored.files[u].name for u in stored.sent - set(got)]
    assert not missing, missing
    changed = [stored.files[u].name for u in stored.sent if got[u] != stored.wire[u]]
    assert not changed, changed


def test_movescu_study_byte_identical(stored: Stored, move_dest: StoreSCP) -> None:
    """One generated study (explicit and implicit VR, a 10 MiB multi-frame): what arrives at
    storescp is what was sent, and where storescu sent the file as it was, the file itself."""
    require_tools("movescu")
    first = _generated(stored)[0]
    study = str(first.StudyInstanceUID)
    out = _movescu(stored, "STUDY", move_dest.aet, f"StudyInstanceUID={study}")
    assert "exit 0" in out, out
    got = read_folder(move_dest.out_dir)
    uids = stored.uids(StudyInstanceUID=study)
    assert len(uids) >= 6 and set(got) == uids
    assert {u: got[u] for u in uids} == {u: stored.wire[u] for u in uids}
    unchanged = 0
    for uid in uids:
        header = stored.headers[uid]
        if got[uid][0] == str(header.file_meta.TransferSyntaxUID):
            unchanged += 1
            assert got[uid][1] == dataset_bytes(stored.files[uid].read_bytes())
    assert unchanged >= 1


def test_getscu_each_syntax_byte_identical(stored: Stored, tmp_path: Path) -> None:
    """getscu 3.6.7 has no accept-all flag: one run per stored syntax, preferring it, at IMAGE
    level for that syntax's instances; every instance comes back unchanged."""
    require_tools("getscu")
    groups: dict[str, set[str]] = {}
    for uid in stored.sent:
        groups.setdefault(stored.wire[uid][0], set()).add(uid)
    assert len(groups) >= 6, sorted(groups)
    for i, (ts, uids) in enumerate(sorted(groups.items())):
        out = tmp_path / f"get{i}"
        out.mkdir()
        proc = run_dcmtk(
            "getscu",
            "-S",
            "-aet",
            "GETSCU",
            "-aec",
            stored.serve.aet,
            GETSCU_PREFER[ts],
            "+B",
            "-od",
            out,
            "-k",
            "QueryRetrieveLevel=IMAGE",
            "-k",
            "SOPInstanceUID=" + "\\".join(sorted(uids)),
            "127.0.0.1",
            stored.serve.port,
            check=False,
        )
        got = read_folder(out)
        names = {stored.files[u].name for u in uids - set(got)}
        assert not names, f"{ts}: not received {names}\n{proc.stderr[-3000:]}"
        changed = {stored.files[u].name for u in uids if got[u] != stored.wire[u]}
        assert not changed, f"{ts}: changed {changed}"


def _findscu(
    stored: Stored, out: Path, model: str, level: str, **keys: str
) -> list[pydicom.Dataset]:
    """Run findscu and read back its responses (-X writes one file per response)."""
    out.mkdir()
    args: list[str | Path] = ["-aet", "FINDSCU", "-aec", stored.serve.aet, model, "-X"]
    args += ["-od", out, "-k", f"QueryRetrieveLevel={level}"]
    for kw, value in keys.items():
        args += ["-k", f"{kw}={value}" if value else kw]
    run_dcmtk("findscu", *args, "127.0.0.1", stored.serve.port)
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_findscu_patient_level(stored: Stored, tmp_path: Path) -> None:
    require_tools("findscu")
    rows = _findscu(stored, tmp_path / "p", "-P", "PATIENT", PatientID="", PatientName="")
    assert {str(r.get("PatientID", "")) for r in rows} == stored.values("PatientID")
    first = _generated(stored)[0]
    mine = [r for r in rows if r.PatientID == first.PatientID]
    assert len(mine) == 1 and str(mine[0].PatientName) == str(first.PatientName)


def test_findscu_study_level(stored: Stored, tmp_path: Path) -> None:
    require_tools("findscu")
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
    assert {str(r.StudyInstanceUID) for r in rows} == stored.values("StudyInstanceUID")
    by_study = {str(r.StudyInstanceUID): r for r in rows}
    for header in _generated(stored):
        row = by_study[str(header.StudyInstanceUID)]
        assert row.PatientID == header.PatientID
        assert row.StudyDate == header.StudyDate
        count = len(stored.uids(StudyInstanceUID=str(header.StudyInstanceUID)))
        assert int(row.NumberOfStudyRelatedInstances) == count

    first = _generated(stored)[0]
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
        str(stored.headers[u].StudyInstanceUID)
        for u in stored.sent
        if str(stored.headers[u].get("PatientName", "")).lower().startswith(family.lower())
        and str(stored.headers[u].get("StudyDate", "")) >= str(first.StudyDate)
    }
    assert want and {str(r.StudyInstanceUID) for r in rows} == want


def test_findscu_series_level(stored: Stored, tmp_path: Path) -> None:
    require_tools("findscu")
    first = _generated(stored)[0]
    study = str(first.StudyInstanceUID)
    rows = _findscu(
        stored,
        tmp_path / "se",
        "-S",
        "SERIES",
        StudyInstanceUID=study,
        SeriesInstanceUID="",
        Modality="",
        SeriesNumber="",
    )
    assert {str(r.SeriesInstanceUID) for r in rows} == stored.values(
        "SeriesInstanceUID", StudyInstanceUID=study
    )
    for row in rows:
        header = stored.headers[next(iter(stored.uids(SeriesInstanceUID=row.SeriesInstanceUID)))]
        assert row.Modality == header.Modality
        assert int(row.SeriesNumber) == int(header.SeriesNumber)


def test_findscu_image_level(stored: Stored, tmp_path: Path) -> None:
    require_tools("findscu")
    first = _generated(stored)[0]
    series = str(first.SeriesInstanceUID)
    rows = _findscu(
        stored,
        tmp_path / "i",
        "-S",
        "IMAGE",
        StudyInstanceUID=str(first.StudyInstanceUID),
        SeriesInstanceUID=series,
        SOPInstanceUID="",
        SOPClassUID="",
        InstanceNumber="",
    )
    uids = stored.uids(SeriesInstanceUID=series)
    assert {str(r.SOPInstanceUID) for r in rows} == uids
    for row in rows:
        header = stored.headers[str(row.SOPInstanceUID)]
        assert row.SOPClassUID == header.SOPClassUID
        assert int(row.InstanceNumber) == int(header.InstanceNumber)


def test_move_to_unknown_destination_fails(stored: Stored) -> None:
    require_tools("movescu", "echoscu")
    first = _generated(stored)[0]
    out = _movescu(stored, "STUDY", "NOWHERE", f"StudyInstanceUID={first.StudyInstanceUID}")
    assert "exit 0" not in out
    # PS3.4 C.4.2.1.5: Refused, Move Destination unknown (0xA801)
    assert "Move Response (Failed: MoveDestinationUnknown)" in out, out
    assert stored.serve.alive()
    _echo(stored)


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
