"""Dropping a study's data (``Archive.drop_study_in``) on a real LMDB archive: the study, its
patient, every index entry and blob go in one transaction; every other study stays whole; a
version not checked elsewhere aborts the drop and removes nothing."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from p2pacs.archive import Archive
from p2pacs.dicom.header import Level
from p2pacs.errors import TrimRefusedError
from p2pacs.index.secondary import MODALITY_INDEX, PATIENT_INDEXES, STUDY_INDEXES
from p2pacs.samples import generate_instances


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Archive, list[str], dict[str, bytes]]:
    files = generate_instances(
        tmp_path / "in", studies=3, series_per_study=2, instances_per_series=2,
        rows=16, columns=16, seed=5,
    )  # fmt: skip
    archive = Archive(tmp_path / "db")
    for f in files:
        archive.import_file(f)
    studies = sorted(s.study_uid for s in archive.index.studies())
    exported = {
        uid: b"".join(p.read_bytes() for p in archive.export_study(uid, tmp_path / "out" / uid))
        for uid in studies
    }
    return archive, studies, exported


def _versions(archive: Archive, uid: str) -> set[tuple[str, str]]:
    return {
        (rec.sop_uid, v.hash) for rec in archive.index.study_instances(uid) for v in rec.versions
    }


def test_drop_removes_the_study_everywhere_and_keeps_the_others(
    filled: tuple[Archive, list[str], dict[str, bytes]], tmp_path: Path
) -> None:
    archive, studies, exported = filled
    gone, *kept = studies
    record = archive.index.study(gone)
    assert record is not None
    patient_id = str(record.attrs["PatientID"])
    hashes = {h for _, h in _versions(archive, gone)}
    blobs_before = archive.blobs.totals()[0]
    instances, blobs, size = archive.db.write(
        lambda txn: archive.drop_study_in(txn, gone, _versions(archive, gone))
    )
    assert instances == record.instances and blobs == len(hashes) and size == record.bytes
    assert archive.index.study(gone) is None
    assert archive.index.study_instances(gone) == []
    assert all(not archive.blobs.has(h) for h in hashes)
    assert archive.blobs.totals()[0] == blobs_before - len(hashes)
    assert archive.index.counts()[:2] == (2, 2)
    for level, key in ((Level.STUDY, "StudyInstanceUID"), (Level.PATIENT, "PatientID")):
        found = list(archive.index.find(level, {key: "", "PatientID": patient_id}))
        assert found == []
    assert [
        r["StudyInstanceUID"] for r in archive.index.find(Level.STUDY, {"StudyInstanceUID": ""})
    ] == kept
    # no secondary index entry still points at the study or its patient
    with archive.db.read() as txn:
        for ix in (*STUDY_INDEXES, MODALITY_INDEX):
            for _, to in txn.cursor(db=archive.db.db(ix.name, dupsort=True)):
                assert bytes(to) != gone.encode()
        for _, to in txn.cursor(db=archive.db.db(PATIENT_INDEXES[0].name, dupsort=True)):
            assert bytes(to) != b"P" + patient_id.encode()
        for _, to in txn.cursor(db=archive.db.db("ix_series_uid", dupsort=True)):
            assert bytes(to) != gone.encode()
    for uid in kept:  # every other study still exports byte for byte
        out = archive.export_study(uid, tmp_path / "again" / uid)
        assert b"".join(p.read_bytes() for p in out) == exported[uid]
    archive.close()


def test_a_version_not_checked_elsewhere_keeps_the_study(
    filled: tuple[Archive, list[str], dict[str, bytes]], tmp_path: Path
) -> None:
    archive, studies, exported = filled
    uid = studies[1]
    versions = _versions(archive, uid)
    unchecked = set(sorted(versions)[1:])
    with pytest.raises(TrimRefusedError, match="not checked"):
        archive.db.write(lambda txn: archive.drop_study_in(txn, uid, unchecked))
    assert _versions(archive, uid) == versions
    out = archive.export_study(uid, tmp_path / "kept")
    assert b"".join(p.read_bytes() for p in out) == exported[uid]
    assert archive.index.counts()[:2] == (3, 3)
    archive.close()


def test_a_patient_with_another_study_stays(tmp_path: Path) -> None:
    files = generate_instances(
        tmp_path / "in", studies=2, series_per_study=1, instances_per_series=2,
        rows=16, columns=16, seed=9,
    )  # fmt: skip
    first = pydicom.dcmread(files[0])
    for path in files:  # both studies for one patient
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = first.PatientID, first.PatientName
        ds.save_as(path)
    archive = Archive(tmp_path / "db")
    for f in files:
        archive.import_file(f)
    gone, kept = sorted(s.study_uid for s in archive.index.studies())
    query = {"PatientID": str(first.PatientID)}
    archive.db.write(lambda txn: archive.drop_study_in(txn, gone, _versions(archive, gone)))
    patients = list(archive.index.find(Level.PATIENT, query))
    assert len(patients) == 1
    found = list(archive.index.find(Level.STUDY, {**query, "StudyInstanceUID": ""}))
    assert [r["StudyInstanceUID"] for r in found] == [kept]
    archive.db.write(lambda txn: archive.drop_study_in(txn, kept, _versions(archive, kept)))
    assert list(archive.index.find(Level.PATIENT, query)) == []
    assert archive.index.counts() == (0, 0, 0)
    archive.close()
