"""Federation-wide DICOMweb without sockets: merging members' answers, the peer search
request, and the CORS origins a site accepts in its config."""

from __future__ import annotations

import pytest

from p2pacs.config import WebConfig, origin_problem
from p2pacs.dicom import Level
from p2pacs.dicomweb.federated import SiteRows, merge_rows
from p2pacs.dicomweb.qido import QidoError, parse_query, row_to_json
from p2pacs.federation.search import MAX_FIND_ROWS, parse_find


def test_merge_dedupes_by_level_uid_local_first() -> None:
    local = SiteRows("a", "AE_A", [{"StudyInstanceUID": "1.1", "PatientID": "here"}])
    b = SiteRows(
        "b",
        "AE_B",
        [
            {"StudyInstanceUID": "1.2", "PatientID": "b"},
            {"StudyInstanceUID": "1.1", "PatientID": "b's copy"},
            {"PatientID": "no uid: dropped"},
        ],
    )
    c = SiteRows("c", "AE_C", [{"StudyInstanceUID": "1.2"}, {"StudyInstanceUID": "1.2"}])
    merged = merge_rows(Level.STUDY, local, [b, c])
    assert [m.row["StudyInstanceUID"] for m in merged] == ["1.1", "1.2"]
    assert merged[0].row["PatientID"] == "here" and merged[0].local
    assert merged[0].ae_titles == ("AE_A", "AE_B")
    assert merged[1].ae_titles == ("AE_B", "AE_C") and not merged[1].local
    series = merge_rows(
        Level.SERIES, SiteRows("a", "A", []), [SiteRows("b", "B", [{"SeriesInstanceUID": "2"}])]
    )
    assert [m.row["SeriesInstanceUID"] for m in series] == ["2"]


def test_federated_result_names_its_holders() -> None:
    out = row_to_json(
        ["StudyInstanceUID"], {"StudyInstanceUID": "1.2"}, ae_titles=["A", "B"],
        availability="NEARLINE",
    )  # fmt: skip
    assert out["00080054"] == {"vr": "AE", "Value": ["A", "B"]}
    assert out["00080056"]["Value"] == ["NEARLINE"]
    assert parse_query(Level.STUDY, [("federation", "true")]).federation
    assert not parse_query(Level.STUDY, [("federation", "false")]).federation
    with pytest.raises(QidoError, match="federation must be true or false"):
        parse_query(Level.STUDY, [("federation", "1")])


def test_parse_find_checks_every_field() -> None:
    level, query, limit = parse_find(
        {"level": "SERIES", "query": {"StudyInstanceUID": ["1", "2"], "Modality": ""}, "limit": 5}
    )
    assert (level, limit) == (Level.SERIES, 5)
    assert query == {"StudyInstanceUID": ["1", "2"], "Modality": ""}
    bad = [
        ([], "expected"),
        ({"level": "PATIENT", "query": {}, "limit": 1}, "level must be"),
        ({"level": "STUDY", "query": [], "limit": 1}, "query must be an object"),
        ({"level": "STUDY", "query": {"PatientID": 3}, "limit": 1}, "must be text"),
        ({"level": "STUDY", "query": {"PatientID": [1]}, "limit": 1}, "must be text"),
        ({"level": "STUDY", "query": {}, "limit": 0}, "limit must be"),
        ({"level": "STUDY", "query": {}, "limit": MAX_FIND_ROWS + 1}, "limit must be"),
        ({"level": "STUDY", "query": {}, "limit": True}, "limit must be"),
    ]
    for body, reason in bad:
        with pytest.raises(ValueError, match=reason):
            parse_find(body)


def test_cors_origins_are_checked() -> None:
    assert origin_problem("https://viewer.example:8443") == ""
    assert origin_problem("http://127.0.0.1:3000") == ""
    for bad in ("*", "viewer.example", "https://viewer.example/", "ftp://x", "https://a/b"):
        assert origin_problem(bad), bad
    web = WebConfig(cors_origins=["https://ok.example", "https://bad.example/path"])
    problems = web.check()
    assert any("bad.example" in p for p in problems)
    assert not any("ok.example" in p for p in problems)


def test_warnings_are_header_safe() -> None:
    from p2pacs.dicomweb.qido_rs import search_response

    resp = search_response([], ['not searched: b: "boom"\r\nX-Evil: 1 ü'])
    assert resp.status == 204
    assert resp.headers["Warning"] == '299 p2pacs "not searched: b: ?boom???X-Evil: 1 ?"'
