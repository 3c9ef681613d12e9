"""Mutual TLS 1.3 contexts for the transfer service: both sides must be federation members.

Sites are addressed by IP, not DNS names, so the hostname check is off; instead OpenSSL checks
the chain to the federation CA (no other roots are trusted) and ``peer_site_id`` re-checks the
peer certificate with ``verify_member_certificate`` and derives the peer's site_id from its key.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dht.errors import RecordError
from dht.membership import Federation, Identity, verify_member_certificate
from p2pacs.errors import MembershipError

__all__ = ["client_context", "member_site_id", "peer_site_id", "server_context"]


def _context(purpose: ssl.Purpose, identity: Identity, federation: Federation) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(
        cadata=federation.ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    key_pem = identity.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = identity.certificate.public_bytes(serialization.Encoding.PEM)
    # ssl only loads key material from files: write it to a private temporary file, load, remove
    fd, name = tempfile.mkstemp(prefix="p2pacs-tls-", suffix=".pem")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key_pem + cert_pem)
        os.close(fd)
        ctx.load_cert_chain(name)
    finally:
        Path(name).unlink(missing_ok=True)
    return ctx


def server_context(
    identity: Identity,
    federation: Federation,
    on_refused: Callable[[str], None] | None = None,
) -> ssl.SSLContext:
    """Requires a client certificate issued by the federation CA at the handshake;
    ``on_refused(reason)`` is told of each handshake that fails (a non-member refused)."""
    ctx = _context(ssl.Purpose.CLIENT_AUTH, identity, federation)
    if on_refused is not None:
        ctx.sslobject_class = _watched(on_refused)
    return ctx


def _watched(on_refused: Callable[[str], None]) -> type[ssl.SSLObject]:
    """An SSLObject that reports a failed handshake. asyncio only logs those in debug mode
    and tells the server's protocol nothing (it is never made), so this is the one place that
    sees them; the peer's address is not known here."""

    class Watched(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                on_refused(f"TLS handshake refused: {exc.reason or exc}")
                raise

    return Watched


def client_context(identity: Identity, federation: Federation) -> ssl.SSLContext:
    return _context(ssl.Purpose.SERVER_AUTH, identity, federation)


def peer_site_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, federation: Federation) -> bytes:
    """The verified site_id of the other end of a TLS connection."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return member_site_id(der, federation)


_VERIFIED_MAX = 1024  # certificates remembered as verified (a federation has far fewer sites)
# (CA fingerprint, certificate DER) -> (site_id, end of validity); a peer presents the same
# certificate on every connection and request, so the Ed25519 check runs once per certificate
_verified: OrderedDict[tuple[str, bytes], tuple[bytes, dt.datetime]] = OrderedDict()
_verified_lock = threading.Lock()


def member_site_id(der: bytes | None, federation: Federation) -> bytes:
    """The site_id of a DER certificate issued by the federation CA; MembershipError if not."""
    if not der:
        raise MembershipError("the peer presented no certificate")
    key = (federation.fingerprint, der)
    now = dt.datetime.now(dt.UTC)
    with _verified_lock:
        hit = _verified.get(key)
        if hit is not None and now <= hit[1]:
            _verified.move_to_end(key)
            return hit[0]
    try:
        cert = x509.load_der_x509_certificate(der)
        site_id = verify_member_certificate(cert, federation.ca_cert, now)
    except (RecordError, ValueError) as exc:
        raise MembershipError(f"the peer is not a member of this federation: {exc}") from exc
    with _verified_lock:
        _verified[key] = (site_id, cert.not_valid_after_utc)
        while len(_verified) > _VERIFIED_MAX:
            _verified.popitem(last=False)
    return site_id
