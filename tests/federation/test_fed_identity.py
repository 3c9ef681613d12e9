"""``federation create`` and ``site enroll`` run in-process, and ``load_identity`` failures."""

from __future__ import annotations

import shutil
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from dht.membership import issue_site_certificate, verify_member_certificate
from p2pacs.cli import main
from p2pacs.errors import IdentityError
from p2pacs.federation.identity import load_federation_ca, load_identity
from p2pacs.site import Site

pytestmark = pytest.mark.timeout(60)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    out = tmp_path / "fed"
    assert main(["federation", "create", "--out", str(out), "--name", "north"]) == 0
    return out


def _enroll(fed: Path, site: Path, name: str, *extra: str) -> int:
    return main(
        ["site", "enroll", "--federation", str(fed), "--name", name, "--out", str(site), *extra]
    )


def test_federation_create_files_and_modes(fed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sorted(p.name for p in fed.iterdir()) == [
        "ca.crt",
        "ca.key",
        "federation.toml",
        "secret",
    ]
    assert _mode(fed / "ca.key") == 0o600
    assert _mode(fed / "secret") == 0o600
    assert len((fed / "secret").read_bytes()) == 32
    info = tomllib.loads((fed / "federation.toml").read_text())
    ca = load_federation_ca(fed)
    assert info == {"name": "north", "fingerprint": ca.federation.fingerprint}
    capsys.readouterr()
    # refuses to overwrite: the CA key and secret stay as they were
    key_before = (fed / "ca.key").read_bytes()
    assert main(["federation", "create", "--out", str(fed)]) == 1
    assert "already holds a federation" in capsys.readouterr().err
    assert (fed / "ca.key").read_bytes() == key_before


def test_site_enroll_writes_identity_and_config(fed: Path, tmp_path: Path) -> None:
    site_dir = tmp_path / "clinic-a"
    rc = _enroll(
        fed,
        site_dir,
        "clinic-a",
        "--host",
        "10.1.2.3",
        "--bind",
        "10.1.2.3",
        "--aet",
        "CLINIC_A",
        "--dicom-port",
        "11112",
        "--dht-port",
        "11190",
        "--transfer-port",
        "11180",
        "--bootstrap",
        "10.1.2.4:11190",
        "--bootstrap",
        "10.1.2.5:11190",
        "--destination",
        "PACS_A=10.1.2.10:104",
        "--replication",
        "3",
        "--no-discovery",
    )
    assert rc == 0
    ident = site_dir / "identity"
    assert _mode(ident) == 0o700
    assert _mode(ident / "site.key") == 0o600
    assert _mode(ident / "secret") == 0o600
    assert (ident / "secret").read_bytes() == (fed / "secret").read_bytes()
    assert (ident / "ca.crt").read_bytes() == (fed / "ca.crt").read_bytes()
    raw = tomllib.loads((site_dir / "site.toml").read_text())
    f = raw["federation"]
    assert f["enabled"] is True and f["name"] == "clinic-a"
    assert (f["host"], f["bind"]) == ("10.1.2.3", "10.1.2.3")
    assert (f["dht_port"], f["transfer_port"], f["replication"]) == (11190, 11180, 3)
    assert f["bootstrap"] == ["10.1.2.4:11190", "10.1.2.5:11190"]
    assert f["discovery"] is False
    assert raw["dicom"]["ae_title"] == "CLINIC_A"
    assert raw["dicom"]["destinations"] == {"PACS_A": "10.1.2.10:104"}
    identity, federation = load_identity(Site.open(site_dir))
    assert identity.name == "clinic-a"
    assert federation.fingerprint == load_federation_ca(fed).federation.fingerprint
    assert verify_member_certificate(identity.certificate, federation.ca_cert) == identity.site_id


def test_site_enroll_refuses_to_overwrite_and_bad_flags(
    fed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_dir = tmp_path / "clinic-b"
    assert _enroll(fed, site_dir, "clinic-b") == 0
    key_before = (site_dir / "identity" / "site.key").read_bytes()
    capsys.readouterr()
    assert _enroll(fed, site_dir, "clinic-b") == 1
    assert "already enrolled" in capsys.readouterr().err
    assert (site_dir / "identity" / "site.key").read_bytes() == key_before
    assert _enroll(fed, tmp_path / "x", "x", "--destination", "NOEQUALS") == 2
    assert "AE=HOST:PORT" in capsys.readouterr().err
    assert _enroll(fed, tmp_path / "y", "y", "--bootstrap", "nohostport") == 1
    assert "host:port" in capsys.readouterr().err
    assert not (tmp_path / "y" / "identity" / "site.key").exists()
    assert _enroll(tmp_path / "no-such-fed", tmp_path / "z", "z") == 1
    assert "no such folder" in capsys.readouterr().err


def test_load_identity_errors(fed: Path, tmp_path: Path) -> None:
    site_dir = tmp_path / "clinic-c"
    assert _enroll(fed, site_dir, "clinic-c") == 0
    site = Site.open(site_dir)
    ident = site.identity_path
    backup = tmp_path / "identity-backup"
    shutil.copytree(ident, backup)

    def restore() -> None:
        shutil.rmtree(ident)
        shutil.copytree(backup, ident)

    # nothing enrolled at all
    with pytest.raises(IdentityError, match="has no identity"):
        load_identity(Site.init(tmp_path / "bare"))
    # each missing file names itself
    for name, what in (
        ("site.crt", "certificate is missing"),
        ("secret", "federation secret is missing"),
        ("ca.crt", "certificate is missing"),
    ):
        (ident / name).unlink()
        with pytest.raises(IdentityError, match=what) as info:
            load_identity(site)
        assert name in str(info.value)
        restore()
    # a certificate from another CA, for this very key
    other = tmp_path / "other-fed"
    assert main(["federation", "create", "--out", str(other)]) == 0
    foreign_ca = load_federation_ca(other)
    identity, _ = load_identity(site)
    cert = issue_site_certificate(foreign_ca, identity.key.public_key(), "clinic-c")
    (ident / "site.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(IdentityError, match="not issued by this federation"):
        load_identity(site)
    restore()
    # the other federation's CA certificate and secret under our site certificate
    shutil.copy(other / "ca.crt", ident / "ca.crt")
    with pytest.raises(IdentityError, match=r"site\.crt"):
        load_identity(site)
    restore()
    # a certificate of another site (same CA) beside our key
    assert _enroll(fed, tmp_path / "clinic-d", "clinic-d") == 0
    shutil.copy(tmp_path / "clinic-d" / "identity" / "site.crt", ident / "site.crt")
    with pytest.raises(IdentityError, match="does not match"):
        load_identity(site)
    restore()
    # garbage files
    (ident / "site.key").write_text("not a key")
    with pytest.raises(IdentityError, match="not a PEM private key"):
        load_identity(site)
    restore()
    (ident / "secret").write_bytes(b"short")
    with pytest.raises(IdentityError, match="32 bytes"):
        load_identity(site)
    restore()
    assert load_identity(site)[0].name == "clinic-c"
