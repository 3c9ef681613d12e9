"""dcmtk against ``p2pacs serve``: echo, store, find, move and get, checked byte for byte.

"Byte for byte" means: the dataset bytes (after the file meta, which every receiver rebuilds)
that come back equal the bytes that went over the wire, in that transfer syntax, when storescu
sent the file, as bare pynetdicom SCPs negotiating like the gateway recorded them (see
``WireSCP``): storescu re-encodes some files on the way, so the files themselves are compared
only where it sent them as they were.
"""

from __future__ import annotations

import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from p2pacs.dicom.transcode import deliverable_for_all

from interop_helpers import (
    GETSCU_PREFER,
    RetrievedAll,
    Stored,
    dataset_bytes,
    movescu,
    read_folder,
    syntax_mix,
)
from interop_peers import StoreSCP, require_tools, run_dcmtk

pytestmark = pytest.mark.interop

COMPRESSED = {
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
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
    run_dcmtk(
        "echoscu", "-aet", "ECHOSCU", "-aec", stored.serve.aet, "127.0.0.1", stored.serve.port
    )


def test_echoscu(stored: Stored) -> None:
    require_tools("echoscu")
    _echo(stored)


def test_storescu_mixed_folder_all_sent(stored: Stored) -> None:
    """storescu sent every file of the mixed folder (many SOP classes, every syntax of
    pydicom's test files) and the site acknowledged it; the reference SCP got the same."""
    mix = syntax_mix({u: stored.headers[u] for u in stored.sent})
    assert set(mix) >= COMPRESSED, mix
    assert len(mix) >= 9, mix
    classes = {str(stored.headers[u].SOPClassUID) for u in stored.sent}
    assert len(classes) >= 10, classes
    failed = {stored.files[u].name: s for u, s in stored.statuses.items() if s != "Success"}
    assert not failed, failed
    assert stored.sent == set(stored.wire)


def test_every_sent_file_is_retrievable(stored: Stored, retrieved: RetrievedAll) -> None:
    """C-MOVE of every study storescu sent: each acknowledged instance comes back with the
    very bytes that went over the wire in the syntax it was stored in."""
    assert "exit 0" in retrieved.log, retrieved.log
    got = retrieved.files
    missing = [stored.files[u].name for u in stored.sent - set(got)]
    assert not missing, missing
    changed = [stored.files[u].name for u in stored.sent if not stored.same_as_sent(u, got[u])]
    assert not changed, changed
    # sent compressed: stored and given back compressed, never transcoded
    for uid in stored.sent:
        sent_as = str(stored.headers[uid].file_meta.TransferSyntaxUID)
        if sent_as in COMPRESSED:
            assert got[uid][0] == sent_as, stored.files[uid].name


def test_movescu_study_byte_identical(stored: Stored, move_dest: StoreSCP) -> None:
    """One generated study (explicit and implicit VR, a 10 MiB multi-frame): what arrives at
    storescp is what was sent, and where storescu sent the file as it was, the file itself."""
    require_tools("movescu")
    first = _generated(stored)[0]
    study = str(first.StudyInstanceUID)
    out = movescu(stored, "STUDY", move_dest.aet, f"StudyInstanceUID={study}")
    assert "exit 0" in out, out
    got = read_folder(move_dest.out_dir)
    uids = stored.uids(StudyInstanceUID=study)
    assert len(uids) >= 6 and set(got) == uids
    assert all(stored.same_as_sent(u, got[u]) for u in uids)
    unchanged = 0
    for uid in uids:
        header = stored.headers[uid]
        if got[uid][0] == str(header.file_meta.TransferSyntaxUID):
            unchanged += 1
            assert got[uid][1] == dataset_bytes(stored.files[uid].read_bytes())
    assert unchanged >= 1


def _decoded(syntax: str, data: bytes) -> pydicom.Dataset:
    ts = pydicom.uid.UID(syntax)
    if ts.is_deflated:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    return read_dataset(BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)


GET_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    *sorted(COMPRESSED),
]
# getscu 3.6.7's +xi proposes Explicit VR LE only (see ``getscu -d +xi``): instances stored in
# Implicit VR LE come back as Explicit VR LE, element for element the same.
CONVERTED = {ImplicitVRLittleEndian}


def _pixels(syntax: str, data: bytes) -> Any:
    """pydicom's decode of a dataset's pixels; None when no installed decoder reads them."""
    ds = _decoded(syntax, data)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    try:
        return ds.pixel_array
    except Exception:
        return None


@pytest.mark.parametrize("syntax", GET_SYNTAXES)
def test_getscu_byte_identical(
    stored: Stored, retrieved: RetrievedAll, tmp_path: Path, syntax: str
) -> None:
    """getscu 3.6.7 has no accept-all flag: one run per stored syntax, preferring it, at IMAGE
    level for the instances stored in it. getscu proposes one context per SOP class, its
    preferred syntax first, then the uncompressed ones; the gateway accepts the first it can
    deliver every instance in (``transcode.deliverable_for_all``). Where that is the stored
    syntax, every instance comes back unchanged (see CONVERTED); where it is not (JPEG lossy
    and lossless, JPEG 2000 lossy-capable: no encoder), the instances come back as Explicit VR
    LE with the pixel values pydicom decodes, and those no decoder here reads (12-bit JPEG
    Extended, a corrupt JPEG 2000 file) are counted failures."""
    require_tools("getscu")
    uids = {u for u in stored.sent if retrieved.files[u][0] == syntax}
    assert uids, f"nothing was stored in {syntax}"
    proc = run_dcmtk(
        "getscu",
        "-S",
        "-aet",
        "GETSCU",
        "-aec",
        stored.serve.aet,
        GETSCU_PREFER[syntax],
        "+B",
        "-od",
        tmp_path,
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        "SOPInstanceUID=" + "\\".join(sorted(uids)),
        "127.0.0.1",
        stored.serve.port,
        check=False,
    )
    got = read_folder(tmp_path)
    if syntax in CONVERTED:
        assert set(got) == uids, proc.stderr[-1500:]
        for uid in uids:
            assert got[uid][0] == ExplicitVRLittleEndian
            want = _decoded(syntax, stored.wire[uid][syntax])
            assert _decoded(*got[uid]) == want, stored.files[uid]
        return
    if syntax not in COMPRESSED or deliverable_for_all(syntax):
        missing = {stored.files[u].name for u in uids - set(got)}
        assert not missing, f"not received: {missing}\n{proc.stderr[-1500:]}"
        changed = {stored.files[u].name for u in uids if not stored.same_as_sent(u, got[u])}
        assert not changed
        return
    wanted = {u: _pixels(syntax, stored.wire[u][syntax]) for u in uids}
    assert set(got) == {u for u, px in wanted.items() if px is not None}, proc.stderr[-1500:]
    # JPEG Extended: pydicom's samples are all 12-bit, so nothing comes (each a failure)
    assert got or syntax == "1.2.840.10008.1.2.4.51"
    for uid, (ts, data) in got.items():
        assert ts == ExplicitVRLittleEndian
        assert np.array_equal(_pixels(ts, data), wanted[uid]), stored.files[uid].name


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
    out = movescu(stored, "STUDY", "NOWHERE", f"StudyInstanceUID={first.StudyInstanceUID}")
    assert "exit 0" not in out
    # PS3.4 C.4.2.1.5: Refused, Move Destination unknown (0xA801)
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in out, out
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
