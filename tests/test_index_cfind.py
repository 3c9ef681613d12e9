"""C-FIND through the secondary indexes returns exactly what a full scan returns.

The oracle walks every record through the public lookups (``studies``, ``series_of``,
``study_instances``) and applies ``matching.matches`` to each, as the index did before it had
secondary indexes; the index must give the same responses for every query, whichever index it
starts from. The corpus: pydicom's test files, generated CT/MR studies, and synthetic studies
with awkward values (case and look-alike letters in names, partial dates and times, missing
keys, several modalities, attributes that arrive with a later instance or version).
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from p2pacs.archive import Archive
from p2pacs.dicom.header import LEVEL_KEYS, AttrValue, Level
from p2pacs.index.matching import matches
from p2pacs.index.secondary import Secondary
from p2pacs.samples import generate_instances

Query = dict[str, str | list[str] | None]
UNIQUE = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
ORDER = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)

# --- building instances ---------------------------------------------------------------------


def part10(**attrs: Any) -> bytes:
    """A tiny Part-10 CT instance with ``attrs`` (None: attribute left out)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.PixelData = b"\x00" * 8
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


NAMES = [
    "Smith^John",
    "SMITH^Anna",
    "smithers^Karl",
    "Müller^Jürgen",
    "MÜLLER^Ines",
    "\u0130van^Olga",  # İvan: İ folds to i
    "ivanov^Piotr",
    "\u017fmith^Omar",  # long s: matches SMITH* case-insensitively
    "\u212aarl^Lucia",  # KELVIN SIGN
    "Straße^Maria",
    "STRASSE^Jean",
    "O'Brien^Sean^^Dr",
    "  Doe^Jane^^  ",
    "Doe^Jane^",
    "Ng",
    "Σωκράτης^\u0396",
    "山田^太郎",
    "",
]
DATES = [
    "20200101",
    "20200115",
    "20200131",
    "20200201",
    "20191231",
    "2020",
    "202001",
    "",
    "20210704",
]
TIMES = ["12", "1230", "123015", "123015.5", "0700", "235959.999999", "7", "", "09:30"]
MODALITIES = ["CT", "MR", "CR", "US", "PT", "MG"]


def synthetic(arc: Archive, studies: int, seed: int) -> None:
    """``studies`` studies of 1-3 series with awkward values; some attributes only come with
    a study's second instance, some modalities only with an instance's second version."""
    rng = random.Random(seed)
    futures = []
    for s in range(studies):
        study = {
            "StudyInstanceUID": generate_uid(),
            "PatientName": rng.choice(NAMES) or None,
            "PatientID": rng.choice([f"P{s % 7:03d}", f"p{s % 5}", "ID 1", "", "P\\Q"]) or None,
            "AccessionNumber": rng.choice([f"A{s:05d}", f"a{s % 3}", "", None]),
            "StudyDate": rng.choice(DATES) or None,
            "StudyTime": rng.choice(TIMES) or None,
            "StudyDescription": rng.choice(["CT HEAD", "MR KNEE", "chest"]),
        }
        for r in range(rng.randint(1, 3)):
            series = {
                "SeriesInstanceUID": generate_uid(),
                "Modality": rng.choice(MODALITIES),
                "SeriesNumber": str(r + 1),
            }
            for i in range(rng.randint(1, 3)):
                attrs = {**study, **series, "InstanceNumber": str(i + 1)}
                if s % 4 == 1 and r == 0 and i == 0:  # first instance lacks these
                    attrs.update(AccessionNumber=None, PatientName=None, StudyDate=None)
                sop = generate_uid()
                futures.append(arc.submit_file_bytes(part10(SOPInstanceUID=sop, **attrs)))
                if s % 5 == 2 and i == 0:  # a second version with another modality
                    again = part10(SOPInstanceUID=sop, **{**attrs, "Modality": "NM"})
                    futures.append(arc.submit_file_bytes(again))
    for f in futures:
        f.result(60)


# --- the oracle -----------------------------------------------------------------------------


