"""Signed, sealed, multi-value DHT records: build, sign, seal, verify and merge.

Pure functions over bytes and values (no sockets, no asyncio), so they are tested alone. A record
is one publisher's entry under one DHT key; a key holds one record per publisher and the highest
``seq`` wins (BEP 44's rule for mutable items, applied per publisher as in libp2p provider records).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import blake3
import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.x509.oid import NameOID

from dht.const import CERT_CACHE_MAX, ID_SIZE, MAX_DATAGRAM, MAX_TTL, MAX_VALUE
from dht.errors import LocalProtocolError, RecordError
from dht.membership import verify_member_certificate

__all__ = [
    "FLAG_TOMBSTONE",
    "CertVerifier",
    "Member",
    "Record",
    "decode_record",
    "derive_dht_key",
    "encode_record",
    "merge_records",
    "seal_value",
    "sign_record",
    "unseal_value",
    "verify_record",
]

RECORD_VERSION = 1
FLAG_TOMBSTONE = 1  # the publisher withdrew its entry; kept until expiry so it beats older seqs
_SIGN_CONTEXT = b"p2pacs-dht-record-v1\x00"  # domain separation for record signatures
_NONCE_SIZE = 12  # ChaCha20-Poly1305 nonce (RFC 8439)
_TAG_SIZE = 16


@dataclass(frozen=True, slots=True)
class Record:
    """One publisher's entry under one DHT key, as stored and sent (value still sealed)."""

    dht_key: bytes
    publisher: bytes
    seq: int
    expires_ms: int
    flags: int
    sealed: bytes
    cert_der: bytes
    signature: bytes

    @property
    def expires_at(self) -> float:
        return self.expires_ms / 1000.0

    @property
    def is_tombstone(self) -> bool:
        return bool(self.flags & FLAG_TOMBSTONE)

    def expired(self, now: float) -> bool:
        return self.expires_ms <= int(now * 1000)


@dataclass(frozen=True, slots=True)
class Member:
    """What a verified certificate tells us: who the publisher is."""

    site_id: bytes
    name: str
    public_key: Ed25519PublicKey
    not_after: float


def derive_dht_key(key_hash_key: bytes, namespace: str, key: str) -> bytes:
    """Opaque 160-bit DHT key: keyed BLAKE3 of ``namespace \\0 key``, so UIDs never hit the wire."""
    if "\0" in namespace:
        raise LocalProtocolError("namespace must not contain NUL; pick a plain name like 'study'")
    data = namespace.encode() + b"\0" + key.encode()
    return blake3.blake3(data, key=key_hash_key).digest(length=ID_SIZE)


def seal_value(seal_key: bytes, dht_key: bytes, value: bytes, nonce: bytes | None = None) -> bytes:
    """ChaCha20-Poly1305 with a random nonce; AAD = DHT key so a sealed value can't be moved."""
    if len(value) > MAX_VALUE:
        raise LocalProtocolError(
            f"value is {len(value)} bytes; the DHT carries at most {MAX_VALUE} (store a hash)"
        )
    nonce = os.urandom(_NONCE_SIZE) if nonce is None else nonce
    return nonce + ChaCha20Poly1305(seal_key).encrypt(nonce, value, dht_key)


def unseal_value(seal_key: bytes, dht_key: bytes, sealed: bytes) -> bytes:
    if len(sealed) < _NONCE_SIZE + _TAG_SIZE:
        raise RecordError("sealed value too short")
    try:
        return ChaCha20Poly1305(seal_key).decrypt(
            sealed[:_NONCE_SIZE], sealed[_NONCE_SIZE:], dht_key
        )
    except InvalidTag as exc:
        raise RecordError("sealed value does not open with this federation's key") from exc


def _signed_bytes(
    *, dht_key: bytes, publisher: bytes, seq: int, expires_ms: int, flags: int, sealed: bytes
) -> bytes:
    body: bytes = msgpack.packb(
        [RECORD_VERSION, dht_key, publisher, seq, expires_ms, flags, sealed], use_bin_type=True
    )
    return _SIGN_CONTEXT + body


def sign_record(
    *,
    key: Ed25519PrivateKey,
    cert: x509.Certificate,
    publisher: bytes,
    dht_key: bytes,
    seq: int,
    expires_ms: int,
    sealed: bytes,
    flags: int = 0,
) -> Record:
    """Build and sign a record; the signature covers every field except the certificate."""
    if len(dht_key) != ID_SIZE or len(publisher) != ID_SIZE:
        raise LocalProtocolError("dht_key and publisher must be 20 bytes")
    if not 0 <= seq < 2**64 or not 0 <= expires_ms < 2**63:
        raise LocalProtocolError("seq and expiry must fit in 64 bits")
    signature = key.sign(
        _signed_bytes(
            dht_key=dht_key,
            publisher=publisher,
            seq=seq,
            expires_ms=expires_ms,
            flags=flags,
            sealed=sealed,
        )
    )
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    return Record(dht_key, publisher, seq, expires_ms, flags, sealed, cert_der, signature)


