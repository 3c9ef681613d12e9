"""Bulk data over HTTP: the BulkDataURIs of ``/metadata`` followed by the ImagingDataCommons
``dicomweb-client`` (``retrieve_bulkdata``) and by ``requests``, against the aiohttp app on
127.0.0.1 port 0 over a real LMDB archive of pydicom's test files."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from aiohttp import web
from dicomweb_client.api import DICOMwebClient
from pydicom.encaps import generate_frames

from p2pacs.archive import Archive
from p2pacs.dicomweb import dicomweb_app

from interop_peers import serve_app

TIMEOUT = 20.0
NAMES = ("examples_overlay.dcm", "waveform_ecg.dcm", "CT_small.dcm", "SC_rgb_rle_2frame.dcm")


@dataclass
class Served:
    url: str
    client: DICOMwebClient
    files: dict[str, Path]  # file name -> path
    heads: dict[str, pydicom.Dataset]  # file name -> dataset


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, pydicom_all_files: list[Path]
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("bulkdata")
    archive = Archive(root / "db", map_size=1 << 28, sync=False)
    files = {p.name: p for p in pydicom_all_files if p.name in NAMES}
    for p in files.values():
        archive.import_file(p)
    parent = web.Application()
    parent.add_subapp("/dicomweb", dicomweb_app(archive))
    try:
        with serve_app(parent, "/dicomweb") as url:
            heads = {n: pydicom.dcmread(p) for n, p in files.items()}
            yield Served(url, DICOMwebClient(url=url), files, heads)
    finally:
        archive.close()


def _meta(served: Served, name: str) -> dict[str, object]:
    ds = served.heads[name]
    meta: dict[str, object] = served.client.retrieve_instance_metadata(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    return meta


def test_dicomweb_client_follows_bulk_data_uris(served: Served) -> None:
    ds = served.heads["examples_overlay.dcm"]
    meta = _meta(served, "examples_overlay.dcm")
    overlay = meta["60003000"]["BulkDataURI"]  # type: ignore[index]
    base = f"{served.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    assert overlay == f"{base}/instances/{ds.SOPInstanceUID}/bulkdata/60003000"
    assert served.client.retrieve_bulkdata(overlay) == [ds[0x60003000].value]
    pixels = meta["7FE00010"]["BulkDataURI"]  # type: ignore[index]
    assert served.client.retrieve_bulkdata(pixels) == [ds.PixelData]
    icon = meta["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]  # type: ignore[index]
    assert served.client.retrieve_bulkdata(icon) == [ds.IconImageSequence[0].PixelData]
    ecg = served.heads["waveform_ecg.dcm"]
    meta = _meta(served, "waveform_ecg.dcm")
    uri = meta["54000100"]["Value"][1]["54001010"]["BulkDataURI"]  # type: ignore[index]
    got = served.client.retrieve_bulkdata(
        uri, media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),)
    )
    assert got == [ecg.WaveformSequence[1].WaveformData]


def test_pixel_data_as_stored_decoded_and_single_part(served: Served) -> None:
    ds = served.heads["SC_rgb_rle_2frame.dcm"]
    uri = _meta(served, "SC_rgb_rle_2frame.dcm")["7FE00010"]["BulkDataURI"]  # type: ignore[index]
    stored = served.client.retrieve_bulkdata(uri, media_types=(("application/octet-stream", "*"),))
    assert stored == list(generate_frames(ds.PixelData, number_of_frames=2))
    (native,) = served.client.retrieve_bulkdata(uri)
    assert native == ds.pixel_array.tobytes()
    r = requests.get(uri, headers={"Accept": "application/octet-stream"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == native
    assert r.headers["Content-Type"].startswith("application/octet-stream")
    r = requests.get(  # two stored frames cannot be one body
        uri, headers={"Accept": "application/octet-stream; transfer-syntax=*"}, timeout=TIMEOUT
    )
    assert r.status_code == 406
    ct = served.heads["CT_small.dcm"]
    uri = _meta(served, "CT_small.dcm")["7FE00010"]["BulkDataURI"]  # type: ignore[index]
    (value,) = served.client.retrieve_bulkdata(uri)
    want = ct.pixel_array
    assert np.array_equal(np.frombuffer(value, dtype=want.dtype).reshape(want.shape), want)


def test_bad_and_missing_bulk_data(served: Served) -> None:
    ds = served.heads["CT_small.dcm"]
    inst = (
        f"{served.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    for path, status in [
        ("60003000", 404),
        ("00100010", 404),
        ("0040A730/1/00420011", 404),
        ("7FE0001", 400),
        ("00400275/0/00321060", 400),
    ]:
        r = requests.get(f"{inst}/bulkdata/{path}", timeout=TIMEOUT)
        assert r.status_code == status, (path, r.text)
    r = requests.get(f"{inst}/bulkdata/7FE00010", headers={"Accept": "image/png"}, timeout=TIMEOUT)
    assert r.status_code == 406
    r = requests.get(f"{served.url}/studies/1.2.3/series/4/instances/5/bulkdata/7FE00010")
    assert r.status_code == 404