def _match(query: Query, level: Level, attrs: dict[str, AttrValue], extra: tuple[str, ...]) -> bool:
    keys = (*LEVEL_KEYS[level], *extra)
    return all(matches(kw, query[kw], attrs.get(kw)) for kw in keys if kw in query)


def _respond(query: Query, attrs: dict[str, AttrValue], level: Level) -> dict[str, AttrValue]:
    out = {kw: attrs.get(kw, "") for kw in query}
    for lv in ORDER[: ORDER.index(level) + 1]:
        if lv is not Level.PATIENT or UNIQUE[lv] in query:
            out[UNIQUE[lv]] = attrs.get(UNIQUE[lv], "")
    return out


def scan(arc: Archive, level: Level, query: Query) -> list[dict[str, AttrValue]]:
    """Every record read and matched: what C-FIND returned before the secondary indexes."""
    idx = arc.index
    out = []
    studies = list(idx.studies())
    if level is Level.PATIENT:
        by_key: dict[str, list[Any]] = {}
        firsts: dict[str, dict[str, AttrValue]] = {}
        with arc.db.read() as txn:
            import msgpack

            for k, v in txn.cursor(db=arc.db.db("ix_patient")):
                rec = msgpack.unpackb(v, raw=False)
                firsts[bytes(k).decode()] = rec["a"]
                by_key[bytes(k).decode()] = [s for s in studies if s.study_uid in rec["st"]]
        for key, attrs in firsts.items():
            mine = by_key[key]
            full = {
                **attrs,
                "NumberOfPatientRelatedStudies": str(len(mine)),
                "NumberOfPatientRelatedSeries": str(sum(s.series for s in mine)),
                "NumberOfPatientRelatedInstances": str(sum(s.instances for s in mine)),
            }
            counts = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries")
            if _match(query, Level.PATIENT, full, (*counts, "NumberOfPatientRelatedInstances")):
                out.append(_respond(query, full, Level.PATIENT))
        return out
    for st in studies:
        attrs: dict[str, AttrValue] = {
            **st.attrs,
            "StudyInstanceUID": st.study_uid,
            "ModalitiesInStudy": list(st.modalities),
            "SOPClassesInStudy": list(st.sop_classes),
            "NumberOfStudyRelatedSeries": str(st.series),
            "NumberOfStudyRelatedInstances": str(st.instances),
        }
        computed = ("ModalitiesInStudy", "SOPClassesInStudy")
        counts = ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
        if not (
            _match(query, Level.PATIENT, attrs, ())
            and _match(query, Level.STUDY, attrs, (*computed, *counts))
        ):
            continue
        if level is Level.STUDY:
            out.append(_respond(query, attrs, level))
            continue
        for series_uid, series_attrs, n in idx.series_of(st.study_uid):
            s_attrs = {
                **attrs,
                **series_attrs,
                "SeriesInstanceUID": series_uid,
                "NumberOfSeriesRelatedInstances": str(n),
            }
            if not _match(query, Level.SERIES, s_attrs, ("NumberOfSeriesRelatedInstances",)):
                continue
            if level is Level.SERIES:
                out.append(_respond(query, s_attrs, level))
                continue
            for inst in idx.study_instances(st.study_uid, series_uid):
                i_attrs = {
                    **s_attrs,
                    **inst.attrs,
                    "SOPInstanceUID": inst.sop_uid,
                    "SOPClassUID": inst.sop_class_uid,
                    "AvailableTransferSyntaxUID": inst.current.transfer_syntax,
                }
                if _match(query, Level.IMAGE, i_attrs, ("AvailableTransferSyntaxUID",)):
                    out.append(_respond(query, i_attrs, level))
    return out


def _canon(rows: list[dict[str, AttrValue]]) -> list[str]:
    return sorted(repr(sorted(r.items())) for r in rows)


def check(arc: Archive, level: Level, query: Query) -> int:
    """The index answers ``query`` exactly as the scan does; returns the number of matches."""
    query = {**query, UNIQUE[level]: query.get(UNIQUE[level], "")}
    got = list(arc.index.find(level, query))
    want = scan(arc, level, query)
    assert _canon(got) == _canon(want), (level, query)
    return len(want)


