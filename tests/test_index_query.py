"""C-FIND matching against a brute-force oracle over what pydicom reads from the imported files.

The oracle is written here from PS3.4 C.2.2.2 (single value, ``*``/``?`` wild cards, DA ranges,
UID lists, universal matching; PN case-insensitive as p2pacs documents) and does not reuse
``p2pacs.index.matching``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest

from p2pacs.archive import Archive
from p2pacs.dicom.header import LEVEL_KEYS, Level
from p2pacs.samples import generate_instances

_UNIQUE = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
_ABOVE = {
    Level.PATIENT: (Level.PATIENT,),
    Level.STUDY: (Level.PATIENT, Level.STUDY),
    Level.SERIES: (Level.PATIENT, Level.STUDY, Level.SERIES),
    Level.IMAGE: (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE),
}


def _value(ds: pydicom.Dataset, kw: str) -> str:
    if kw not in ds or ds[kw].value is None:
        return ""
    return str(ds[kw].value)


def _oracle_match(kw: str, query: str, value: str) -> bool:
    if query in ("", "*"):  # universal matching, C.2.2.2.3 and C.2.2.2.4
        return True
    if value == "":
        return False
    vr = pydicom.datadict.dictionary_VR(kw)
    if vr == "UI":
        return value in query.split("\\")
    if vr in ("DA", "TM") and "-" in query:  # only full-length bounds are queried here
        low, high = query.split("-")
        return (not low or value >= low) and (not high or value <= high)
    if "*" in query or "?" in query:
        pattern = "".join("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in query)
        flags = re.IGNORECASE if vr == "PN" else 0
        return re.fullmatch(pattern, value, flags | re.DOTALL) is not None
    return value.lower() == query.lower() if vr == "PN" else value == query


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Archive, list[Any]]]:
    src = tmp_path_factory.mktemp("query-src")
    files = generate_instances(
        src, studies=8, series_per_study=2, instances_per_series=3, rows=16, columns=16, seed=5
    )
    arc = Archive(tmp_path_factory.mktemp("query-db") / "site.lmdb", map_size=1 << 28)
    try:
        for path in files:
            arc.import_file(path)
        yield arc, [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    finally:
        arc.close()


def _oracle(datasets: list[Any], level: Level, query: dict[str, str]) -> set[str]:
    keys = [kw for lv in _ABOVE[level] for kw in LEVEL_KEYS[lv] if kw in query]
    return {
        _value(ds, _UNIQUE[level])
        for ds in datasets
        if all(_oracle_match(kw, query[kw], _value(ds, kw)) for kw in keys)
    }


def _acc_pattern(acc: str) -> str:
    return acc[:-2] + "?" + acc[-1]


def _queries(datasets: list[Any]) -> list[tuple[Level, dict[str, str], bool]]:
    """(level, query, selective): selective queries must match some but not all records."""
    first, other = datasets[0], datasets[-1]
    name = str(first.PatientName)
    family, given = name.split("^")[:2]
    dates = sorted({str(ds.StudyDate) for ds in datasets})
    mid = dates[len(dates) // 2]
    births = sorted({str(ds.PatientBirthDate) for ds in datasets})
    studies = sorted({str(ds.StudyInstanceUID) for ds in datasets})
    sops = [str(ds.SOPInstanceUID) for ds in datasets[::7]]
    return [
        (Level.STUDY, {"PatientName": ""}, False),
        (Level.STUDY, {"PatientName": "*"}, False),
        (Level.STUDY, {"PatientName": name.upper(), "StudyDate": ""}, True),
        (Level.STUDY, {"PatientName": f"{family.lower()}*"}, True),
        (Level.STUDY, {"PatientName": f"*^{given}"}, True),
        (Level.STUDY, {"PatientID": str(first.PatientID)}, True),
        (Level.STUDY, {"StudyDate": f"{mid}-"}, True),
        (Level.STUDY, {"StudyDate": f"-{mid}"}, True),
        (Level.STUDY, {"StudyDate": f"{dates[1]}-{dates[-2]}"}, True),
        (Level.STUDY, {"StudyDate": dates[0]}, True),
        (Level.STUDY, {"StudyInstanceUID": "\\".join(studies[1:4])}, True),
        (Level.STUDY, {"AccessionNumber": _acc_pattern(str(other.AccessionNumber))}, True),
        (Level.STUDY, {"StudyDescription": "C?*"}, True),
        (Level.STUDY, {"StudyDescription": "*XYZ*"}, False),
        (Level.STUDY, {"StudyTime": "-120000"}, True),
        (Level.STUDY, {"StudyTime": "120000-", "StudyDate": f"{dates[0]}-"}, True),
        (Level.SERIES, {"Modality": "MR"}, True),
        (Level.SERIES, {"BodyPartExamined": "CHEST"}, False),  # never sent: matches nothing
        (Level.SERIES, {"BodyPartExamined": "*", "PatientName": f"{family}*"}, True),
        (Level.SERIES, {"StudyInstanceUID": studies[2], "SeriesNumber": "2"}, True),
        (Level.SERIES, {"SeriesDescription": "?? series 1"}, True),
        (Level.IMAGE, {"SOPInstanceUID": "\\".join(sops)}, True),
        (Level.IMAGE, {"StudyInstanceUID": studies[0], "InstanceNumber": "2"}, True),
        (Level.IMAGE, {"PatientName": "*", "Modality": "CT", "InstanceNumber": ""}, True),
        (Level.IMAGE, {"StudyDate": f"-{mid}", "SeriesDescription": "MR*"}, True),
        (Level.PATIENT, {"PatientName": "*"}, False),
        (Level.PATIENT, {"PatientSex": str(first.PatientSex)}, True),
        (Level.PATIENT, {"PatientBirthDate": f"-{births[len(births) // 2]}"}, True),
    ]


def test_find_matches_oracle(imported: tuple[Archive, list[Any]]) -> None:
    arc, datasets = imported
    for level, query, selective in _queries(datasets):
        want = _oracle(datasets, level, query)
        everything = _oracle(datasets, level, {})
        if selective:
            assert want and want != everything, f"query {query} does not discriminate"
        # the SCU sends the unique key of the level (PS3.4 C.4.1.2.1); p2pacs returns it only then
        got = list(arc.index.find(level, {**query, _UNIQUE[level]: query.get(_UNIQUE[level], "")}))
        uids = [str(r[_UNIQUE[level]]) for r in got]
        assert len(uids) == len(set(uids)), f"{level} {query}: duplicate responses"
        assert set(uids) == want, f"{level} {query}"
        for row in got:
            assert set(query) <= set(row)


def test_find_returns_stored_values(imported: tuple[Archive, list[Any]]) -> None:
    arc, datasets = imported
    by_sop = {str(ds.SOPInstanceUID): ds for ds in datasets}
    keys = ("PatientName", "PatientID", "StudyDate", "AccessionNumber", "Modality")
    rows = list(arc.index.find(Level.IMAGE, dict.fromkeys(keys, "")))
    assert len(rows) == len(datasets)
    for row in rows:
        ds = by_sop[str(row["SOPInstanceUID"])]
        assert {kw: str(row[kw]) for kw in keys} == {kw: _value(ds, kw) for kw in keys}


def test_study_counts(imported: tuple[Archive, list[Any]]) -> None:
    arc, datasets = imported
    query = {"NumberOfStudyRelatedInstances": "", "NumberOfStudyRelatedSeries": ""}
    for row in arc.index.find(Level.STUDY, query):
        uid = str(row["StudyInstanceUID"])
        mine = [ds for ds in datasets if str(ds.StudyInstanceUID) == uid]
        assert row["NumberOfStudyRelatedInstances"] == str(len(mine))
        assert row["NumberOfStudyRelatedSeries"] == str(len({ds.SeriesInstanceUID for ds in mine}))
