"""Session fixtures shared by the archive, index, CLI and interop tests: real DICOM files only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from p2pacs.archive import Archive
from p2pacs.samples import generate_instances, pydicom_test_files

_KEYS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
MULTIFRAME_FRAMES = 20  # 512 x 512 x 2 bytes x 20 frames = 10 MiB: above 8 MiB, chunked


def _is_part10(path: Path) -> bool:
    """A Part-10 file (file meta with a transfer syntax) carrying the four unique keys."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # pydicom raises many types on its deliberately broken test files
        return False
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        return False
    return all(kw in ds and ds[kw].value for kw in _KEYS)


@pytest.fixture(scope="session")
def pydicom_all_files() -> list[Path]:
    """Every file of pydicom's bundled test data: DICOM, broken DICOM and not DICOM at all."""
    files = pydicom_test_files()
    assert len(files) > 100, "pydicom's data/test_files folder looks empty"
    return files


# pydicom test files that pydicom reads (header only) with the four keys, but whose structure is
# broken, so p2pacs refuses them (dcmtk's dcmdump refuses them too: exit status 1)
PYDICOM_BROKEN = {
    "MR_truncated.dcm": "(7FE0,0010) Pixel Data of length 8192 with 8130 bytes left in the file",
    "rtplan_truncated.dcm": "(300A,00B0) Beam Sequence of length 976 with 711 bytes left",
    "SC_rgb_jpeg.dcm": "file meta says JPEG Baseline (explicit VR), the dataset is implicit VR",
}


@pytest.fixture(scope="session")
def pydicom_broken(pydicom_all_files: list[Path]) -> dict[Path, str]:
    """The structurally broken files among pydicom's test files, with why (PYDICOM_BROKEN)."""
    out = {p: PYDICOM_BROKEN[p.name] for p in pydicom_all_files if p.name in PYDICOM_BROKEN}
    assert len(out) == len(PYDICOM_BROKEN), "pydicom's broken test files moved"
    return out


@pytest.fixture(scope="session")
def pydicom_files(pydicom_all_files: list[Path]) -> list[Path]:
    """pydicom's Part-10 test files that carry the keys an archive indexes by and are
    structurally whole (what a modality would send); the gateway and interop tests send these."""
    return [p for p in pydicom_all_files if p.name not in PYDICOM_BROKEN and _is_part10(p)]


@pytest.fixture(scope="session")
def generated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 studies x 2 series x 3 instances of 512x512 16-bit CT/MR, explicit and implicit VR,
    plus one multi-frame instance of 10 MiB in the first series."""
    out = tmp_path_factory.mktemp("generated")
    generate_instances(
        out,
        studies=3,
        series_per_study=2,
        instances_per_series=3,
        rows=512,
        columns=512,
        seed=11,
        implicit_vr_every=3,
        multiframe_frames=MULTIFRAME_FRAMES,
    )
    return out


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    """A fresh archive (real LMDB, fsync on) in a temporary folder."""
    arc = Archive(tmp_path / "site.lmdb", map_size=1 << 30)
    try:
        yield arc
    finally:
        arc.close()
