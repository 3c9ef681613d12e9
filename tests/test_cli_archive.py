"""The archive commands run in-process through ``p2pacs.cli.main``, on real files and LMDB."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pydicom
import pytest

from p2pacs.cli import main
from p2pacs.cli.common import console, err_console
from p2pacs.site import Site


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Rich folds long UIDs at 80 columns; a wide console keeps them whole in the output."""
    for c in (console, err_console):
        monkeypatch.setattr(c, "width", 400)
    yield


@pytest.fixture
def source(tmp_path: Path, generated_dir: Path) -> Path:
    """The generated instances plus a truncated DICOM file and a text file, in subfolders."""
    src = tmp_path / "src"
    shutil.copytree(generated_dir, src / "images")
    first = sorted((src / "images").glob("*.dcm"))[0]
    (src / "junk").mkdir()
    (src / "junk" / "broken.dcm").write_bytes(first.read_bytes()[:200])
    (src / "junk" / "README.txt").write_text("these are not images\n")
    return src


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_ls_show_export_verify(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = str(tmp_path / "site")
    assert _run(capsys, "--site", site, "init")[0] == 0
    assert (tmp_path / "site" / "site.toml").is_file()

    good = sorted((source / "images").glob("*.dcm"))
    code, out, err = _run(capsys, "--site", site, "-q", "import", str(source))
    assert code == 0
    assert f"imported {len(good)} file(s): {len(good)} new instance(s)" in out
    assert "3 study(ies); 2 skipped" in out
    assert "broken.dcm" in err and "README.txt" in err

    code, out, _ = _run(capsys, "--site", site, "import", str(good[0]))  # again: nothing new
    assert code == 0 and "1 already stored" in out

    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in good]
    studies = sorted({str(ds.StudyInstanceUID) for ds in datasets})
    code, out, _ = _run(capsys, "--site", site, "ls")
    assert code == 0 and "3 studies" in out
    for ds in datasets:
        assert str(ds.StudyInstanceUID) in out and str(ds.PatientID) in out

    study = studies[0]
    mine = [ds for ds in datasets if str(ds.StudyInstanceUID) == study]
    code, out, _ = _run(capsys, "--site", site, "show", study)
    assert code == 0
    assert all(str(ds.SOPInstanceUID) in out for ds in mine)
    assert str(mine[0].AccessionNumber) in out and str(mine[0].PatientName) in out

    code, _, err = _run(capsys, "--site", site, "show", "1.2.3.4")
    assert code == 1 and "not held" in err

    out_dir = tmp_path / "export"
    code, out, _ = _run(capsys, "--site", site, "export", study, str(out_dir))
    assert code == 0 and f"exported {len(mine)} file(s)" in out
    originals = {str(ds.SOPInstanceUID): p for ds, p in zip(datasets, good, strict=True)}
    for path in out_dir.iterdir():
        assert path.read_bytes() == originals[path.stem].read_bytes()

    code, out, _ = _run(capsys, "--site", site, "-q", "verify")
    assert code == 0 and f"all {len(good)} blob(s)" in out


def test_import_refuses_a_file_cut_short(
    tmp_path: Path, generated_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file cut inside its Pixel Data (the header whole: pydicom reads it) is not imported."""
    site_dir = tmp_path / "site"
    assert main(["--site", str(site_dir), "init"]) == 0
    real = sorted(generated_dir.glob("*.dcm"))[0].read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(real[: len(real) // 2])
    assert pydicom.dcmread(cut, stop_before_pixels=True).SOPInstanceUID
    code, out, err = _run(capsys, "--site", str(site_dir), "-q", "import", str(cut))
    assert code == 1
    assert "imported 0 file(s)" in out and "1 skipped" in out
    assert "cut.dcm" in err and "(7FE0,0010)" in err and "runs past the end" in err
    with Site.open(site_dir).archive() as arc:
        assert arc.index.counts() == (0, 0, 0)
        assert arc.blobs.totals() == (0, 0)


def test_verify_reports_a_corrupt_blob(
    tmp_path: Path, generated_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_dir = tmp_path / "site"
    assert main(["--site", str(site_dir), "init"]) == 0
    files = sorted(generated_dir.glob("*.dcm"))[:3]
    assert main(["--site", str(site_dir), "-q", "import", *map(str, files)]) == 0
    capsys.readouterr()
    site = Site.open(site_dir)
    with site.archive() as arc:
        study = next(iter(arc.index.studies())).study_uid
        bad = arc.index.study_instances(study)[1].current.hash
    _flip_byte(site.db_path, bad)  # the archive is closed: nothing of p2pacs is involved
    code, out, err = _run(capsys, "--site", str(site_dir), "-q", "verify")
    assert code == 1
    assert bad in err and "1 of 3 blob(s) fail" in out


def _flip_byte(db_path: Path, h: str) -> None:
    """Flip one byte of a blob's first chunk straight in LMDB's "chunks" sub-database, as bit
    rot would (key: raw digest + 4-byte big-endian chunk number)."""
    key = bytes.fromhex(h) + (0).to_bytes(4, "big")
    env = lmdb.open(str(db_path), max_dbs=64, map_size=1 << 30)
    try:
        chunks = env.open_db(b"chunks", create=False)
        with env.begin(write=True) as txn:
            raw = bytearray(txn.get(key, db=chunks))
            raw[len(raw) // 2] ^= 0xFF
            txn.put(key, bytes(raw), db=chunks)
    finally:
        env.close()
