"""Site folders, ports and the running-node check, through ``p2pacs.cli.main`` in-process:
``site enroll --port-base``, one ``--bind`` for every listener, ``config get/set``, and a
``node.json`` left by a killed process (stale: its pid is dead, or nobody holds the lock)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pacs.cli import main
from p2pacs.cli.common import console, err_console
from p2pacs.config import Config
from p2pacs.control.client import RUNFILE, node_address, read_runfile
from p2pacs.federation.identity import create_federation_dir, enroll_site
from p2pacs.site import Site, SiteLock, SiteRunningError, lock_held
from p2pacs.testbed import free_port
from p2pacs.web.view import ago, member_rows, status_lines, status_warnings


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for c in (console, err_console):
        monkeypatch.setattr(c, "width", 400)
    yield


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_federation_dir(tmp_path_factory.mktemp("fed") / "federation", "site-tests")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _enroll_cli(
    capsys: pytest.CaptureFixture[str], federation: Path, out: Path, *extra: str
) -> Site:
    code, _, err = _run(
        capsys, "site", "enroll", "--federation", str(federation), "--name", out.name,
        "--out", str(out), "--no-discovery", *extra,
    )  # fmt: skip
    assert code == 0, err
    return Site.open(out)


def test_port_base_gives_three_ports_and_explicit_ports_win(
    tmp_path: Path, federation: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _enroll_cli(capsys, federation, tmp_path / "a", "--port-base", "21100")
    assert (a.config.dicom.port, a.config.federation.transfer_port) == (21100, 21101)
    assert a.config.federation.dht_port == 21102
    b = _enroll_cli(
        capsys, federation, tmp_path / "b", "--port-base", "21110", "--dht-port", "21190"
    )
    assert (b.config.dicom.port, b.config.federation.transfer_port) == (21110, 21111)
    assert b.config.federation.dht_port == 21190
    code, _, err = _run(
        capsys, "site", "enroll", "--federation", str(federation), "--name", "c",
        "--out", str(tmp_path / "c"), "--dicom-port", "21120", "--transfer-port", "21120",
    )  # fmt: skip
    assert code != 0 and "different ports" in err
    assert not (tmp_path / "c").exists()


def test_bind_applies_to_every_listener(
    tmp_path: Path, federation: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _enroll_cli(capsys, federation, tmp_path / "a", "--bind", "127.0.0.1")
    assert site.config.federation.bind == "127.0.0.1"
    assert site.config.dicom.bind == "127.0.0.1"  # the DICOM gateway too (security.md)


def test_config_get_and_set(
    tmp_path: Path, federation: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _enroll_cli(capsys, federation, tmp_path / "a", "--port-base", "21200")
    path = str(site.path)
    assert _run(capsys, "--site", path, "config", "get", "federation.dht_port")[1] == "21202\n"
    code, out, _ = _run(capsys, "--site", path, "config", "set", "federation.dht_port", "21290")
    assert code == 0 and "21202 -> 21290" in out
    code, out, _ = _run(capsys, "--site", path, "config", "set", "store.map_size", "2G")
    assert code == 0
    code, _, _ = _run(
        capsys, "--site", path, "config", "set", "dicom.destinations", "PACS=10.0.0.5:104,CT=h:4242"
    )
    assert code == 0
    code, _, _ = _run(capsys, "--site", path, "config", "set", "federation.bootstrap", "a:1,b:2")
    assert code == 0
    again = Site.open(site.path).config
    assert again.federation.dht_port == 21290
    assert again.store.map_size == 2 << 30
    assert again.dicom.destinations == {"PACS": "10.0.0.5:104", "CT": "h:4242"}
    assert again.federation.bootstrap == ["a:1", "b:2"]
    code, out, _ = _run(capsys, "--site", path, "config", "get", "dicom.destinations")
    assert json.loads(out) == again.dicom.destinations
    code, out, _ = _run(capsys, "--site", path, "config", "get")
    assert code == 0 and "dht_port = 21290" in out
    code, out, _ = _run(capsys, "--site", path, "config", "keys")
    assert code == 0 and set(out.split()) == set(Config.setting_keys())


def test_only_init_and_enroll_create_a_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "typo"
    code, _, err = _run(capsys, "--site", str(folder), "ls")
    assert code == 1 and str(folder) in err and not folder.exists()
    assert _run(capsys, "--site", str(folder), "init")[0] == 0
    assert _run(capsys, "--site", str(folder), "ls")[0] == 0


# --- a stale node.json ------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_runfile(site: Site, pid: int) -> None:
    port = free_port()
    (site.path / RUNFILE).write_text(
        json.dumps({"pid": pid, "dicom": ["0.0.0.0", port], "transfer": ["0.0.0.0", port]})
    )


def test_a_dead_pid_in_node_json_is_not_running(
    tmp_path: Path, federation: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = enroll_site(
        federation, "a", tmp_path / "a", bind="127.0.0.1", discovery=False,
        dicom_port=free_port(), transfer_port=free_port(), dht_port=free_port(),
    )  # fmt: skip
    _write_runfile(site, _dead_pid())  # as after SIGKILL or a power loss
    assert read_runfile(site) is None and node_address(site) is None
    code, out, _ = _run(capsys, "--site", str(site.path), "status")
    assert code == 1 and "not running" in out and "cannot reach" not in out
    # recover and scrub start the site themselves, as the runbook says
    code, out, err = _run(capsys, "--site", str(site.path), "recover")
    assert code == 0, out + err
    assert "recovered 0 of 0 studies" in out
    _write_runfile(site, _dead_pid())
    code, out, err = _run(capsys, "--site", str(site.path), "scrub")
    assert code == 0 and "blobs checked" in out, out + err
    assert not lock_held(site.path)


def test_a_live_pid_without_the_lock_is_not_running(tmp_path: Path, federation: Path) -> None:
    """After a reboot the recorded pid may belong to another program: no lock, not a node."""
    site = enroll_site(federation, "a", tmp_path / "a", discovery=False)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_runfile(site, other.pid)
        assert read_runfile(site) is None
        with SiteLock(site.path):  # the lock held by a site process: now it counts as running
            assert read_runfile(site) is not None
            with pytest.raises(SiteRunningError, match=r"site already running \(pid \d+\)"):
                site.lock().acquire()
    finally:
        other.kill()
        other.wait()


# --- status for people ------------------------------------------------------------------------

STATUS = {
    "schema": 1,
    "site": "clinic-a",
    "running": True,
    "pid": 4242,
    "ae_title": "P2PACS_A",
    "dicom": ["0.0.0.0", 11112],
    "uptime_s": 3600.0,
    "patients": 3,
    "studies": 24,
    "instances": 240,
    "blobs": 250,
    "bytes": 5_000_000,
    "federation": {
        "site_id": "aa" * 20,
        "replication": 2,
        "sites_up": 2,
        "sites_down": 1,
        "under_replicated": 17,
        "repair_passes": 24,
        "last_repair": 1000.0,
        "pulls_done": 3,
        "pulls_failed": 0,
        "repair_paused": "",
        "recovery_pending": 0,
        "recovery": {
            "studies_total": 0,
            "studies_done": 0,
            "bytes_total": 0,
            "bytes_done": 0,
            "retrying": 0,
            "given_up": {},
            "awaiting_record": False,
            "error": "",
            "full": "",
        },
        "clock": {"offset_s": 0.4, "members": 1, "off": False},
        "dht": {"datagrams_in": 10, "dropped_bad_mac": 7},
        "members": [
            {
                "name": "lab",
                "site_id": "bb" * 20,
                "up": True,
                "state": "up",
                "last_seen_s": 1.2,
                "address": "research-lab.hospital.example.org:11180",
                "studies": 20,
            },
            {
                "name": "clinic-b",
                "site_id": "cc" * 20,
                "up": False,
                "state": "down",
                "last_seen_s": 242.0,
                "address": "10.0.2.1:11180",
                "studies": 4,
            },
        ],
    },
}


def test_status_lines_use_the_json_names_and_human_times() -> None:
    text = "\n".join(status_lines(STATUS, "10.0.1.1", now=1242.0))
    for key in (
        "sites_up 2",
        "sites_down 1",
        "under_replicated 17",
        "repair_passes 24",
        "pulls_done 3",
        "recovery_pending 0",
        "dropped_bad_mac 7",
        "offset_s +0.4",
    ):
        assert key in text, text
    assert "last_repair 242 s ago" in text
    assert "10.0.1.1:11112" in text and "0.0.0.0" not in text  # the address others reach
    assert "(pid 4242)" in text and "60 min" in text
    assert ago(242.0) == "242 s ago" and ago(None) == "never"


def test_status_table_counts_this_site_and_keeps_addresses_whole() -> None:
    rows = member_rows(STATUS, "10.0.1.1:11180", now=0.0)
    assert [r[0] for r in rows] == ["clinic-a", "lab", "clinic-b"]
    fed = STATUS["federation"]
    assert isinstance(fed, dict)
    assert len(rows) == fed["sites_up"] + fed["sites_down"]
    assert rows[1][3] == "research-lab.hospital.example.org:11180"
    assert rows[2][2] == "242 s ago"


def test_status_warns_of_doctor_class_problems() -> None:
    warnings = status_warnings(STATUS, bootstrap=["10.0.0.1:11190"])
    assert any("dropped_bad_mac 7" in w and "another federation" in w for w in warnings)
    lonely = json.loads(json.dumps(STATUS))
    lonely["federation"]["members"] = []
    lonely["federation"]["dht"] = {}
    assert any("no member known" in w for w in status_warnings(lonely, ["10.0.0.1:11190"]))
    assert status_warnings(lonely, []) == []


def test_status_json_carries_the_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "--site", str(tmp_path / "s"), "init")[0] == 0
    code, out, _ = _run(capsys, "--site", str(tmp_path / "s"), "status", "--json")
    status = json.loads(out)
    assert code == 1 and status["schema"] == 1 and status["running"] is False
