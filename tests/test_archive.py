"""Archive round trip on real files: pydicom's test data and generated CT/MR (one > 8 MiB).

What was found and is pinned here:
- Every file of pydicom's test folder that pydicom itself reads (even with ``force=True``, i.e.
  bare datasets without file meta) with the four unique keys is archived, but for the three
  that are structurally broken (cut short, or encoded in another syntax than their file meta
  says: ``PYDICOM_BROKEN`` in conftest.py), which ``MalformedDatasetError`` refuses; every
  other file (DICOMDIRs, JSON, ICC profiles, a gzip, meta without transfer syntax, datasets
  lacking UIDs) raises ``InvalidDicomError`` and nothing else.
- Export gives back every imported file byte for byte.
- Duplicates (one SOP Instance UID, different bytes: pydicom ships MR_small in many transfer
  syntaxes under one UID) are never dropped: every distinct dataset is kept as a version and the
  newest received is what export and retrieval return; a version received again becomes current
  again (with the file meta it came with that time). The same dataset bytes received again
  under different file meta are not a new version: the first file meta is kept.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import pydicom
import pytest

from p2pacs import const
from p2pacs.archive import Archive
from p2pacs.dicom import build_prefix, split_part10
from p2pacs.dicom.part10 import build_prefix_pydicom
from p2pacs.errors import InvalidDicomError, MalformedDatasetError, StoreError
from p2pacs.store import hash_bytes

ARCHIVE_KEYS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")


def _pydicom_archivable(path: Path) -> bool:
    """The oracle: pydicom reads the file (forcing, as for bare datasets) with the four keys."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            return all(kw in ds and ds[kw].value for kw in ARCHIVE_KEYS)
        except Exception:
            return False


def _expected_versions(files: list[Path]) -> dict[str, list[tuple[str, bytes]]]:
    """Per SOP UID, the distinct versions (dataset hash, file bytes) in retrieval order,
    written from the policy in the module docstring."""
    out: dict[str, list[tuple[str, bytes]]] = {}
    for path in files:
        data = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            uid = str(pydicom.dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID)
        h = hash_bytes(split_part10(data).dataset)
        versions = out.setdefault(uid, [])
        if versions and versions[-1][0] == h:
            continue
        out[uid] = [v for v in versions if v[0] != h] + [(h, data)]
    return out


def _import_all(archive: Archive, files: list[Path]) -> tuple[list[Path], list[Path]]:
    accepted, rejected = [], []
    for path in files:  # one at a time: arrival order decides which version is newest
        try:
            archive.import_file(path)
        except InvalidDicomError:
            rejected.append(path)
        else:
            accepted.append(path)
    return accepted, rejected


def _check_round_trip(archive: Archive, accepted: list[Path], out: Path) -> None:
    expected = _expected_versions(accepted)
    exported: dict[str, bytes] = {}
    for study in archive.index.studies():
        for path in archive.export_study(study.study_uid, out / study.study_uid):
            assert path.stem not in exported, f"{path.stem} exported from two studies"
            exported[path.stem] = path.read_bytes()
    assert set(exported) == set(expected)
    for uid, versions in expected.items():
        assert exported[uid] == versions[-1][1], f"{uid}: export differs from newest import"
        record = archive.index.instance(uid)
        assert record is not None
        assert [v.hash for v in record.versions] == [h for h, _ in versions]
        for version, (_, data) in zip(record.versions, versions, strict=True):
            assert archive.instance_bytes(record, version) == data  # older versions kept intact
    assert archive.blobs.verify() == []


def test_pydicom_files_import_and_round_trip(
    archive: Archive,
    pydicom_all_files: list[Path],
    pydicom_broken: dict[Path, str],
    tmp_path: Path,
) -> None:
    accepted, rejected = _import_all(archive, pydicom_all_files)
    archivable = [p for p in pydicom_all_files if _pydicom_archivable(p)]
    assert set(pydicom_broken) <= set(archivable)
    assert accepted == [p for p in archivable if p not in pydicom_broken]
    for path in pydicom_broken:
        with pytest.raises(MalformedDatasetError):
            archive.import_file(path)
    names = {p.name for p in rejected}
    assert {"README.txt", "DICOMDIR", "meta_missing_tsyntax.dcm", "test1.json"} <= names
    assert "ExplVR_BigEndNoMeta.dcm" not in names  # a bare big-endian dataset is archivable
    _check_round_trip(archive, accepted, tmp_path / "out")
    dupes = {u: v for u, v in _expected_versions(accepted).items() if len(v) > 1}
    assert dupes, "pydicom's MR_small variants should arrive as versions of one instance"


def test_generated_round_trip(archive: Archive, generated_dir: Path, tmp_path: Path) -> None:
    files = sorted(generated_dir.glob("*.dcm"))
    syntaxes = {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in files
    }
    assert syntaxes == {pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian}
    assert any(p.stat().st_size > 8 * 1024 * 1024 for p in files)
    accepted, rejected = _import_all(archive, files)
    assert rejected == []
    _check_round_trip(archive, accepted, tmp_path / "out")
    _patients, studies, instances = archive.index.counts()
    assert (studies, instances) == (3, len(files))