def encode_record(record: Record) -> bytes:
    """Canonical msgpack array (never pickle); field order fixed, bin type for bytes."""
    out: bytes = msgpack.packb(
        [
            RECORD_VERSION,
            record.dht_key,
            record.publisher,
            record.seq,
            record.expires_ms,
            record.flags,
            record.sealed,
            record.cert_der,
            record.signature,
        ],
        use_bin_type=True,
    )
    return out


def decode_record(data: bytes) -> Record:
    """Parse a record's shape (types and sizes only); ``verify_record`` checks who signed it."""
    if not isinstance(data, bytes) or len(data) > MAX_DATAGRAM:
        raise RecordError("record is not bytes or is too large")
    try:
        obj = msgpack.unpackb(data, raw=False, max_array_len=16, max_map_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise RecordError(f"record is not valid msgpack: {exc.__class__.__name__}") from exc
    if not isinstance(obj, list) or len(obj) != 9 or obj[0] != RECORD_VERSION:
        raise RecordError("record has the wrong shape or version")
    _, dkey, pub, seq, exp, flags, sealed, cert, sig = obj
    if not (
        isinstance(dkey, bytes)
        and len(dkey) == ID_SIZE
        and isinstance(pub, bytes)
        and len(pub) == ID_SIZE
        and type(seq) is int
        and 0 <= seq < 2**64
        and type(exp) is int
        and 0 <= exp < 2**63
        and type(flags) is int
        and 0 <= flags < 256
        and isinstance(sealed, bytes)
        and isinstance(cert, bytes)
        and isinstance(sig, bytes)
        and len(sig) == 64
    ):
        raise RecordError("record field has the wrong type or size")
    return Record(dkey, pub, seq, exp, flags, sealed, cert, sig)


class CertVerifier:
    """Verifies member certificates against the federation CA, remembering the good ones.

    The cache is keyed by the DER bytes, so a record carrying a known certificate costs one
    dictionary lookup instead of a parse and a signature check.
    """

    def __init__(self, ca_cert: x509.Certificate, max_size: int = CERT_CACHE_MAX) -> None:
        self._ca = ca_cert
        self._cache: OrderedDict[bytes, Member] = OrderedDict()
        self._max = max_size

    def verify(self, cert_der: bytes, now: float) -> Member:
        member = self._cache.get(cert_der)
        if member is None:
            try:
                cert = x509.load_der_x509_certificate(cert_der)
            except ValueError as exc:
                raise RecordError("certificate is not valid DER") from exc
            site_id = verify_member_certificate(cert, self._ca)
            key = cert.public_key()
            assert isinstance(key, Ed25519PublicKey)  # checked by verify_member_certificate
            attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            name = str(attrs[0].value) if attrs else site_id.hex()
            member = Member(site_id, name, key, cert.not_valid_after_utc.timestamp())
            self._cache[cert_der] = member
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if now > member.not_after:
            self._cache.pop(cert_der, None)
            raise RecordError("certificate has expired; the publisher must re-enroll")
        return member


def verify_record(
    record: Record, verifier: CertVerifier, now: float, *, allow_expired: bool = False
) -> Member:
    """Check certificate (federation CA), publisher == site_id of the certificate, signature,
    expiry and lifetime cap; return the publisher. Raises ``RecordError`` otherwise.

    ``allow_expired``: accept a record past its expiry (never one whose lifetime claim is over
    the cap). Only for a site reading back its own last record from a member's copy after an
    outage longer than the TTL: the signature still proves who wrote it and ``seq`` when."""
    member = verifier.verify(record.cert_der, now)
    if member.site_id != record.publisher:
        raise RecordError("record publisher is not the site named in its certificate")
    body = _signed_bytes(
        dht_key=record.dht_key,
        publisher=record.publisher,
        seq=record.seq,
        expires_ms=record.expires_ms,
        flags=record.flags,
        sealed=record.sealed,
    )
    try:
        member.public_key.verify(record.signature, body)
    except InvalidSignature as exc:
        raise RecordError("record signature does not verify") from exc
    if record.expired(now) and not allow_expired:
        raise RecordError("record has expired")
    if record.expires_at > now + MAX_TTL + 60:
        raise RecordError("record claims a lifetime beyond the cap")
    return member


def merge_records(
    existing: Iterable[Record], incoming: Iterable[Record], now: float
) -> list[Record]:
    """One record per publisher, the highest seq wins, expired ones drop; sorted by publisher.

    Inputs must already be verified. Equal seqs keep the existing record, so a replay of the same
    signed record changes nothing.
    """
    best: dict[bytes, Record] = {}
    for record in (*existing, *incoming):
        if record.expired(now):
            continue
        current = best.get(record.publisher)
        if current is None or record.seq > current.seq:
            best[record.publisher] = record
    return [best[p] for p in sorted(best)]