# --- the corpus -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(
    tmp_path_factory: pytest.TempPathFactory, pydicom_files: list[Path]
) -> Iterator[Archive]:
    out = tmp_path_factory.mktemp("cfind")
    arc = Archive(out / "site.lmdb", map_size=1 << 30, sync=False)
    try:
        for path in pydicom_files:
            arc.import_file(path)
        for path in generate_instances(
            out / "gen", studies=10, series_per_study=2, instances_per_series=2, rows=4, columns=4
        ):
            arc.import_file(path)
        synthetic(arc, 80, seed=7)
        yield arc
    finally:
        arc.close()


def _values(arc: Archive, keyword: str) -> list[str]:
    seen: set[str] = set()
    for st in arc.index.studies():
        value = st.modalities if keyword == "ModalitiesInStudy" else st.attrs.get(keyword, "")
        for v in value if isinstance(value, list) else [value]:
            seen.add(str(v))
    return sorted(seen)


def study_queries(arc: Archive) -> list[Query]:
    names = [n for n in _values(arc, "PatientName") if n]
    pids = [p for p in _values(arc, "PatientID") if p]
    accs = [a for a in _values(arc, "AccessionNumber") if a]
    out: list[Query] = []
    for n in names:
        family = n.split("^")[0].strip()
        out += [{"PatientName": n}, {"PatientName": n.upper()}, {"PatientName": n.lower()}]
        out += [{"PatientName": family[:k] + "*"} for k in (1, 2, 4) if family[:k]]
        out += [{"PatientName": f"*{n[-3:]}"}, {"PatientName": f"?{family[1:3]}*"}]
    out += [
        {"PatientName": p}
        for p in (
            "SMITH*",
            "smith*",
            "\u0130V*",
            "IV*",
            "\u0131*",
            "\u017f*",
            "K*",
            "k*",
            "STRASSE^*",
            "*^J*",
        )
    ]
    out += [{"PatientName": "Doe^Jane"}, {"PatientName": "doe^jane^"}, {"PatientName": "x\\ng"}]
    for p in pids:
        out += [{"PatientID": p}, {"PatientID": p[:1] + "*"}, {"PatientID": "*" + p[-1:]}]
    out += [
        {"PatientID": "NOBODY"},
        {"PatientID": "P000\\p1"},
        {"PatientID": "P"},
        {"PatientID": "Q"},
    ]
    for a in accs[::3]:
        out += [{"AccessionNumber": a}, {"AccessionNumber": a[:3] + "?*"}]
    for lo, hi in (("20200101", "20200131"), ("20200115", ""), ("", "20200101"), ("2020", "2020")):
        out.append({"StudyDate": f"{lo}-{hi}"})
    out += [{"StudyDate": d} for d in ("20200115", "2020", "202001", "20210704", "19000101")]
    for lo, hi in (("1230", "1231"), ("123015", ""), ("", "0700"), ("12", "12"), ("0930", "0930")):
        out.append({"StudyTime": f"{lo}-{hi}"})
    out += [{"StudyTime": t} for t in ("12", "1230", "123015.5")]
    out += [{"ModalitiesInStudy": m} for m in (*MODALITIES, "NM", "M?", "CT\\MR", "*T")]
    out += [
        {"PatientName": "SMITH*", "StudyDate": "20200101-20200131"},
        {"ModalitiesInStudy": "CT", "StudyDate": "20200101-"},
        {"ModalitiesInStudy": "MR", "PatientID": "P001"},
        {"PatientID": "P002", "AccessionNumber": "*"},
        {"PatientName": "m*", "ModalitiesInStudy": "CT\\NM", "StudyTime": "-1300"},
        {"StudyDescription": "CT*"},
        {"StudyDate": "20200101-20200201", "StudyTime": "1200-1300", "PatientName": "*"},
    ]
    return out


def test_study_level_matches_the_scan(corpus: Archive) -> None:
    total = sum(check(corpus, Level.STUDY, q) for q in study_queries(corpus))
    assert total > 100  # the queries do find things