def test_large_instance_is_chunked_and_streams(archive: Archive, generated_dir: Path) -> None:
    path = max(generated_dir.glob("*.dcm"), key=lambda p: p.stat().st_size)
    dataset = bytes(split_part10(path.read_bytes()).dataset)
    assert len(dataset) > 8 * 1024 * 1024
    h = archive.import_file(path).hash
    info = archive.blobs.info(h)
    assert info.size == len(dataset) and info.chunk_size == const.CHUNK_SIZE
    assert info.chunks == -(-len(dataset) // const.CHUNK_SIZE) > 8

    stream = archive.blobs.read_range(h)
    first = next(stream)  # a generator: the first chunk comes before the rest is read
    pieces = [first, *stream]
    assert len(pieces) == info.chunks
    assert all(len(p) == info.chunk_size for p in pieces[:-1])
    assert b"".join(pieces) == dataset

    cs = info.chunk_size
    for start, end in [(cs - 10, cs + 10), (3 * cs + 5, 6 * cs), (len(dataset) - 7, None), (0, 1)]:
        got = b"".join(archive.blobs.read_range(h, start, end))
        assert got == dataset[start:end], (start, end)
    assert b"".join(archive.blobs.read_range(h, 5, 5)) == b""
    with pytest.raises(StoreError):
        list(archive.blobs.read_range(h, 10, 5))
    assert archive.blobs.verify_blob(h)
    record = archive.index.instance(archive.import_file(path).sop_uid)
    assert record is not None and archive.instance_bytes(record) == path.read_bytes()


def _variant(path: Path, out: Path, comment: str) -> Path:
    """The same instance (same SOP Instance UID) with different bytes, as a modality resending
    a corrected image would produce."""
    ds = pydicom.dcmread(path)
    ds.ImageComments = comment
    ds.save_as(out, enforce_file_format=True)
    return out


def test_duplicate_sop_uid_newest_wins(
    archive: Archive, generated_dir: Path, tmp_path: Path
) -> None:
    original = sorted(generated_dir.glob("*.dcm"))[2]
    fixed = _variant(original, tmp_path / "fixed.dcm", "corrected")
    a, b = archive.import_file(original), archive.import_file(fixed)
    assert a.sop_uid == b.sop_uid and a.hash != b.hash
    assert b.new_version and not b.new_instance
    record = archive.index.instance(a.sop_uid)
    assert record is not None and [v.hash for v in record.versions] == [a.hash, b.hash]
    study = archive.export_study(a.study_uid, tmp_path / "out1")
    assert [p.read_bytes() for p in study] == [fixed.read_bytes()]
    assert archive.index.counts()[2] == 1

    again = archive.import_file(original)  # received again: current again, nothing dropped
    assert again.new_version and not again.new_instance
    record = archive.index.instance(a.sop_uid)
    assert record is not None and [v.hash for v in record.versions] == [b.hash, a.hash]
    study = archive.export_study(a.study_uid, tmp_path / "out2")
    assert [p.read_bytes() for p in study] == [original.read_bytes()]
    assert archive.blobs.has(a.hash) and archive.blobs.has(b.hash)


def test_reimport_same_bytes_is_not_a_new_version(archive: Archive, generated_dir: Path) -> None:
    path = sorted(generated_dir.glob("*.dcm"))[0]
    first = archive.import_file(path)
    again = archive.import_file(path)
    assert first.new_instance and first.new_version
    assert not again.new_instance and not again.new_version
    record = archive.index.instance(first.sop_uid)
    assert record is not None and len(record.versions) == 1


def test_bad_files_are_refused(archive: Archive, generated_dir: Path, tmp_path: Path) -> None:
    real = sorted(generated_dir.glob("*.dcm"))[0].read_bytes()
    text = tmp_path / "notes.txt"
    text.write_text("not a DICOM file\n" * 10)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x00")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(real[:200])
    meta_only = tmp_path / "meta-only.dcm"
    meta_only.write_bytes(split_part10(real).prefix)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    part = split_part10(real)
    (group_length,) = struct.unpack_from("<I", part.prefix, 140)  # (0002,0000) UL, at 132
    long_meta = tmp_path / "long-meta.dcm"  # file meta says it is 2 bytes longer than it is
    long_meta.write_bytes(
        part.prefix[:140] + struct.pack("<I", group_length + 2) + part.prefix[144:] + part.dataset
    )
    ds = pydicom.dcmread(io.BytesIO(real), stop_before_pixels=True)
    bad_syntax = tmp_path / "bad-syntax.dcm"
    bad_syntax.write_bytes(
        build_prefix(str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.3.4.5") + part.dataset
    )
    cut_pixels = tmp_path / "cut-pixels.dcm"
    cut_pixels.write_bytes(real[: len(real) // 2])
    for path in (long_meta, cut_pixels):
        with pytest.raises(MalformedDatasetError):
            archive.import_file(path)
    for path in (text, broken, truncated, meta_only, empty, bad_syntax, tmp_path / "missing.dcm"):
        with pytest.raises(InvalidDicomError):
            archive.import_file(path)
    assert archive.index.counts() == (0, 0, 0)
    assert archive.blobs.totals() == (0, 0)


def test_received_instance_gets_standard_file_meta(archive: Archive, generated_dir: Path) -> None:
    """A dataset received over the network (no file meta) is exported with file meta built by
    p2pacs: the same bytes pydicom's own writer produces, readable back to the same dataset."""
    for path in sorted(generated_dir.glob("*.dcm"))[:3]:
        part = split_part10(path.read_bytes())
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        got = archive.ingest(part.dataset, part.transfer_syntax, source_ae="STORESCU ")
        record = archive.index.instance(got.sop_uid)
        assert record is not None
        data = archive.instance_bytes(record)
        want = build_prefix_pydicom(
            str(ds.SOPClassUID), str(ds.SOPInstanceUID), part.transfer_syntax, "STORESCU"
        )
        assert data == want + bytes(part.dataset)
        back = pydicom.dcmread(io.BytesIO(data))
        assert back.file_meta.SourceApplicationEntityTitle == "STORESCU"
        assert back.file_meta.TransferSyntaxUID == part.transfer_syntax
        assert back.SOPInstanceUID == ds.SOPInstanceUID
