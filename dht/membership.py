"""Federation membership primitives: CA, site certificates, site IDs and derived keys.

A federation is a set of sites that trust one Ed25519 CA and share a 32-byte secret. A site's
identity is an Ed25519 key pair and an X.509 certificate signed by that CA; the same certificate
authenticates DHT records and the peer-transfer TLS connections. Pure functions over
``cryptography`` objects: no files, no sockets (the application layer stores them).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass, field

import blake3
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dht.errors import RecordError

__all__ = [
    "SECRET_SIZE",
    "SITE_ID_SIZE",
    "Federation",
    "FederationCA",
    "Identity",
    "create_federation",
    "fingerprint",
    "issue_site_certificate",
    "public_key_bytes",
    "site_id_of",
    "verify_member_certificate",
]

SECRET_SIZE = 32  # bytes of the shared federation secret
SITE_ID_SIZE = 20  # bytes; equals the Kademlia node ID size (160 bits, paper section 2)
CA_VALIDITY = dt.timedelta(days=3650)  # a federation CA outlives its sites
SITE_VALIDITY = dt.timedelta(days=825)  # the CA/Browser Forum's former maximum for leaf certs

# BLAKE3 derive_key contexts: globally unique, hard-coded, application-specific (BLAKE3 spec 2.3)
_CTX_MAC = "p2pacs 2026-11 dht datagram MAC key"
_CTX_KEY = "p2pacs 2026-11 dht record key hashing key"
_CTX_SEAL = "p2pacs 2026-11 dht record sealing key"


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def site_id_of(key: Ed25519PublicKey) -> bytes:
    """site_id = first 20 bytes of BLAKE3(public key): a node cannot choose its Kademlia ID."""
    return blake3.blake3(public_key_bytes(key)).digest()[:SITE_ID_SIZE]


def fingerprint(cert: x509.Certificate) -> str:
    """Short hex fingerprint of a certificate (BLAKE3 of its DER), for display and mDNS TXT."""
    return blake3.blake3(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Federation:
    """What every member knows: the CA certificate and the shared secret."""

    ca_cert: x509.Certificate
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != SECRET_SIZE:
            raise ValueError(f"federation secret must be {SECRET_SIZE} bytes")

    @property
    def mac_key(self) -> bytes:
        """Key of the per-datagram MAC that keeps non-members off the DHT."""
        return blake3.blake3(self.secret, derive_key_context=_CTX_MAC).digest()

    @property
    def key_hash_key(self) -> bytes:
        """Key of the keyed hash that turns a study UID into an opaque DHT key."""
        return blake3.blake3(self.secret, derive_key_context=_CTX_KEY).digest()

    @property
    def seal_key(self) -> bytes:
        """AEAD key that seals record values, so payloads never cross the wire in the clear."""
        return blake3.blake3(self.secret, derive_key_context=_CTX_SEAL).digest()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.ca_cert)


@dataclass(frozen=True, slots=True)
class FederationCA:
    """The CA's private key; kept offline by the federation administrator, needed only to enroll."""

    key: Ed25519PrivateKey = field(repr=False)
    federation: Federation


@dataclass(frozen=True, slots=True)
class Identity:
    """One site: its private key and CA-signed certificate."""

    key: Ed25519PrivateKey = field(repr=False)
    certificate: x509.Certificate

    @property
    def site_id(self) -> bytes:
        return site_id_of(self.key.public_key())

    @property
    def name(self) -> str:
        attrs = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else self.site_id.hex()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_federation(name: str) -> FederationCA:
    """A new federation: an Ed25519 CA (self-signed, path length 0) and a random secret."""
    key = Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )
    return FederationCA(
        key=key, federation=Federation(ca_cert=cert, secret=secrets.token_bytes(SECRET_SIZE))
    )


def issue_site_certificate(
    ca: FederationCA,
    site_key: Ed25519PublicKey,
    name: str,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    validity: dt.timedelta = SITE_VALIDITY,
) -> x509.Certificate:
    """A site certificate: CN = site name, SAN = hosts, serial number; good for TLS both ways."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = _now()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.USER_ID, site_id_of(site_key).hex()),
        ]
    )
    ca_cert = ca.federation.ca_cert
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(site_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, None)


def verify_member_certificate(
    cert: x509.Certificate, ca_cert: x509.Certificate, now: dt.datetime | None = None
) -> bytes:
    """Check that ``cert`` was issued by ``ca_cert`` and is valid now; return its site_id.

    Raises ``RecordError`` otherwise (a foreign CA, a forged or expired certificate).
    """
    now = now or _now()
    if cert.issuer != ca_cert.subject:
        raise RecordError("certificate was not issued by this federation's CA")
    ca_key = ca_cert.public_key()
    if not isinstance(ca_key, Ed25519PublicKey):
        raise RecordError("federation CA key is not Ed25519")
    try:
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature as exc:
        raise RecordError(
            "certificate signature does not verify against the federation CA"
        ) from exc
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise RecordError("certificate is expired or not yet valid; re-enroll the site")
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise RecordError("site certificate key is not Ed25519")
    return site_id_of(key)
