"""dcmtk receivers that take uncompressed syntaxes only get pydicom's compressed files
(JPEG, JPEG Lossless, JPEG 2000, RLE, JPEG-LS) transcoded, with the pixel values pydicom
decodes from the originals; what cannot be decoded here (12-bit JPEG Extended) is a counted
failed sub-operation, nothing of it sent.

``getscu`` runs without any ``+x`` option (it then proposes uncompressed syntaxes only), and
``movescu`` moves to a ``storescp +x=`` (uncompressed only).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, generate_uid

from p2pacs.dicom.scu import store_files

from interop_peers import P2pacsServe, StoreSCP, free_tcp_port, require_tools, run_dcmtk

pytestmark = pytest.mark.interop

DEST = "PLAIN"  # the uncompressed-only C-MOVE destination
WANTED = {  # compressed syntaxes that must be among the files sent
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"


def _pixels(path: Path) -> Any:
    """pydicom's own decode of a file's pixels; None when it cannot decode them here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path).pixel_array
        except Exception:
            return None


@dataclass
class Site:
    serve: P2pacsServe
    files: dict[str, Path]  # SOP Instance UID -> file sent
    syntax: dict[str, str]  # SOP Instance UID -> its (stored) transfer syntax
    pixels: dict[str, Any]  # SOP Instance UID -> pydicom's decode, None if not decodable
    studies: list[str]


_KEYS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _select(paths: list[Path], broken: set[Path], out_dir: Path) -> dict[str, Path]:
    """pydicom's compressed test files with pixel data, one per SOP Instance UID: a file whose
    UID is taken (MR_small comes in several syntaxes) or that lacks a study or series UID (the
    JPEG-LS near-lossless samples) is copied with new UIDs, pixel data untouched."""
    out: dict[str, Path] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        if path in broken:
            continue
        try:
            ds = pydicom.dcmread(path)
            if not ds.file_meta.TransferSyntaxUID.is_compressed or "PixelData" not in ds:
                continue
        except Exception:  # pydicom's deliberately broken or non-DICOM files
            continue
        if all(ds.get(k) for k in _KEYS) and str(ds.SOPInstanceUID) not in out:
            out[str(ds.SOPInstanceUID)] = path
            continue
        for k in _KEYS:
            if k == "SOPInstanceUID" or not ds.get(k):
                setattr(ds, k, generate_uid(entropy_srcs=[path.name, k]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        copy = out_dir / f"reuid-{path.name}"
        ds.save_as(copy, enforce_file_format=True)
        out[str(ds.SOPInstanceUID)] = copy
    return out


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    pydicom_all_files: list[Path],
    pydicom_broken: dict[Path, str],
) -> Iterator[Site]:
    require_tools("getscu", "movescu", "storescp")
    root = tmp_path_factory.mktemp("transcode")
    files = _select(pydicom_all_files, set(pydicom_broken), root / "reuid")
    syntax = {
        u: str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for u, p in files.items()
    }
    studies = sorted(
        {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files.values()}
    )
    dest = {DEST: f"127.0.0.1:{free_tcp_port()}"}
    with P2pacsServe(root / "site", "P2PACS", destinations=dest) as serve:
        report = store_files("127.0.0.1", serve.port, serve.aet, list(files.values()))
        assert not report.failed, report.failed
        pixels = {u: _pixels(p) for u, p in files.items()}
        yield Site(serve, files, syntax, pixels, studies)


def _check(site: Site, got: dict[str, Path]) -> None:
    present = set(site.syntax.values())
    assert set(WANTED) <= present, {WANTED[t] for t in set(WANTED) - present}
    assert JPEG_EXTENDED in present
    decodable = {u for u, px in site.pixels.items() if px is not None}
    not_decodable = set(site.files) - decodable
    assert not_decodable, "want a file that cannot be converted (12-bit JPEG Extended)"
    # 12-bit JPEG Extended (no decoder without the GPL one), and one corrupt JPEG 2000 file
    assert {site.syntax[u] for u in not_decodable} <= {JPEG_EXTENDED, "1.2.840.10008.1.2.4.91"}
    assert set(got) == decodable, {site.files[u].name for u in decodable ^ set(got)}
    for uid, path in got.items():
        ds = pydicom.dcmread(path)
        assert not UID(ds.file_meta.TransferSyntaxUID).is_compressed, path
        want = site.pixels[uid]
        assert ds.pixel_array.shape == want.shape, site.files[uid].name
        assert np.array_equal(ds.pixel_array, want), site.files[uid].name


def _received(folder: Path) -> dict[str, Path]:
    out = {}
    for p in folder.iterdir():
        if p.is_file():
            out[str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p
    return out


def _failed_count(log: str) -> int:
    """The failed sub-operation count of the final C-GET/C-MOVE response (dcmtk -v -d)."""
    counts = re.findall(r"Failed Sub-?operations\s*:\s*(\d+)", log)
    assert counts, log[-3000:]
    return int(counts[-1])


def test_getscu_uncompressed_only_gets_decoded_pixels(site: Site, tmp_path: Path) -> None:
    proc = run_dcmtk(
        "getscu",
        "-d",
        "-S",
        "-aet",
        "GETSCU",
        "-aec",
        site.serve.aet,
        "-od",
        tmp_path,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID=" + "\\".join(site.studies),
        "127.0.0.1",
        site.serve.port,
        check=False,
    )
    log = proc.stdout + proc.stderr
    _check(site, _received(tmp_path))
    assert _failed_count(log) == sum(px is None for px in site.pixels.values())


def test_movescu_to_uncompressed_only_storescp(site: Site, tmp_path: Path) -> None:
    port = int(site.serve.destinations[DEST].rsplit(":", 1)[1])
    with StoreSCP(tmp_path / "moved", DEST, port, accept="+x="):
        proc = run_dcmtk(
            "movescu",
            "-d",
            "-S",
            "-aet",
            "MOVESCU",
            "-aec",
            site.serve.aet,
            "-aem",
            DEST,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID=" + "\\".join(site.studies),
            "127.0.0.1",
            site.serve.port,
            check=False,
        )
    log = proc.stdout + proc.stderr
    _check(site, _received(tmp_path / "moved"))
    assert _failed_count(log) == sum(px is None for px in site.pixels.values())
    assert site.serve.alive()
