"""DICOMweb without sockets: QIDO-RS parameters, DICOM JSON of index rows, Accept headers,
metadata, frames and the STOW-RS response dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames

from p2pacs.dicom import Level, split_part10
from p2pacs.dicomweb.qido import MAX_LIMIT, QidoError, parse_query, row_to_json
from p2pacs.dicomweb.wado import (
    MetadataCache,
    NotAcceptableError,
    StowResult,
    accepted_syntaxes,
    frames_of,
    metadata_json,
    stow_response,
    wants_json,
)

DICOM = 'multipart/related; type="application/dicom"'


def _file(pydicom_all_files: list[Path], name: str) -> Path:
    return next(p for p in pydicom_all_files if p.name == name)


def test_parse_query_keys_tags_uid_lists_and_paging() -> None:
    q = parse_query(
        Level.STUDY,
        [
            ("PatientName", "SMITH*"),
            ("00100020", "P1"),
            ("StudyInstanceUID", "1.2.3,1.2.4"),
            ("StudyDate", "20200101-20201231"),
            ("includefield", "StudyDescription,00081030"),
            ("limit", "5"),
            ("offset", "2"),
        ],
    )
    assert q.match == {
        "PatientName": "SMITH*",
        "PatientID": "P1",
        "StudyInstanceUID": ["1.2.3", "1.2.4"],
        "StudyDate": "20200101-20201231",
    }
    assert (q.limit, q.offset) == (5, 2)
    assert "StudyDescription" in q.keys and "NumberOfStudyRelatedInstances" in q.keys
    index = q.index_query()
    assert index["StudyDescription"] == "" and index["PatientID"] == "P1"
    assert parse_query(Level.STUDY, [("limit", "999999999")]).limit == MAX_LIMIT


def test_parse_query_includefield_all_and_path_uids() -> None:
    q = parse_query(Level.SERIES, [("includefield", "all")], {"StudyInstanceUID": "1.2"})
    assert q.match == {"StudyInstanceUID": "1.2"}
    assert {"BodyPartExamined", "PatientBirthDate", "StudyDescription"} <= set(q.keys)
    assert "SOPInstanceUID" not in q.keys  # all: this level and those above it


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ([("NoSuchKeyword", "x")], "unknown query parameter"),
        ([("FFFF0001", "x")], "unknown attribute tag"),
        ([("limit", "ten")], "limit must be a whole number"),
        ([("offset", "-1")], "must not be negative"),
        ([("fuzzymatching", "maybe")], "fuzzymatching must be"),
        ([("PatientID", "a"), ("PatientID", "b")], "given twice"),
        ([("includefield", "Nope")], "unknown query parameter"),
    ],
)
def test_bad_queries_say_why(params: list[tuple[str, str]], reason: str) -> None:
    with pytest.raises(QidoError, match=reason):
        parse_query(Level.STUDY, params)
    with pytest.raises(QidoError, match="differs from the one in the path"):
        parse_query(Level.SERIES, [("StudyInstanceUID", "9")], {"StudyInstanceUID": "1"})


def test_fuzzy_matching_is_a_warning() -> None:
    q = parse_query(Level.STUDY, [("fuzzymatching", "true")])
    assert q.warnings and "fuzzymatching" in q.warnings[0]


def test_row_to_json_types_values_for_their_vr() -> None:
    row = {
        "StudyInstanceUID": "1.2.3",
        "PatientName": "Müller^Hans",
        "ModalitiesInStudy": ["CT", "MR"],
        "NumberOfStudyRelatedInstances": "12",
        "StudyDate": "",
    }
    keys = ["StudyInstanceUID", "PatientName", "ModalitiesInStudy"]
    keys += ["NumberOfStudyRelatedInstances", "StudyDate"]
    out = row_to_json(keys, row, "http://h/dicomweb/studies/1.2.3")
    assert out["0020000D"] == {"vr": "UI", "Value": ["1.2.3"]}
    assert out["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Müller^Hans"}]}
    assert out["00080061"]["Value"] == ["CT", "MR"]
    assert out["00201208"] == {"vr": "IS", "Value": [12]}
    assert out["00080020"] == {"vr": "DA"}  # empty: no Value
    assert out["00081190"]["Value"] == ["http://h/dicomweb/studies/1.2.3"]
    assert out["00080056"]["Value"] == ["ONLINE"]
    assert out["00080005"]["Value"] == ["ISO_IR 192"]


def test_accept_headers() -> None:
    assert accepted_syntaxes(None, "application/dicom") == ["1.2.840.10008.1.2.1"]
    assert accepted_syntaxes("*/*", "application/dicom") == ["1.2.840.10008.1.2.1"]
    assert accepted_syntaxes(f"{DICOM}; transfer-syntax=*", "application/dicom") == ["*"]
    two = f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.5; q=0.5, {DICOM}; transfer-syntax=*"
    assert accepted_syntaxes(two, "application/dicom") == ["*", "1.2.840.10008.1.2.5"]
    # JPEG Baseline: no encoder, so never promised; on its own it is 406
    with pytest.raises(NotAcceptableError, match="none of the accepted"):
        accepted_syntaxes(f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.4.50", "application/dicom")
    with pytest.raises(NotAcceptableError):
        accepted_syntaxes("image/jpeg", "application/dicom")
    assert wants_json(None) and wants_json("application/dicom+json")
    assert not wants_json("application/dicom+xml")


def test_metadata_without_pixels(pydicom_all_files: list[Path]) -> None:
    path = _file(pydicom_all_files, "MR_small_jp2klossless.dcm")
    part = split_part10(path.read_bytes())
    meta = metadata_json(part.dataset, part.transfer_syntax)
    original = pydicom.dcmread(path)
    assert meta["00080018"]["Value"] == [original.SOPInstanceUID]
    assert meta["00280010"]["Value"] == [original.Rows]
    assert meta["7FE00010"] == {"vr": "OW", "BulkDataURI": "bulkdata/7FE00010"}  # not read


def test_frames_uncompressed_and_decoded(pydicom_all_files: list[Path]) -> None:
    path = _file(pydicom_all_files, "SC_rgb_rle_2frame.dcm")
    part = split_part10(path.read_bytes())
    arr = pydicom.dcmread(path).pixel_array
    got = frames_of(part.dataset, part.transfer_syntax, [2, 1])
    assert got == ([arr[1].tobytes(), arr[0].tobytes()], "1.2.840.10008.1.2.1")
    with pytest.raises(IndexError, match=r"frame 3 out of 1\.\.2"):
        frames_of(part.dataset, part.transfer_syntax, [3])
    # as stored: the RLE-compressed frame itself
    stored = list(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=2))
    got = frames_of(part.dataset, part.transfer_syntax, [2], as_stored=True)
    assert got == ([stored[1]], "1.2.840.10008.1.2.5")
    with pytest.raises(IndexError, match=r"frame 0 out of"):
        frames_of(part.dataset, part.transfer_syntax, [0], as_stored=True)
    ct = _file(pydicom_all_files, "CT_small.dcm")
    part = split_part10(ct.read_bytes())
    (frame,), ts = frames_of(part.dataset, part.transfer_syntax, [1], as_stored=True)
    assert ts == "1.2.840.10008.1.2.1"  # stored uncompressed: native either way
    want = pydicom.dcmread(ct).pixel_array
    assert np.array_equal(np.frombuffer(frame, dtype=want.dtype).reshape(want.shape), want)


def test_stow_response_dataset() -> None:
    out = stow_response(
        [
            StowResult("1.2.840.10008.5.1.4.1.1.2", "1.2.3", None, "http://h/s/1/series/2/i"),
            StowResult("1.2.840.10008.5.1.4.1.1.2", "1.2.4", 0xA900),
            StowResult("", "", 0xC000),
        ],
        "http://h/s/1",
    )
    assert out["00081190"]["Value"] == ["http://h/s/1"]
    (done,) = out["00081199"]["Value"]
    assert done["00081155"]["Value"] == ["1.2.3"]
    assert done["00081190"]["Value"] == ["http://h/s/1/series/2/i"]
    failed = out["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [[0xA900], [0xC000]]
    assert "Value" not in failed[1]["00081155"]


def test_metadata_cache_drops_least_recently_used() -> None:
    cache = MetadataCache(capacity=2)
    cache.put("a", b"1")
    cache.put("b", b"2")
    assert cache.get("a") == b"1"  # a is now the most recently used
    cache.put("c", b"3")
    assert cache.get("b") is None and cache.get("a") == b"1" and cache.get("c") == b"3"
    assert len(cache) == 2
