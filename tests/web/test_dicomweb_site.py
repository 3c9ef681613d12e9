"""DICOMweb served by real site processes (``p2pacs serve``) at /dicomweb on the site's HTTPS
port: dicomweb-client with a bearer token, CORS for browsers, STOW-RS into the C-STORE path,
and a federation-wide search and read-through retrieve across two sites (replication 1)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from p2pacs.control.client import RUNFILE
from p2pacs.dicom import split_part10
from p2pacs.dicom.scu import store_files
from p2pacs.samples import generate_instances
from p2pacs.testbed import SiteProcess, Testbed, wait_for

from web_helpers import TOKEN, enable_web

pytestmark = pytest.mark.slow

TIMEOUT = 30.0
VIEWER = "http://127.0.0.1:3999"  # an origin allowed to call site A from a browser
AS_STORED = (("application/dicom", "*"),)


@dataclass
class Bed:
    bed: Testbed
    url: dict[str, str]  # site name -> its DICOMweb root
    cert: dict[str, Path]
    files: list[Path]


def _web_url(site: SiteProcess) -> str:
    host, port = json.loads((site.path / RUNFILE).read_text())["web"]
    return f"https://{host}:{port}/dicomweb"


def _client(bed: Bed, name: str, token: str = TOKEN) -> DICOMwebClient:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would override the certificate given
    session.verify = str(bed.cert[name])
    session.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(url=bed.url[name], session=session)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    root = tmp_path_factory.mktemp("dicomweb-site")
    files = generate_instances(
        root / "gen", studies=2, series_per_study=1, instances_per_series=3, rows=64,
        columns=64, seed=11,
    )  # fmt: skip
    with Testbed(root / "fed", ["site-a", "site-b"], replication=1, down_after=3.0) as testbed:
        certs = {}
        for name in ("site-a", "site-b"):
            site = testbed[name].site
            certs[name] = enable_web(site, token=TOKEN)[0]
            site.config.web.cors_origins = [VIEWER]
            site.save_config()
        testbed.start()
        urls = {name: _web_url(testbed[name]) for name in ("site-a", "site-b")}
        yield Bed(testbed, urls, certs, files)


def _studies(files: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in files:
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
        out.setdefault(uid, []).append(p)
    return out


def _dataset_bytes(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return bytes(split_part10(buf.getvalue()).dataset)


def test_stow_qido_wado_over_https_with_a_token(bed: Bed) -> None:
    studies = _studies(bed.files)
    study, paths = sorted(studies.items())[0]
    client = _client(bed, "site-a")
    sent = [pydicom.dcmread(p) for p in paths]
    response = client.store_instances(sent)
    assert "FailedSOPSequence" not in response
    assert len(response.ReferencedSOPSequence) == len(paths)
    # the same ingest path as C-STORE: indexed, counted and published by the site process
    assert bed.bed["site-a"].status()["instances"] == len(paths)
    found = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert [f["0020000D"]["Value"][0] for f in found] == [study]
    assert found[0]["00201208"]["Value"] == [len(paths)]
    got = client.retrieve_study(study, media_types=AS_STORED)
    want = {bytes(split_part10(p.read_bytes()).dataset) for p in paths}
    assert {_dataset_bytes(d) for d in got} == want
    # the published study is found by the other site, from the DHT and catalogues
    assert wait_for(lambda: [h["name"] for h in bed.bed["site-b"].find(study)] == ["site-a"], 60)


def test_access_control_and_cors(bed: Bed) -> None:
    url, verify = bed.url["site-a"], str(bed.cert["site-a"])
    studies = f"{url}/studies"
    r = requests.get(studies, verify=verify, timeout=TIMEOUT)
    assert r.status_code == 401 and "Bearer" in r.headers["WWW-Authenticate"]
    with pytest.raises(requests.HTTPError):
        _client(bed, "site-a", token="not-the-token").search_for_studies()
    # a preflight from the viewer's origin is answered without credentials
    preflight = {
        "Origin": VIEWER,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization,accept",
    }
    r = requests.options(studies, headers=preflight, verify=verify, timeout=TIMEOUT)
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "GET" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Allow-Headers"] == "authorization,accept"
    # from any other origin: refused, no CORS headers
    other = {**preflight, "Origin": "http://evil.example"}
    r = requests.options(studies, headers=other, verify=verify, timeout=TIMEOUT)
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
    # the real request still needs credentials; the 401 is readable by the viewer's page
    r = requests.get(studies, headers={"Origin": VIEWER}, verify=verify, timeout=TIMEOUT)
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == VIEWER
    auth = {"Origin": VIEWER, "Authorization": f"Bearer {TOKEN}"}
    r = requests.get(studies, headers=auth, verify=verify, timeout=TIMEOUT)
    assert r.status_code in (200, 204) and r.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "Warning" in r.headers["Access-Control-Expose-Headers"]
    r = requests.get(studies, headers={**auth, "Origin": "http://evil.example"}, verify=verify)
    assert "Access-Control-Allow-Origin" not in r.headers
    r = requests.get(f"{studies}?federation=maybe", headers=auth, verify=verify)
    assert r.status_code == 400 and "federation must be true or false" in r.text


def test_federation_wide_search_and_read_through_retrieve(bed: Bed) -> None:
    studies = _studies(bed.files)
    study, paths = sorted(studies.items())[1]
    site_a, site_b = bed.bed["site-a"], bed.bed["site-b"]
    report = store_files("127.0.0.1", site_b.dicom_port, site_b.aet, paths)  # C-STORE at B
    assert not report.failed and len(report.stored) == len(paths)
    # A learns from the federation's catalogues that B holds it; A holds nothing of it
    assert wait_for(lambda: [h["name"] for h in site_a.find(study)] == ["site-b"], 30, 0.2)
    client = _client(bed, "site-a")
    assert client.search_for_studies(search_filters={"StudyInstanceUID": study}) == []
    found = client.search_for_studies(
        search_filters={"StudyInstanceUID": study, "federation": "true"}
    )
    assert len(found) == 1
    assert found[0]["0020000D"]["Value"] == [study]
    assert found[0]["00080054"]["Value"] == [site_b.aet]  # RetrieveAETitle: who holds it
    assert found[0]["00080056"]["Value"] == ["NEARLINE"]  # not here yet
    assert found[0]["00201208"]["Value"] == [len(paths)]
    # served here (read-through); dicomweb-client sends Host without the port, so the path only
    assert found[0]["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{study}")
    series = client.search_for_series(
        study, search_filters={"federation": "true", "includefield": "all"}
    )
    assert len(series) == 1 and series[0]["00080054"]["Value"] == [site_b.aet]
    instances = client.search_for_instances(study, search_filters={"federation": "true"})
    assert len(instances) == len(paths)
    # both sites' studies, merged, each once; site A's own is ONLINE here
    everything = client.search_for_studies(search_filters={"federation": "true"})
    by_uid = {f["0020000D"]["Value"][0]: f for f in everything}
    assert set(by_uid) == set(studies)
    other = next(u for u in studies if u != study)
    assert by_uid[other]["00080056"]["Value"] == ["ONLINE"]
    assert by_uid[other]["00080054"]["Value"] == [site_a.aet]
    # WADO-RS at A: fetched from B first (verified, stored, published), then served as stored
    got = client.retrieve_study(study, media_types=AS_STORED)
    want = {bytes(split_part10(p.read_bytes()).dataset) for p in paths}
    assert {_dataset_bytes(d) for d in got} == want
    assert site_a.status()["instances"] == len(bed.files)  # now stored here too
    meta = client.retrieve_study_metadata(study)
    assert len(meta) == len(paths)
    # now held at both: A answers ONLINE and names both sites (each answers from its index)
    found = client.search_for_studies(
        search_filters={"StudyInstanceUID": study, "federation": "true"}
    )
    assert found[0]["00080056"]["Value"] == ["ONLINE"]
    assert found[0]["00080054"]["Value"] == [site_a.aet, site_b.aet]
    # a study no site holds is 404, also through the federation
    r = requests.get(
        f"{bed.url['site-a']}/studies/1.2.3.999",
        headers={"Authorization": f"Bearer {TOKEN}"},
        verify=str(bed.cert["site-a"]),
        timeout=TIMEOUT,
    )
    assert r.status_code == 404
