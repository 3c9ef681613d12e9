"""``p2pacs doctor`` against real parts: sockets this test holds, a dcmtk storescp as a C-MOVE
destination, real site processes of one federation and a site of another federation."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pacs.cli import main
from p2pacs.cli.common import console, err_console
from p2pacs.doctor import member_handshake
from p2pacs.federation.identity import create_federation_dir, enroll_site, load_identity
from p2pacs.site import Site
from p2pacs.testbed import SiteProcess, Testbed, free_port, wait_for

STORESCP = shutil.which("storescp")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for c in (console, err_console):
        monkeypatch.setattr(c, "width", 400)
    yield


def doctor(capsys: pytest.CaptureFixture[str], site: Path) -> tuple[int, dict[str, dict[str, str]]]:
    code = main(["--site", str(site), "doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["schema"] == 1 and report["ok"] is (code == 0)
    return code, {c["name"]: c for c in report["checks"]}


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    """dcmtk's storescp (AE title PACS) on a free port: a C-MOVE destination that answers."""
    if STORESCP is None:
        pytest.skip("dcmtk's storescp is not installed (make test installs it)")
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(out), str(port)])
    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        assert wait_for(listening, 10, 0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_stopped_site(tmp_path: Path, storescp: int, capsys: pytest.CaptureFixture[str]) -> None:
    fed = create_federation_dir(tmp_path / "fed", "doctor")
    dead = free_port()
    site = enroll_site(
        fed, "clinic", tmp_path / "clinic", bind="127.0.0.1", discovery=False,
        dicom_port=free_port(), transfer_port=free_port(), dht_port=free_port(),
        destinations={"PACS": f"127.0.0.1:{storescp}", "GONE": f"127.0.0.1:{dead}"},
    )  # fmt: skip
    code, checks = doctor(capsys, site.path)
    assert checks["destination PACS"]["verdict"] == "ok", checks
    assert "C-ECHO succeeded" in checks["destination PACS"]["detail"]
    assert checks["destination GONE"]["verdict"] == "fail"
    assert checks["DICOM port (TCP)"]["verdict"] == "ok"
    assert checks["identity file modes"]["verdict"] == "ok"
    assert checks["bootstrap"]["verdict"] == "skip"
    assert checks["node"]["verdict"] == "skip"
    assert code == 1  # GONE does not answer

    site.config.dicom.destinations.pop("GONE")
    site.save_config()
    assert doctor(capsys, site.path)[0] == 0

    # a port held by another program, and a key readable by others
    with socket.socket() as held:
        held.bind(("127.0.0.1", site.config.dicom.port))
        held.listen()
        (site.identity_path / "site.key").chmod(0o644)
        code, checks = doctor(capsys, site.path)
    assert code == 1
    assert checks["DICOM port (TCP)"]["verdict"] == "fail"
    assert "config set dicom.port" in checks["DICOM port (TCP)"]["detail"]
    assert checks["identity file modes"]["verdict"] == "fail"
    assert "chmod 600" in checks["identity file modes"]["detail"]


def _status(site: SiteProcess) -> dict[str, Any]:
    return site.status()


@pytest.mark.slow
def test_running_sites_and_a_site_of_another_federation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Testbed(tmp_path / "bed", ["lab", "clinic-a"], down_after=4.0) as bed:
        bed.start()
        lab, clinic = bed["lab"], bed["clinic-a"]
        assert wait_for(lambda: _status(clinic)["federation"]["clock"]["members"] >= 1, 60)
        code, checks = doctor(capsys, clinic.path)
        assert code == 0, checks
        assert checks["member lab"]["verdict"] == "ok"
        assert "mutual TLS" in checks["member lab"]["detail"]
        for port in ("DICOM port (TCP)", "transfer port (TCP)", "DHT port (UDP)"):
            assert "held by this site" in checks[port]["detail"], checks[port]
        assert checks["clock"]["verdict"] == "ok"
        assert checks["DHT datagrams"]["verdict"] == "ok"

        lab_site = lab.site
        lab_dht = f"127.0.0.1:{lab_site.config.federation.dht_port}"
        # a stopped member of the same federation: its bootstrap answers a DHT hello
        same = enroll_site(
            bed.fed_dir, "clinic-b", tmp_path / "bed" / "clinic-b", bind="127.0.0.1",
            discovery=False, bootstrap=[lab_dht], dicom_port=free_port(),
            transfer_port=free_port(), dht_port=free_port(),
        )  # fmt: skip
        code, checks = doctor(capsys, same.path)
        assert checks[f"bootstrap {lab_dht}"]["verdict"] == "ok", checks

        # a site enrolled in another federation, pointed at the lab
        other_fed = create_federation_dir(tmp_path / "other-fed", "elsewhere")
        wrong = enroll_site(
            other_fed, "stray", tmp_path / "bed" / "stray", bind="127.0.0.1",
            discovery=False, bootstrap=[lab_dht], dicom_port=free_port(),
            transfer_port=free_port(), dht_port=free_port(),
        )  # fmt: skip
        code, checks = doctor(capsys, wrong.path)
        assert code == 1
        assert checks[f"bootstrap {lab_dht}"]["verdict"] == "fail"
        assert "another federation" in checks[f"bootstrap {lab_dht}"]["detail"]

        # its TLS handshake with a member fails as "wrong federation?"
        creds = load_identity(Site.open(wrong.path))
        lab_transfer = lab_site.config.federation.transfer_port
        verdict, detail = asyncio.run(member_handshake("127.0.0.1", lab_transfer, *creds))
        assert verdict == "fail" and "wrong federation?" in detail

        stray = SiteProcess("stray", wrong.path, "P2PACS", wrong.config.dicom.port)
        try:
            stray.start()
            code, checks = doctor(capsys, wrong.path)
            assert code == 1 and checks["members"]["verdict"] == "fail", checks
            # the lab drops the stray's datagrams as bad MAC; status and doctor say so
            assert wait_for(
                lambda: _status(lab)["federation"]["dht"].get("dropped_bad_mac", 0) > 0, 30
            )
            code, checks = doctor(capsys, lab.path)
            assert checks["DHT datagrams"]["verdict"] == "warn"
            assert "dropped_bad_mac" in checks["DHT datagrams"]["detail"]
            status = lab.run_cli("status", timeout=60).stdout.decode()
            assert "dropped_bad_mac" in status and "another federation" in status, status
        finally:
            stray.stop()
