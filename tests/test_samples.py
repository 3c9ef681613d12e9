"""The sample data the tests, demo and benchmarks stand on: real files, deterministic."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from p2pacs.samples import generate_bench_instances, generate_instances, pydicom_test_files


def test_pydicom_test_files_are_listed_offline() -> None:
    files = pydicom_test_files()
    assert len(files) > 100
    assert all(p.is_file() and "__pycache__" not in p.parts for p in files)
    names = {p.name for p in files}
    assert {"CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "README.txt"} <= names
    assert files == sorted(files)


def test_generate_instances_hierarchy_and_encodings(tmp_path: Path) -> None:
    paths = generate_instances(
        tmp_path / "a", studies=2, series_per_study=2, instances_per_series=3, rows=64,
        columns=32, seed=7, implicit_vr_every=2, multiframe_frames=4,
    )  # fmt: skip
    assert len(paths) == 2 * 2 * 3 + 1
    datasets = [pydicom.dcmread(p) for p in paths]
    assert len({str(ds.SOPInstanceUID) for ds in datasets}) == len(paths)
    studies = {str(ds.StudyInstanceUID) for ds in datasets}
    series = {(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)) for ds in datasets}
    assert len(studies) == 2 and len(series) == 4
    # a patient, date and modality per study, shared by all its instances
    for uid in studies:
        mine = [ds for ds in datasets if str(ds.StudyInstanceUID) == uid]
        for kw in ("PatientID", "PatientName", "StudyDate", "AccessionNumber", "Modality"):
            assert len({str(ds[kw].value) for ds in mine}) == 1, kw
    syntaxes = [str(ds.file_meta.TransferSyntaxUID) for ds in datasets]
    assert syntaxes[::2] == [ImplicitVRLittleEndian] * len(syntaxes[::2])
    assert syntaxes[1::2] == [ExplicitVRLittleEndian] * len(syntaxes[1::2])
    multi = [ds for ds in datasets if "NumberOfFrames" in ds]
    assert len(multi) == 1 and int(multi[0].NumberOfFrames) == 4
    for ds in datasets:
        assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (64, 32, 16)
        frames = int(ds.get("NumberOfFrames", 1))
        assert len(ds.PixelData) == 64 * 32 * 2 * frames
        assert ds.pixel_array.shape[-2:] == (64, 32)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_generate_instances_is_deterministic(tmp_path: Path) -> None:
    def make(name: str, seed: int) -> list[bytes]:
        paths = generate_instances(
            tmp_path / name, studies=1, series_per_study=1, instances_per_series=2, rows=8,
            columns=8, seed=seed,
        )  # fmt: skip
        return [p.read_bytes() for p in paths]

    assert make("a", 3) == make("b", 3)
    assert make("c", 4) != make("a", 3)


def test_generate_bench_instances(tmp_path: Path) -> None:
    paths = generate_bench_instances(tmp_path, 5, seed=1)
    assert len(paths) == 5 and sorted(tmp_path.iterdir()) == paths
    for p in paths:
        assert 500_000 < p.stat().st_size < 600_000
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
