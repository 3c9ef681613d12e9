"""Every command, given what a newcomer gets wrong, fails with one clear line and a non-zero
exit: never a traceback, never a new archive made from a typo. Each case runs the real
``p2pacs`` as a subprocess, as an operator would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pacs.federation.identity import create_federation_dir, enroll_site
from p2pacs.site import Site
from p2pacs.testbed import SiteProcess, free_port

# every command that works on an existing site, with the arguments it needs
SITE_COMMANDS = [
    ["ls"],
    ["import", "nothing.dcm"],
    ["show", "1.2.3"],
    ["export", "1.2.3", "out"],
    ["verify"],
    ["serve"],
    ["status"],
    ["status", "--json"],
    ["peers"],
    ["find", "1.2.3"],
    ["fetch", "1.2.3"],
    ["recover"],
    ["scrub"],
    ["doctor"],
    ["config", "get"],
    ["config", "get", "dicom.port"],
    ["config", "set", "dicom.port", "11113"],
]


def p2pacs(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pacs", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        check=False,
    )


def assert_clean_failure(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Non-zero exit, no traceback, and the message says each of ``needles``."""
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, output
    return output


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_federation_dir(tmp_path_factory.mktemp("fed") / "federation", "errors")


def enroll(federation: Path, folder: Path, **kw: object) -> Site:
    ports = {"dicom_port": free_port(), "transfer_port": free_port(), "dht_port": free_port()}
    return enroll_site(
        federation,
        folder.name,
        folder,
        bind="127.0.0.1",
        discovery=False,
        **{**ports, **kw},  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("command", SITE_COMMANDS, ids="-".join)
def test_a_mistyped_site_folder_fails_and_is_not_created(
    tmp_path: Path, command: list[str]
) -> None:
    typo = tmp_path / "clinc-a"
    done = p2pacs("--site", str(typo), *command, cwd=tmp_path)
    assert_clean_failure(done, str(typo), "does not exist", "--site")
    assert not typo.exists(), "a command other than init or site enroll created a site folder"


def test_a_missing_p2pacs_site_is_named(tmp_path: Path) -> None:
    typo = tmp_path / "nowhere"
    done = p2pacs("ls", cwd=tmp_path, env={"P2PACS_SITE": str(typo)})
    assert_clean_failure(done, str(typo), "$P2PACS_SITE")
    assert not typo.exists()


@pytest.mark.parametrize("command", [["ls"], ["serve"], ["status"], ["recover"], ["doctor"]])
def test_a_folder_that_is_not_a_site_is_left_alone(tmp_path: Path, command: list[str]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8")
    done = p2pacs("--site", str(folder), *command, cwd=tmp_path)
    assert_clean_failure(done, str(folder), "not a site folder")
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]


GARBAGE = {
    "not-toml": "this is [ not toml",
    "binary": "\x00\xff\xfe garbage",
    "wrong-type": '[dicom]\nport = "eleven"\n',
    "unknown-key": "[dicom]\nprot = 11112\n",
    "bad-port": "[dicom]\nport = 70000\n",
    "bad-destination": '[dicom.destinations]\nPACS = "nohostport"\n',
    "unknown-table": "[dicomm]\nport = 1\n",
}


@pytest.mark.parametrize("content", GARBAGE.values(), ids=list(GARBAGE))
@pytest.mark.parametrize("command", [["serve"], ["status"], ["config", "get"]])
def test_garbage_site_toml_is_reported_without_a_traceback(
    tmp_path: Path, content: str, command: list[str]
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.toml").write_bytes(content.encode("utf-8", "surrogateescape"))
    done = p2pacs("--site", str(site), *command, cwd=tmp_path)
    assert_clean_failure(done, "site.toml")


def test_enroll_refuses_a_folder_that_is_not_a_federation(tmp_path: Path, federation: Path) -> None:
    site = enroll(federation, tmp_path / "lab")
    for wrong, needle in ((site.path, "it is a site folder"), (tmp_path, "not a federation")):
        done = p2pacs(
            "site", "enroll", "--federation", str(wrong), "--name", "x", "--out", "x",
            cwd=tmp_path,
        )  # fmt: skip
        assert_clean_failure(done, "not a federation folder", needle)
    done = p2pacs(
        "site", "enroll", "--federation", str(tmp_path / "nope"), "--name", "x", "--out", "x",
        cwd=tmp_path,
    )  # fmt: skip
    assert_clean_failure(done, "no such folder")
    assert not (tmp_path / "x").exists()


def test_re_enrolling_points_at_config_set(tmp_path: Path, federation: Path) -> None:
    site = enroll(federation, tmp_path / "lab")
    done = p2pacs(
        "site", "enroll", "--federation", str(federation), "--name", "lab", "--out",
        str(site.path), "--port-base", "30000", cwd=tmp_path,
    )  # fmt: skip
    assert_clean_failure(done, "already enrolled", "config set", "federation.dht_port")


@pytest.mark.parametrize(
    "args",
    [["--port-base", "65535"], ["--port-base", "0"], ["--dicom-port", "x"], ["--dht-port", "0"]],
)
def test_enroll_refuses_impossible_ports(tmp_path: Path, federation: Path, args: list[str]) -> None:
    done = p2pacs(
        "site", "enroll", "--federation", str(federation), "--name", "x", "--out", "x", *args,
        cwd=tmp_path,
    )  # fmt: skip
    assert_clean_failure(done)
    assert not (tmp_path / "x").exists()


@pytest.fixture
def held() -> Iterator[dict[str, socket.socket]]:
    """Sockets this test holds on ports a site wants, as another program would."""
    socks: dict[str, socket.socket] = {}
    try:
        yield socks
    finally:
        for s in socks.values():
            s.close()


def _hold(port: int, *, udp: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.bind(("127.0.0.1", port))
    if not udp:
        s.listen()
    return s


PORT_CASES = [
    (setting, udp, command)
    for setting, udp in (
        ("dicom.port", False),
        ("federation.transfer_port", False),
        ("federation.dht_port", True),
    )
    for command in (["serve"], ["recover"], ["scrub"])
]


@pytest.mark.parametrize("case", PORT_CASES, ids=lambda c: f"{c[0]}-{c[2][0]}")
def test_a_port_in_use_names_the_setting_to_change(
    tmp_path: Path,
    federation: Path,
    held: dict[str, socket.socket],
    case: tuple[str, bool, list[str]],
) -> None:
    setting, udp, command = case
    site = enroll(federation, tmp_path / "clinic")
    port = int(site.config.get_key(setting))
    held[setting] = _hold(port, udp=udp)
    done = p2pacs("--site", str(site.path), *command, cwd=tmp_path)
    assert_clean_failure(done, f"{port} (", "in use", f"config set {setting} N")


def test_serve_port_flag_out_of_range(tmp_path: Path, federation: Path) -> None:
    site = enroll(federation, tmp_path / "clinic")
    done = p2pacs("--site", str(site.path), "serve", "--port", "70000", cwd=tmp_path)
    assert_clean_failure(done, "70000")


def test_a_second_serve_on_one_site_names_the_running_pid(tmp_path: Path, federation: Path) -> None:
    site = enroll(federation, tmp_path / "clinic")
    proc = SiteProcess("clinic", site.path, "CLINIC", site.config.dicom.port)
    try:
        proc.start()
        assert proc.proc is not None
        done = p2pacs("--site", str(site.path), "serve", cwd=tmp_path, timeout=60)
        assert_clean_failure(done, f"site already running (pid {proc.proc.pid})")
        assert proc.running, "the second serve disturbed the first"
        # other commands still reach the running one
        status = p2pacs("--site", str(site.path), "status", cwd=tmp_path)
        assert status.returncode == 0 and f"pid {proc.proc.pid}" in status.stdout, status
    finally:
        proc.stop()
    # once it stopped, the lock is free again: serve would start (checked without starting)
    assert p2pacs("--site", str(site.path), "status", cwd=tmp_path).returncode == 1


def test_config_set_refuses_bad_values_and_keeps_the_file(tmp_path: Path, federation: Path) -> None:
    site = enroll(federation, tmp_path / "clinic")
    before = site.config_path.read_bytes()
    for key, value, needle in (
        ("dicom.port", "70000", "not a port"),
        ("dicom.prot", "1", "unknown setting"),
        ("federation.replication", "two", "whole number"),
        ("federation.replication", "0", "1 or more"),
        ("dicom.destinations", "PACS", "AE=HOST:PORT"),
        ("federation.bootstrap", "nohost", "host:port"),
        ("federation.name", "other", "certificate"),
        ("store.map_size", "10", "1 MiB"),
    ):
        done = p2pacs("--site", str(site.path), "config", "set", key, value, cwd=tmp_path)
        assert_clean_failure(done, needle)
    assert site.config_path.read_bytes() == before
