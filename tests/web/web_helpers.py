"""Helpers of the web tests: a certificate for HTTPS, a site with [web] enabled."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from p2pacs import credentials
from p2pacs.site import Site

USER, PASSWORD = "oncall", "correct horse battery staple"
TOKEN = "test-token-for-the-scraper-0123456789"  # the "prometheus" bearer token


def make_cert(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for ``host`` (and localhost): (cert, key) PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "web.crt", folder / "web.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def spki_pin(cert_path: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): what Chromium's
    --ignore-certificate-errors-spki-list takes to trust exactly this certificate."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def enable_web(
    site: Site, *, port: int = 0, token: str | None = None, refresh: float = 5.0
) -> tuple[Path, Path]:
    """Turn on the site's web server over HTTPS with a fresh certificate and the test user
    (and ``token`` as the ``prometheus`` bearer token); saved to site.toml."""
    cert, key = make_cert(site.path / "web-tls")
    web = site.config.web
    web.users = {USER: credentials.hash_password(PASSWORD)}
    if token is not None:
        web.tokens = {"prometheus": credentials.hash_token(token)}
    web.tls_cert, web.tls_key = "web-tls/web.crt", "web-tls/web.key"
    web.port = port
    web.refresh = refresh
    web.enabled = True
    assert site.config.check() == []
    site.save_config()
    return cert, key
