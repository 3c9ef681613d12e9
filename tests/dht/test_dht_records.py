"""Pure record functions: no sockets, no event loop."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dht.errors import LocalProtocolError, RecordError
from dht.membership import FederationCA, Identity, create_federation
from dht.records import (
    CertVerifier,
    Record,
    decode_record,
    derive_dht_key,
    encode_record,
    merge_records,
    seal_value,
    sign_record,
    unseal_value,
    verify_record,
)

from dht_helpers import make_identity

NOW = time.time()


def build(
    ident: Identity,
    ca: FederationCA,
    *,
    seq: int = 1,
    ttl: float = 60.0,
    value: bytes = b"v",
    now: float | None = None,
) -> Record:
    fed = ca.federation
    dkey = derive_dht_key(fed.key_hash_key, "study", "1.2.3.4")
    return sign_record(
        key=ident.key,
        cert=ident.certificate,
        publisher=ident.site_id,
        dht_key=dkey,
        seq=seq,
        expires_ms=int(((NOW if now is None else now) + ttl) * 1000),
        sealed=seal_value(fed.seal_key, dkey, value),
    )


def test_dht_key_is_keyed_and_separates_namespaces(ca: FederationCA) -> None:
    k = ca.federation.key_hash_key
    a = derive_dht_key(k, "study", "1.2.3")
    assert len(a) == 20
    assert a == derive_dht_key(k, "study", "1.2.3")
    assert a != derive_dht_key(k, "site", "1.2.3")
    assert a != derive_dht_key(create_federation("other").federation.key_hash_key, "study", "1.2.3")
    with pytest.raises(LocalProtocolError):
        derive_dht_key(k, "a\0b", "c")


def test_seal_round_trip_and_binds_key(ca: FederationCA) -> None:
    key = ca.federation.seal_key
    dk1, dk2 = b"\x01" * 20, b"\x02" * 20
    sealed = seal_value(key, dk1, b"secret manifest")
    assert b"secret manifest" not in sealed
    assert unseal_value(key, dk1, sealed) == b"secret manifest"
    with pytest.raises(RecordError):
        unseal_value(key, dk2, sealed)  # moved to another key
    with pytest.raises(RecordError):
        unseal_value(bytes(32), dk1, sealed)  # another federation
    with pytest.raises(LocalProtocolError):
        seal_value(key, dk1, b"x" * 5000)


def test_encode_decode_verify(ca: FederationCA) -> None:
    ident = make_identity(ca, "alpha")
    record = build(ident, ca)
    raw = encode_record(record)
    assert len(raw) < 1200
    back = decode_record(raw)
    assert back == record
    member = verify_record(back, CertVerifier(ca.federation.ca_cert), NOW)
    assert member.site_id == ident.site_id
    assert member.name == "alpha"


def test_forged_signature_rejected(ca: FederationCA) -> None:
    record = build(make_identity(ca, "a"), ca)
    sig = bytes([record.signature[0] ^ 1]) + record.signature[1:]
    forged = replace(record, signature=sig)
    with pytest.raises(RecordError, match="signature"):
        verify_record(forged, CertVerifier(ca.federation.ca_cert), NOW)
    # changing a signed field (seq) also breaks the signature
    bumped = replace(record, seq=record.seq + 1)
    with pytest.raises(RecordError):
        verify_record(bumped, CertVerifier(ca.federation.ca_cert), NOW)


def test_publisher_must_match_certificate(ca: FederationCA) -> None:
    a, b = make_identity(ca, "a"), make_identity(ca, "b")
    record = build(a, ca)
    # b's certificate on a's record: publisher != site_id of the certificate
    swapped = replace(record, cert_der=build(b, ca).cert_der)
    with pytest.raises(RecordError, match="publisher"):
        verify_record(swapped, CertVerifier(ca.federation.ca_cert), NOW)


def test_foreign_ca_rejected(ca: FederationCA) -> None:
    foreign = create_federation("evil")
    evil = make_identity(foreign, "evil")
    record = build(evil, ca)
    with pytest.raises(RecordError, match="CA"):
        verify_record(record, CertVerifier(ca.federation.ca_cert), NOW)


def test_expired_and_overlong_rejected(ca: FederationCA) -> None:
    ident = make_identity(ca, "a")
    verifier = CertVerifier(ca.federation.ca_cert)
    with pytest.raises(RecordError, match="expired"):
        verify_record(build(ident, ca, ttl=-1), verifier, NOW)
    with pytest.raises(RecordError, match="lifetime"):
        verify_record(build(ident, ca, ttl=400 * 86400), verifier, NOW)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x99" + b"\x00" * 9, b"\x91" * 100, b"\xdc\xff\xff"],
)
def test_decode_malformed(raw: bytes) -> None:
    with pytest.raises(RecordError):
        decode_record(raw)


def test_merge_rules(ca: FederationCA) -> None:
    a, b = make_identity(ca, "a"), make_identity(ca, "b")
    a1, a2 = build(a, ca, seq=1, value=b"old"), build(a, ca, seq=2, value=b"new")
    b1 = build(b, ca, seq=7)
    b_expired = build(b, ca, seq=9, ttl=-5)
    merged = merge_records([a1], [a2, b1, b_expired], NOW)
    assert {r.publisher: r.seq for r in merged} == {a.site_id: 2, b.site_id: 7}
    # a lower seq never replaces a higher one, whichever side it comes from
    assert merge_records([a2], [a1], NOW) == [a2]
    # equal seq: the existing one stays (a replay changes nothing)
    a2_again = build(a, ca, seq=2, value=b"other")
    assert merge_records([a2], [a2_again], NOW) == [a2]


def test_cert_cache_reuses_verification(ca: FederationCA) -> None:
    verifier = CertVerifier(ca.federation.ca_cert, max_size=1)
    a, b = make_identity(ca, "a"), make_identity(ca, "b")
    ra, rb = build(a, ca), build(b, ca)
    assert verifier.verify(ra.cert_der, NOW).site_id == a.site_id
    assert verifier.verify(rb.cert_der, NOW).site_id == b.site_id  # evicts a
    assert verifier.verify(ra.cert_der, NOW).site_id == a.site_id
    with pytest.raises(RecordError):
        verifier.verify(b"not a certificate", NOW)


def test_other_key_type_rejected(ca: FederationCA) -> None:
    # a signature made with a key that is not the certificate's
    ident = make_identity(ca, "a")
    impostor = Identity(key=Ed25519PrivateKey.generate(), certificate=ident.certificate)
    record = sign_record(
        key=impostor.key,
        cert=impostor.certificate,
        publisher=ident.site_id,
        dht_key=b"\x00" * 20,
        seq=1,
        expires_ms=int((NOW + 60) * 1000),
        sealed=b"\x00" * 40,
    )
    with pytest.raises(RecordError, match="signature"):
        verify_record(record, CertVerifier(ca.federation.ca_cert), NOW)


def test_expired_record_accepted_only_when_allowed(ca: FederationCA) -> None:
    """A site reading back its own last record from a member's copy after a long outage."""
    ident = make_identity(ca, "long-outage")
    verifier = CertVerifier(ca.federation.ca_cert)
    old = build(ident, ca, seq=3, ttl=-3600)  # lapsed an hour ago
    with pytest.raises(RecordError, match="expired"):
        verify_record(old, verifier, NOW)
    assert verify_record(old, verifier, NOW, allow_expired=True).site_id == ident.site_id
    forged = replace(old, seq=4)  # the signature still guards every field
    with pytest.raises(RecordError, match="signature"):
        verify_record(forged, verifier, NOW, allow_expired=True)
