"""Federation and site identities on disk: create the CA, enroll sites, load a site's identity.

A federation directory holds the CA key (keep it offline: it is needed only to enroll), the CA
certificate, the 32-byte federation secret and ``federation.toml``. A site's ``identity/``
folder (its key, its certificate, the CA certificate and the secret) is everything a wiped site
needs to rejoin and recover; private keys and the secret are written 0600.
"""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dht.errors import RecordError
from dht.membership import (
    Federation,
    FederationCA,
    Identity,
    create_federation,
    issue_site_certificate,
    verify_member_certificate,
)
from p2pacs.config import parse_hostport
from p2pacs.errors import IdentityError
from p2pacs.federation.continuity import Evidence, mark_baseline
from p2pacs.site import Site

__all__ = ["create_federation_dir", "enroll_site", "load_federation_ca", "load_identity"]

log = logging.getLogger(__name__)

CA_KEY, CA_CERT, SECRET, FED_TOML = "ca.key", "ca.crt", "secret", "federation.toml"
SITE_KEY, SITE_CERT = "site.key", "site.crt"


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write atomically; private files are created 0600 and never exist with wider modes."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def _key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def create_federation_dir(out: Path, name: str) -> Path:
    """Make a new federation (CA + secret) in ``out``; refuses to overwrite one."""
    if (out / CA_KEY).exists():
        raise IdentityError(f"{out} already holds a federation; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    ca = create_federation(name)
    _write(out / CA_KEY, _key_pem(ca.key), private=True)
    _write(out / CA_CERT, _cert_pem(ca.federation.ca_cert), private=False)
    _write(out / SECRET, ca.federation.secret, private=True)
    info = {"name": name, "fingerprint": ca.federation.fingerprint}
    _write(out / FED_TOML, tomli_w.dumps(info).encode(), private=False)
    return out


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what} is missing: {path}") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o); run 'chmod 600 %s'", path, mode, path)


def _load_key(path: Path) -> Ed25519PrivateKey:
    pem = _read(path, "private key")  # a missing file is an IdentityError, not a traceback
    _check_private(path)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise IdentityError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, "certificate"))
    except ValueError as exc:
        raise IdentityError(f"{path} is not a PEM certificate: {exc}") from exc


def _load_federation(folder: Path) -> Federation:
    secret = _read(folder / SECRET, "federation secret")
    _check_private(folder / SECRET)
    try:
        return Federation(_load_cert(folder / CA_CERT), secret)
    except ValueError as exc:
        raise IdentityError(f"{folder / SECRET}: {exc}") from exc


def load_federation_ca(fed_dir: Path) -> FederationCA:
    return FederationCA(_load_key(fed_dir / CA_KEY), _load_federation(fed_dir))


def enroll_site(
    fed_dir: Path,
    name: str,
    site_dir: Path,
    *,
    host: str = "127.0.0.1",
    bind: str = "0.0.0.0",
    aet: str | None = None,
    dicom_port: int | None = None,
    dht_port: int | None = None,
    transfer_port: int | None = None,
    bootstrap: Sequence[str] = (),
    destinations: Mapping[str, str] | None = None,
    replication: int | None = None,
    discovery: bool = True,
) -> Site:
    """Issue a site key and certificate and write the site's identity folder and config."""
    ca = load_federation_ca(fed_dir)
    site = Site.init(site_dir)
    ident = site.identity_path
    if (ident / SITE_KEY).exists():
        raise IdentityError(f"{site_dir} is already enrolled; enroll a new site in a new folder")
    for b in bootstrap:
        parse_hostport(b)
    for ae, addr in (destinations or {}).items():
        parse_hostport(addr)
        if not ae or len(ae) > 16:
            raise IdentityError(f"AE title {ae!r} must be 1 to 16 characters")
    ident.mkdir(parents=True, exist_ok=True)
    os.chmod(ident, 0o700)
    key = Ed25519PrivateKey.generate()
    hosts = tuple(dict.fromkeys([host, "127.0.0.1", "localhost"]))
    cert = issue_site_certificate(ca, key.public_key(), name, hosts)
    _write(ident / SITE_KEY, _key_pem(key), private=True)
    _write(ident / SITE_CERT, _cert_pem(cert), private=False)
    _write(ident / CA_CERT, _cert_pem(ca.federation.ca_cert), private=False)
    _write(ident / SECRET, ca.federation.secret, private=True)
    fed = site.config.federation
    fed.enabled, fed.name, fed.host, fed.bind, fed.discovery = True, name, host, bind, discovery
    fed.bootstrap = list(bootstrap)
    if dht_port is not None:
        fed.dht_port = dht_port
    if transfer_port is not None:
        fed.transfer_port = transfer_port
    if replication is not None:
        fed.replication = replication
    dicom = site.config.dicom
    dicom.bind = bind  # one --bind for every listener: the DICOM gateway too
    if aet:
        dicom.ae_title = aet
    if dicom_port is not None:
        dicom.port = dicom_port
    dicom.destinations.update(destinations or {})
    site.save_config()
    # a new key is a new site: nothing was ever published under it, so its archive may publish
    # an empty catalogue (a wiped archive, which loses this mark, never may)
    with site.archive() as archive:
        mark_baseline(archive.db, Evidence.ENROLLED, f"enrolled as {name}")
    return site


def load_identity(site: Site) -> tuple[Identity, Federation]:
    """The site's key, certificate and federation; checked against each other."""
    folder = site.identity_path
    if not (folder / SITE_KEY).exists():
        raise IdentityError(
            f"{site.path} has no identity; enroll it with 'p2pacs site enroll' "
            "or restore its identity/ folder from the off-site backup"
        )
    identity = Identity(_load_key(folder / SITE_KEY), _load_cert(folder / SITE_CERT))
    federation = _load_federation(folder)
    try:
        site_id = verify_member_certificate(identity.certificate, federation.ca_cert)
    except RecordError as exc:
        raise IdentityError(f"{folder / SITE_CERT}: {exc}") from exc
    if site_id != identity.site_id:
        raise IdentityError(f"{folder / SITE_CERT} does not match {folder / SITE_KEY}")
    return identity, federation


def federation_info(fed_dir: Path) -> dict[str, str]:
    try:
        return dict(tomllib.loads((fed_dir / FED_TOML).read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise IdentityError(f"cannot read {fed_dir / FED_TOML}: {exc}") from exc