def test_random_combinations_match_the_scan(corpus: Archive) -> None:
    rng = random.Random(3)
    singles = study_queries(corpus)
    for _ in range(150):
        query: Query = {}
        for q in rng.sample(singles, rng.randint(2, 3)):
            query.update(q)
        check(corpus, rng.choice([Level.STUDY, Level.SERIES]), query)


def test_series_and_image_levels(corpus: Archive) -> None:
    image_rows = list(corpus.index.find(Level.IMAGE, {"SeriesInstanceUID": ""}))
    sops = [str(r["SOPInstanceUID"]) for r in image_rows]
    series = sorted({str(r["SeriesInstanceUID"]) for r in image_rows})
    for sop in sops[::11]:
        assert check(corpus, Level.IMAGE, {"SOPInstanceUID": sop}) == 1
    assert check(corpus, Level.IMAGE, {"SOPInstanceUID": [*sops[:5], "1.2.3.404"]}) == 5
    assert check(corpus, Level.IMAGE, {"SOPInstanceUID": sops[0], "Modality": "XX"}) == 0
    for uid in series[::7]:
        assert check(corpus, Level.SERIES, {"SeriesInstanceUID": uid}) == 1
        assert check(corpus, Level.IMAGE, {"SeriesInstanceUID": uid}) >= 1
    check(corpus, Level.SERIES, {"Modality": "NM"})
    check(corpus, Level.SERIES, {"Modality": "MR", "PatientName": "s*"})
    check(corpus, Level.IMAGE, {"Modality": "CT", "StudyDate": "20200101-20200131"})
    check(corpus, Level.IMAGE, {"InstanceNumber": "2", "PatientID": "P003"})
    check(corpus, Level.STUDY, {"SOPInstanceUID": sops[0]})  # below the level: ignored
    check(corpus, Level.SERIES, {"SeriesInstanceUID": "\\".join(series[:3])})


def test_patient_level(corpus: Archive) -> None:
    for query in (
        {},
        {"PatientName": "smith*"},
        {"PatientName": "*^JOHN"},
        {"PatientName": "müller^ines"},
        {"PatientID": "P001"},
        {"PatientID": "P*"},
        {"PatientID": "p1", "PatientName": "*"},
        {"PatientBirthDate": "19500101-"},
    ):
        check(corpus, Level.PATIENT, query)


class Polls:
    """A ``cancelled`` callable that counts its calls and says yes from call ``stop_at`` on."""

    def __init__(self, stop_at: int = 0):
        self.calls = 0
        self.stop_at = stop_at

    def __call__(self) -> bool:
        self.calls += 1
        return 0 < self.stop_at <= self.calls


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """600 single-instance studies."""
    arc = Archive(tmp_path_factory.mktemp("many") / "site.lmdb", map_size=1 << 30, sync=False)
    try:
        futures = [
            arc.submit_file_bytes(part10(StudyInstanceUID=generate_uid(), PatientID=f"P{i}"))
            for i in range(600)
        ]
        for f in futures:
            f.result(60)
        yield arc
    finally:
        arc.close()


def test_unconstrained_query_streams(many: Archive) -> None:
    polls = Polls()
    results = many.index.find(Level.STUDY, {"StudyInstanceUID": "", "PatientID": ""}, polls)
    first = next(results)
    assert first["StudyInstanceUID"]
    assert polls.calls == 0  # answered before the walk had read CANCEL_EVERY records
    assert len(list(results)) == 599
    assert polls.calls >= 2


def test_cancel_stops_the_walk(many: Archive) -> None:
    query: Query = {"SOPInstanceUID": "", "InstanceNumber": "99999"}
    polls = Polls()
    assert list(many.index.find(Level.IMAGE, query, polls)) == []
    walked = polls.calls
    assert walked >= 6  # 600 studies, series and instances read
    cancel = Polls(stop_at=1)
    assert list(many.index.find(Level.IMAGE, query, cancel)) == []
    assert cancel.calls == 1
    # closing a generator mid-walk ends it (and its read snapshot)
    results = many.index.find(Level.STUDY, {})
    next(results)
    results.close()
    assert list(results) == []


