"""DICOMweb over HTTP: the aiohttp app mounted under /dicomweb, served on 127.0.0.1 port 0,
driven by the ImagingDataCommons ``dicomweb-client`` package (and ``requests`` for statuses
that client hides). Real LMDB archive, real files."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from aiohttp import web
from dicomweb_client.api import DICOMwebClient
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from p2pacs.archive import Archive
from p2pacs.dicom import split_part10
from p2pacs.dicomweb import dicomweb_app
from p2pacs.samples import generate_instances

from interop_peers import serve_app

TIMEOUT = 20.0
PYDICOM_NAMES = (
    "CT_small.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle_2frame.dcm",
)


@dataclass
class Served:
    url: str
    client: DICOMwebClient
    archive: Archive
    files: dict[str, Path]  # SOP Instance UID -> file imported
    headers: dict[str, pydicom.Dataset]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, pydicom_all_files: list[Path]
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("dicomweb")
    paths = generate_instances(
        root / "gen", studies=2, series_per_study=2, instances_per_series=3, rows=64,
        columns=64, seed=5, multiframe_frames=3,
    )  # fmt: skip
    paths += [p for p in pydicom_all_files if p.name in PYDICOM_NAMES]
    archive = Archive(root / "db", map_size=1 << 30, sync=False)
    files, headers = {}, {}
    for p in paths:
        archive.import_file(p)
        h = pydicom.dcmread(p, stop_before_pixels=True)
        files[str(h.SOPInstanceUID)], headers[str(h.SOPInstanceUID)] = p, h
    parent = web.Application()
    parent.add_subapp("/dicomweb", dicomweb_app(archive))
    try:
        with serve_app(parent, "/dicomweb") as url:
            yield Served(url, DICOMwebClient(url=url), archive, files, headers)
    finally:
        archive.close()


def _one(served: Served, name: str) -> tuple[str, pydicom.Dataset]:
    uid = next(u for u, p in served.files.items() if p.name == name)
    return uid, served.headers[uid]


def test_qido_studies_series_instances(served: Served) -> None:
    studies = served.client.search_for_studies()
    want = {str(h.StudyInstanceUID) for h in served.headers.values()}
    got = {s["0020000D"]["Value"][0] for s in studies}
    assert got == want
    _, ct = _one(served, "CT_small.dcm")
    found = served.client.search_for_studies(search_filters={"PatientID": ct.PatientID})
    assert [s["0020000D"]["Value"][0] for s in found] == [ct.StudyInstanceUID]
    assert found[0]["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{ct.StudyInstanceUID}")
    wild = served.client.search_for_studies(search_filters={"PatientName": "compressedsamples*"})
    assert {s["0020000D"]["Value"][0] for s in wild} == {
        str(h.StudyInstanceUID)
        for h in served.headers.values()
        if str(h.get("PatientName", "")).startswith("CompressedSamples")
    }
    series = served.client.search_for_series(study_instance_uid=ct.StudyInstanceUID)
    assert {s["0020000E"]["Value"][0] for s in series} == {
        str(h.SeriesInstanceUID)
        for h in served.headers.values()
        if h.StudyInstanceUID == ct.StudyInstanceUID
    }
    instances = served.client.search_for_instances(
        study_instance_uid=ct.StudyInstanceUID, series_instance_uid=ct.SeriesInstanceUID
    )
    assert ct.SOPInstanceUID in {i["00080018"]["Value"][0] for i in instances}
    every = served.client.search_for_instances()
    assert len(every) == len(served.files)


def test_qido_paging_includefield_and_bad_query(served: Served) -> None:
    all_studies = served.client.search_for_studies()
    page = served.client.search_for_studies(limit=2, offset=1)
    assert [s["0020000D"] for s in page] == [s["0020000D"] for s in all_studies[1:3]]
    r = requests.get(f"{served.url}/studies", params={"limit": "1"}, timeout=TIMEOUT)
    assert "additional results" in r.headers["Warning"]
    r = requests.get(f"{served.url}/studies", params={"offset": "1"}, timeout=TIMEOUT)
    assert len(r.json()) == len(all_studies) - 1 and "Warning" not in r.headers
    full = served.client.search_for_studies(fields=["all"], limit=1)
    assert "00081030" in full[0]  # StudyDescription: a key of includefield=all
    r = requests.get(f"{served.url}/studies", params={"NoSuchKey": "1"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "NoSuchKey" in r.text
    r = requests.get(f"{served.url}/studies", params={"PatientID": "nobody"}, timeout=TIMEOUT)
    assert r.status_code == 204
    xml = {"Accept": "multipart/related; type=application/dicom+xml"}
    r = requests.get(f"{served.url}/studies", headers=xml, timeout=TIMEOUT)
    assert r.status_code == 406


def test_wado_instance_explicit_vr_le_has_the_same_pixels(served: Served) -> None:
    uid, h = _one(served, "MR_small_jp2klossless.dcm")
    ds = served.client.retrieve_instance(
        h.StudyInstanceUID,
        h.SeriesInstanceUID,
        uid,
        media_types=(("application/dicom", "1.2.840.10008.1.2.1"),),
    )
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    want = pydicom.dcmread(served.files[uid]).pixel_array
    assert np.array_equal(ds.pixel_array, want)


def test_wado_as_stored_is_byte_identical(served: Served) -> None:
    uid, h = _one(served, "JPEG2000.dcm")
    ds = served.client.retrieve_instance(
        h.StudyInstanceUID, h.SeriesInstanceUID, uid, media_types=(("application/dicom", "*"),)
    )
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    sent = bytes(split_part10(served.files[uid].read_bytes()).dataset)
    assert bytes(split_part10(buf.getvalue()).dataset) == sent


def test_wado_series_and_study(served: Served) -> None:
    _, h = _one(served, "CT_small.dcm")
    series = served.client.retrieve_series(h.StudyInstanceUID, h.SeriesInstanceUID)
    want = {u for u, x in served.headers.items() if x.SeriesInstanceUID == h.SeriesInstanceUID}
    assert {str(d.SOPInstanceUID) for d in series} == want
    gen = next(x for u, x in served.headers.items() if served.files[u].parent.name == "gen")
    # no Accept header: Explicit VR Little Endian, the default of PS3.18 8.7.3.5
    r = requests.get(f"{served.url}/studies/{gen.StudyInstanceUID}", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert r.content.count(b"transfer-syntax=1.2.840.10008.1.2.1\r\n") == sum(
        x.StudyInstanceUID == gen.StudyInstanceUID for x in served.headers.values()
    )
    study = served.client.retrieve_study(gen.StudyInstanceUID)
    want = {u for u, x in served.headers.items() if x.StudyInstanceUID == gen.StudyInstanceUID}
    assert {str(d.SOPInstanceUID) for d in study} == want
    for d in study:
        original = pydicom.dcmread(served.files[str(d.SOPInstanceUID)])
        assert np.array_equal(d.pixel_array, original.pixel_array)


def test_wado_unsupported_syntax_is_406_and_missing_is_404(served: Served) -> None:
    uid, h = _one(served, "CT_small.dcm")
    url = f"{served.url}/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}/instances/{uid}"
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    r = requests.get(url, headers={"Accept": jpeg}, timeout=TIMEOUT)
    assert r.status_code == 406 and "none of the accepted" in r.text
    r = requests.get(f"{served.url}/studies/1.2.3.4", timeout=TIMEOUT)
    assert r.status_code == 404
    for bad in ("*", "1.2*", "1.2\\1.3", "1.2,1.3", "abc"):  # one UID, never a pattern
        r = requests.get(f"{served.url}/studies/{bad}", timeout=TIMEOUT)
        assert r.status_code == 400 and "not a UID" in r.text, bad
        r = requests.get(f"{served.url}/studies/{bad}/series", timeout=TIMEOUT)
        assert r.status_code == 400, bad


def test_metadata(served: Served) -> None:
    uid, h = _one(served, "CT_small.dcm")
    meta = served.client.retrieve_instance_metadata(h.StudyInstanceUID, h.SeriesInstanceUID, uid)
    assert meta["00080018"]["Value"] == [uid]
    assert meta["00100010"]["Value"][0]["Alphabetic"] == str(h.PatientName)
    series = served.client.retrieve_series_metadata(h.StudyInstanceUID, h.SeriesInstanceUID)
    want = {u for u, x in served.headers.items() if x.SeriesInstanceUID == h.SeriesInstanceUID}
    assert {m["00080018"]["Value"][0] for m in series} == want
    study = served.client.retrieve_study_metadata(h.StudyInstanceUID)
    assert len(study) == sum(
        x.StudyInstanceUID == h.StudyInstanceUID for x in served.headers.values()
    )


def test_frames(served: Served) -> None:
    uid, h = _one(served, "SC_rgb_rle_2frame.dcm")
    frames = served.client.retrieve_instance_frames(
        h.StudyInstanceUID,
        h.SeriesInstanceUID,
        uid,
        frame_numbers=[2],
        media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),),
    )
    original = pydicom.dcmread(served.files[uid])
    assert frames == [original.pixel_array[1].tobytes()]
    url = f"{served.url}/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}"
    url += f"/instances/{uid}/frames/1,2"
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    r = requests.get(url, headers={"Accept": accept}, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.content.count(b"transfer-syntax=1.2.840.10008.1.2.5\r\n") == 2
    for frame in generate_frames(original.PixelData, number_of_frames=2):
        assert frame in r.content
    r = requests.get(url.replace("1,2", "9"), timeout=TIMEOUT)
    assert r.status_code == 404
    r = requests.get(url.replace("1,2", "one"), timeout=TIMEOUT)
    assert r.status_code == 400


def _copy_with_new_uids(path: Path, study: str | None = None) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    return ds


def test_stow_then_search_and_retrieve(served: Served) -> None:
    _, h = _one(served, "CT_small.dcm")
    new = [_copy_with_new_uids(served.files[str(h.SOPInstanceUID)]) for _ in range(2)]
    # one of 2 MiB: above aiohttp's default client_max_size (1 MiB) of the parent app
    big = new[1]
    big.Rows = big.Columns = 1024
    big.PixelData = np.arange(1024 * 1024, dtype="<u2").tobytes()
    response = served.client.store_instances(new)
    refs = {str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence}
    assert refs == {str(d.SOPInstanceUID) for d in new}
    assert "FailedSOPSequence" not in response
    for d in new:
        got = served.client.retrieve_instance(
            d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID
        )
        assert np.array_equal(got.pixel_array, d.pixel_array)
        found = served.client.search_for_studies(
            search_filters={"StudyInstanceUID": d.StudyInstanceUID}
        )
        assert len(found) == 1


def _multipart(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = "p2pacs-test-boundary"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
            for p in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_stow_failures_are_listed(served: Served) -> None:
    _, h = _one(served, "CT_small.dcm")
    good = _copy_with_new_uids(served.files[str(h.SOPInstanceUID)])
    buf = BytesIO()
    good.save_as(buf, enforce_file_format=True)
    whole = buf.getvalue()
    body, ctype = _multipart([whole, whole[:-100]])  # the second one cut short
    r = requests.post(
        f"{served.url}/studies", data=body, headers={"Content-Type": ctype}, timeout=TIMEOUT
    )
    assert r.status_code == 202, r.text
    out: dict[str, Any] = r.json()
    assert [i["00081155"]["Value"][0] for i in out["00081199"]["Value"]] == [good.SOPInstanceUID]
    assert [i["00081197"]["Value"][0] for i in out["00081198"]["Value"]] == [0xC000]
    # another study than the URL's: refused, nothing stored
    other = _copy_with_new_uids(served.files[str(h.SOPInstanceUID)])
    buf = BytesIO()
    other.save_as(buf, enforce_file_format=True)
    body, ctype = _multipart([buf.getvalue()])
    r = requests.post(
        f"{served.url}/studies/{good.StudyInstanceUID}", data=body,
        headers={"Content-Type": ctype}, timeout=TIMEOUT,
    )  # fmt: skip
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert served.archive.index.instance(str(other.SOPInstanceUID)) is None
    r = requests.post(
        f"{served.url}/studies", data=b"x", headers={"Content-Type": "text/plain"}, timeout=TIMEOUT
    )
    assert r.status_code == 415
    for ctype, data in (
        ('multipart/related; type="application/dicom"', b"no boundary given"),
        ('multipart/related; type="application/dicom"; boundary=b', b"--b\r\nbroken"),
        ('multipart/related; type="application/dicom"; boundary=b', b"--b--\r\n"),
    ):
        r = requests.post(
            f"{served.url}/studies", data=data, headers={"Content-Type": ctype}, timeout=TIMEOUT
        )
        assert r.status_code == 400, (ctype, data, r.status_code, r.text)
    # a body cut off after a whole part: that part is stored, the rest is one failure
    third = _copy_with_new_uids(served.files[str(h.SOPInstanceUID)])
    buf = BytesIO()
    third.save_as(buf, enforce_file_format=True)
    body, ctype = _multipart([buf.getvalue()])
    body = body[: -len("--p2pacs-test-boundary--\r\n")] + b"--p2pacs-test-boundary\r\nbroken"
    r = requests.post(
        f"{served.url}/studies", data=body, headers={"Content-Type": ctype}, timeout=TIMEOUT
    )
    assert r.status_code == 202, r.text
    assert served.archive.index.instance(str(third.SOPInstanceUID)) is not None
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
