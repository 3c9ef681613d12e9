"""C-FIND over real associations: Patient Root and Study Root, every level, every matching kind.

The instances are generated with known attributes and C-STOREd through the gateway; what each
query must return is worked out here from the files' own headers, independently of
``p2pacs.index.matching``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import evt

from p2pacs.archive import Archive
from p2pacs.dicom import LEVEL_KEYS
from p2pacs.dicom.scu import store_files
from p2pacs.dicom.uids import PATIENT_ROOT_FIND, STUDY_ROOT_FIND
from p2pacs.gateway import Gateway
from p2pacs.gateway import find as find_module
from p2pacs.samples import generate_instances

from gw_helpers import AET, associate, find, header, identifier, make_gateway, running_gateway

UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
ALWAYS = {"QueryRetrieveLevel", "SpecificCharacterSet"}  # present besides the requested keys
CANCEL_STUDY_SIZE = 400  # instances in the study the C-CANCEL test queries
CANCEL_WAIT = 20.0  # seconds the C-CANCEL test's walk waits for the gateway to see the cancel


@dataclass
class Corpus:
    gateway: Gateway
    headers: list[Dataset]  # one per instance
    big_study: str  # the study of CANCEL_STUDY_SIZE instances

    def values(self, keyword: str) -> list[str]:
        return sorted({str(h.get(keyword, "")) for h in self.headers})

    def expect(self, level: str, pred: Callable[[Dataset], bool]) -> set[str]:
        """Unique keys at ``level`` of the instances ``pred`` accepts."""
        return {str(h[UNIQUE[level]].value) for h in self.headers if pred(h)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    out = tmp_path_factory.mktemp("gw-find")
    files = generate_instances(
        out / "small",
        studies=8,
        series_per_study=2,
        instances_per_series=2,
        rows=8,
        columns=8,
        seed=3,
    )
    big = generate_instances(
        out / "big",
        studies=1,
        series_per_study=1,
        instances_per_series=CANCEL_STUDY_SIZE,
        rows=4,
        columns=4,
        seed=4,
    )
    arc = Archive(out / "db", map_size=1 << 30, sync=False)
    gw = make_gateway(arc)
    try:
        host, port = gw.address
        report = store_files(host, port, AET, [*files, *big])
        assert not report.failed, report.failed
        headers = [header(p) for p in [*files, *big]]
        yield Corpus(gw, headers, str(headers[-1].StudyInstanceUID))
    finally:
        gw.stop()
        arc.close()


def _check(
    corpus: Corpus, model: str, level: str, keys: dict[str, Any], want: set[str]
) -> list[Dataset]:
    results, final = find(corpus.gateway, model, QueryRetrieveLevel=level, **keys)
    assert final == 0x0000
    got = [str(ds[UNIQUE[level]].value) for ds in results]
    assert sorted(got) == sorted(want), keys
    for ds in results:  # only the requested keys come back, every one of them
        returned = {e.keyword for e in ds}
        assert set(keys) | {"QueryRetrieveLevel"} <= returned <= set(keys) | ALWAYS, returned
        assert str(ds.QueryRetrieveLevel) == level
    return results


def _pn(h: Dataset) -> str:
    return str(h.PatientName)


def test_study_root_study_level(corpus: Corpus) -> None:
    small = [h for h in corpus.headers if str(h.StudyInstanceUID) != corpus.big_study]
    dates = sorted({str(h.StudyDate) for h in small})
    lo, hi = dates[2], dates[-3]
    every = corpus.expect("STUDY", lambda h: True)
    assert len(every) == 9
    # universal matching; returned values are the stored ones, names in UTF-8
    results = _check(
        corpus,
        STUDY_ROOT_FIND,
        "STUDY",
        {"StudyInstanceUID": "", "PatientName": "", "StudyDate": ""},
        every,
    )
    by_uid = {str(h.StudyInstanceUID): h for h in corpus.headers}
    for ds in results:
        h = by_uid[str(ds.StudyInstanceUID)]
        assert (str(ds.PatientName), str(ds.StudyDate)) == (_pn(h), str(h.StudyDate))
        if not _pn(h).isascii():
            assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert any(not _pn(h).isascii() for h in corpus.headers), "want a non-ASCII name"
    # date ranges: closed, open below, open above
    for query, pred in (
        (f"{lo}-{hi}", lambda d: lo <= d <= hi),
        (f"-{lo}", lambda d: d <= lo),
        (f"{hi}-", lambda d: d >= hi),
        (lo, lambda d: d == lo),
    ):
        want = corpus.expect("STUDY", lambda h, p=pred: p(str(h.StudyDate)))  # type: ignore[misc]
        assert 0 < len(want) < len(every), query
        _check(corpus, STUDY_ROOT_FIND, "STUDY", {"StudyInstanceUID": "", "StudyDate": query}, want)
    # wildcards, with a non-ASCII name among the candidates
    for pattern, pred in (
        ("M*", lambda n: n.startswith("M")),
        ("*^?n*", lambda n: len(n.split("^")[1]) > 1 and n.split("^")[1][1] == "n"),
    ):
        want = corpus.expect("STUDY", lambda h, p=pred: p(_pn(h)))  # type: ignore[misc]
        assert want, pattern
        _check(
            corpus, STUDY_ROOT_FIND, "STUDY", {"StudyInstanceUID": "", "PatientName": pattern}, want
        )
    # UID list matching, with a UID the archive does not hold
    two = sorted(every)[:2]
    _check(corpus, STUDY_ROOT_FIND, "STUDY", {"StudyInstanceUID": [*two, "1.2.3.404"]}, set(two))
    # single value on a study attribute
    acc = str(by_uid[two[0]].AccessionNumber)
    _check(
        corpus,
        STUDY_ROOT_FIND,
        "STUDY",
        {"StudyInstanceUID": "", "AccessionNumber": acc},
        {two[0]},
    )
    # no match: success with no pending responses
    _check(
        corpus, STUDY_ROOT_FIND, "STUDY", {"StudyInstanceUID": "", "AccessionNumber": "NONE"}, set()
    )


def test_study_root_series_and_image_levels(corpus: Corpus) -> None:
    h0 = next(h for h in corpus.headers if h.Modality == "CT")
    study = str(h0.StudyInstanceUID)
    in_study = lambda h: str(h.StudyInstanceUID) == study  # noqa: E731
    series = corpus.expect("SERIES", in_study)
    assert len(series) == 2
    _check(
        corpus,
        STUDY_ROOT_FIND,
        "SERIES",
        {"StudyInstanceUID": study, "SeriesInstanceUID": "", "Modality": ""},
        series,
    )
    _check(
        corpus,
        STUDY_ROOT_FIND,
        "SERIES",
        {"StudyInstanceUID": study, "SeriesInstanceUID": "", "Modality": "CT"},
        series,
    )
    _check(
        corpus,
        STUDY_ROOT_FIND,
        "SERIES",
        {"StudyInstanceUID": study, "SeriesInstanceUID": "", "Modality": "MR"},
        set(),
    )
    se = str(h0.SeriesInstanceUID)
    in_series = lambda h: str(h.SeriesInstanceUID) == se  # noqa: E731
    images = corpus.expect("IMAGE", in_series)
    _check(
        corpus,
        STUDY_ROOT_FIND,
        "IMAGE",
        {
            "StudyInstanceUID": study,
            "SeriesInstanceUID": se,
            "SOPInstanceUID": "",
            "InstanceNumber": "",
        },
        images,
    )
    _check(
        corpus,
        STUDY_ROOT_FIND,
        "IMAGE",
        {
            "StudyInstanceUID": study,
            "SeriesInstanceUID": se,
            "SOPInstanceUID": "",
            "InstanceNumber": "2",
        },
        corpus.expect("IMAGE", lambda h: in_series(h) and int(h.InstanceNumber) == 2),
    )
    # binary-VR keys (US) come back as numbers, text ones as stored
    keys = {
        "StudyInstanceUID": study,
        "SeriesInstanceUID": se,
        "SOPInstanceUID": "",
        "Rows": "",
        "Columns": "",
        "BitsAllocated": "",
        "ImageType": "",
    }
    by_sop = {str(h.SOPInstanceUID): h for h in corpus.headers}
    for ds in _check(corpus, STUDY_ROOT_FIND, "IMAGE", keys, images):
        h = by_sop[str(ds.SOPInstanceUID)]
        assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (h.Rows, h.Columns, h.BitsAllocated)
        assert list(ds.ImageType) == list(h.ImageType)
    one = sorted(images)[0]
    _check(
        corpus,
        STUDY_ROOT_FIND,
        "IMAGE",
        {"StudyInstanceUID": study, "SeriesInstanceUID": se, "SOPInstanceUID": [one, "1.2.3.404"]},
        {one},
    )


def test_patient_root_all_levels(corpus: Corpus) -> None:
    patients = corpus.expect("PATIENT", lambda h: True)
    assert len(patients) == 9
    results = _check(
        corpus, PATIENT_ROOT_FIND, "PATIENT", {"PatientID": "", "PatientName": ""}, patients
    )
    names = {str(h.PatientID): _pn(h) for h in corpus.headers}
    assert {str(d.PatientID): str(d.PatientName) for d in results} == names
    births = sorted({str(h.PatientBirthDate) for h in corpus.headers})
    lo, hi = births[2], births[-3]
    _check(
        corpus,
        PATIENT_ROOT_FIND,
        "PATIENT",
        {"PatientID": "", "PatientBirthDate": f"{lo}-{hi}"},
        corpus.expect("PATIENT", lambda h: lo <= str(h.PatientBirthDate) <= hi),
    )
    pid = sorted(patients)[0]
    of_patient = lambda h: str(h.PatientID) == pid  # noqa: E731
    _check(corpus, PATIENT_ROOT_FIND, "PATIENT", {"PatientID": pid}, {pid})
    studies = corpus.expect("STUDY", of_patient)
    _check(corpus, PATIENT_ROOT_FIND, "STUDY", {"PatientID": pid, "StudyInstanceUID": ""}, studies)
    study = sorted(studies)[0]
    series = corpus.expect("SERIES", lambda h: str(h.StudyInstanceUID) == study)
    _check(
        corpus,
        PATIENT_ROOT_FIND,
        "SERIES",
        {"PatientID": pid, "StudyInstanceUID": study, "SeriesInstanceUID": ""},
        series,
    )
    se = sorted(series)[0]
    _check(
        corpus,
        PATIENT_ROOT_FIND,
        "IMAGE",
        {
            "PatientID": pid,
            "StudyInstanceUID": study,
            "SeriesInstanceUID": se,
            "SOPInstanceUID": "",
            "SOPClassUID": "",
        },
        corpus.expect("IMAGE", lambda h: str(h.SeriesInstanceUID) == se),
    )
    # an unknown patient matches nothing
    _check(
        corpus, PATIENT_ROOT_FIND, "STUDY", {"PatientID": "NOBODY", "StudyInstanceUID": ""}, set()
    )


# every IMAGE-level key the index keeps: each response costs the SCP more to build, so the
# C-CANCEL reaches it while it is still answering
IMAGE_KEYS = {kw: "" for level in LEVEL_KEYS.values() for kw in level}
# text keys only: answered by ``find._DirectResponses`` (IMAGE_KEYS has binary ones: pynetdicom)
TEXT_KEYS = {"SOPInstanceUID": "", "SOPClassUID": "", "InstanceNumber": "", "PatientID": ""}


@pytest.mark.parametrize("keys", [IMAGE_KEYS, TEXT_KEYS], ids=["pynetdicom", "direct"])
def test_c_cancel_stops_a_find(
    corpus: Corpus, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """C-CANCEL is honoured: sent as soon as the first pending response arrives (from the SCU's
    DUL thread, pynetdicom drops a cancel that arrives before the SCP starts the service), the
    SCP stops early with 0xFE00; the association stays usable and the same query without a
    cancel returns every match. Both ways responses are sent: pynetdicom's and direct. The first
    query's index walk holds its second record until the gateway has seen the C-CANCEL: direct
    responses are fast enough to send all 400 before a loaded machine delivers it."""
    index = corpus.gateway.archive.index
    real_find = index.find
    walks: list[int] = []

    def find_held(level: Any, query: Any, cancelled: Any = None) -> Iterator[Any]:
        records = real_find(level, query, cancelled)
        walks.append(1)
        try:
            for i, record in enumerate(records):
                if i == 1 and len(walks) == 1 and cancelled is not None:
                    deadline = time.monotonic() + CANCEL_WAIT
                    while not cancelled() and time.monotonic() < deadline:
                        time.sleep(0.005)
                yield record
        finally:
            records.close()

    monkeypatch.setattr(index, "find", find_held)
    query = identifier(
        **{**keys, "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": corpus.big_study}
    )
    cancelled = threading.Event()

    def on_recv(event: evt.Event) -> None:
        msg = event.message
        command = getattr(msg, "command_set", None)
        if not cancelled.is_set() and command is not None and command.get("Status") == 0xFF00:
            cancelled.set()
            event.assoc.send_c_cancel(7, msg.context_id)

    assoc = associate(corpus.gateway, STUDY_ROOT_FIND, handlers=[(evt.EVT_DIMSE_RECV, on_recv)])
    assert assoc.is_established
    try:
        statuses = [int(st.Status) for st, _ in assoc.send_c_find(query, STUDY_ROOT_FIND, msg_id=7)]
        full = [int(st.Status) for st, _ in assoc.send_c_find(query, STUDY_ROOT_FIND, msg_id=8)]
    finally:
        assoc.release()
    assert cancelled.is_set()
    assert statuses[-1] == 0xFE00
    assert statuses.count(0xFF00) == 1  # the walk stopped at the record after the cancel
    assert full.count(0xFF00) == CANCEL_STUDY_SIZE and full[-1] == 0x0000


def test_find_results_follow_new_instances(gw_archive: Archive, tmp_path: Path) -> None:
    """A study stored while the gateway runs shows up in the next C-FIND (no stale cache)."""
    extra = generate_instances(
        tmp_path,
        studies=1,
        series_per_study=1,
        instances_per_series=2,
        rows=4,
        columns=4,
        seed=99,
    )
    uid = str(header(extra[0]).StudyInstanceUID)
    with running_gateway(gw_archive) as gw:
        host, port = gw.address
        for n, path in enumerate(extra, 1):
            assert not store_files(host, port, AET, [path]).failed
            results, final = find(
                gw,
                STUDY_ROOT_FIND,
                QueryRetrieveLevel="STUDY",
                StudyInstanceUID=uid,
                NumberOfStudyRelatedInstances="",
            )
            assert final == 0 and [str(d.StudyInstanceUID) for d in results] == [uid]
            assert int(results[0].NumberOfStudyRelatedInstances) == n


def test_many_matches_are_written_directly(corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pending responses of a many-match query go out through the handler's own writes
    (``find._DirectResponses``: the first at once, then in batches), every match once, each
    identifier as pydicom would have encoded it (decoded here by pynetdicom's SCU)."""
    writes: list[int] = []
    real = find_module.sendall

    def counted(sock: Any, buffers: list[Any]) -> None:
        writes.append(len(buffers))
        real(sock, buffers)

    monkeypatch.setattr(find_module, "sendall", counted)
    want = corpus.expect("IMAGE", lambda h: str(h.StudyInstanceUID) == corpus.big_study)
    results = _check(
        corpus,
        STUDY_ROOT_FIND,
        "IMAGE",
        {**TEXT_KEYS, "StudyInstanceUID": corpus.big_study},
        want,
    )
    assert len(results) == CANCEL_STUDY_SIZE
    batches = 1 + -(-(CANCEL_STUDY_SIZE - 1) // find_module.BATCH_RESPONSES)
    assert len(writes) >= batches  # (a batch is also cut at BATCH_BYTES)
    assert sum(writes) >= 4 * CANCEL_STUDY_SIZE  # two PDUs of two buffers per response