def test_indexes_follow_attribute_changes(archive: Archive) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    base = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "PatientID": "X1"}
    archive.submit_file_bytes(part10(SOPInstanceUID=sop, **base, AccessionNumber=None)).result(10)
    assert check(archive, Level.STUDY, {"AccessionNumber": "ACC9"}) == 0
    assert check(archive, Level.STUDY, {"ModalitiesInStudy": "MR"}) == 0
    # a second instance fills in AccessionNumber and PatientName, and brings a new modality
    second = part10(**base, AccessionNumber="ACC9", PatientName="New^Name", Modality="MR")
    archive.submit_file_bytes(second).result(10)
    assert check(archive, Level.STUDY, {"AccessionNumber": "ACC9"}) == 1
    assert check(archive, Level.STUDY, {"ModalitiesInStudy": "MR"}) == 1
    assert check(archive, Level.STUDY, {"PatientName": "new*"}) == 1
    assert check(archive, Level.PATIENT, {"PatientName": "NEW^NAME"}) == 0  # first seen wins
    # a newer version of the first instance with another modality
    archive.submit_file_bytes(part10(SOPInstanceUID=sop, **base, Modality="PT")).result(10)
    assert check(archive, Level.STUDY, {"ModalitiesInStudy": "PT"}) == 1
    # Modality is the series' (first seen), ModalitiesInStudy every modality received
    assert check(archive, Level.IMAGE, {"SOPInstanceUID": sop, "Modality": "CT"}) == 1
    assert check(archive, Level.STUDY, {"AccessionNumber": "ACC9", "ModalitiesInStudy": "CT"}) == 1


def test_index_without_secondary_indexes_is_built_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "site.lmdb"
    with Archive(path, map_size=1 << 28, sync=False) as arc:
        synthetic(arc, 30, seed=11)
        names = list(Secondary(arc.db).handles())
        before = {
            (level, repr(q)): _canon(list(arc.index.find(level, q)))
            for level, q in _rebuild_queries()
        }
    env = lmdb.open(str(path), max_dbs=64, map_size=1 << 28)
    with env.begin(write=True) as txn:  # back to a layout-1 index: records only
        for name in names:
            txn.drop(env.open_db(name.encode(), txn=txn), delete=True)
    env.close()
    with caplog.at_level(logging.INFO, logger="p2pacs.index.db"):
        arc = Archive(path, map_size=1 << 28, sync=False)
    try:
        assert any("building the C-FIND indexes of" in r.message for r in caplog.records)
        assert any("built the C-FIND indexes of" in r.message for r in caplog.records)
        with arc.db.read() as txn:
            assert txn.stat(arc.db.db("ix_by_patient_name", dupsort=True))["entries"] > 0
            assert txn.stat(arc.db.db("ix_series_uid", dupsort=True))["entries"] > 0
        for level, q in _rebuild_queries():
            assert _canon(list(arc.index.find(level, q))) == before[(level, repr(q))]
            check(arc, level, q)
    finally:
        arc.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="p2pacs.index.db"), Archive(path, sync=False):
        assert not caplog.records  # built once


def _rebuild_queries() -> list[tuple[Level, Query]]:
    return [
        (Level.STUDY, {"PatientName": "s*"}),
        (Level.STUDY, {"PatientID": "P001"}),
        (Level.STUDY, {"StudyDate": "20200101-20200131"}),
        (Level.STUDY, {"ModalitiesInStudy": "NM"}),
        (Level.PATIENT, {"PatientName": "*^J*"}),
        (Level.SERIES, {"Modality": "MR"}),
    ]


def test_pydicom_files_round_trip(corpus: Archive, pydicom_files: list[Path]) -> None:
    """Each pydicom test file is found by its own PatientID, name and SOP Instance UID."""
    for path in pydicom_files[::5]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sop = str(ds.SOPInstanceUID)
        assert check(corpus, Level.IMAGE, {"SOPInstanceUID": sop}) >= 1
        for kw in ("PatientID", "PatientName", "AccessionNumber", "StudyDate"):
            value = str(ds.get(kw, "") or "")
            if value:
                assert check(corpus, Level.STUDY, {kw: value}) >= 0
