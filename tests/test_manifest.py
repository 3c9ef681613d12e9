"""Manifests and catalogues are canonical, hash-checked and reject malformed bytes."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pacs.errors import IntegrityError
from p2pacs.federation.catalogue import CatalogueEntry, SiteRecord, StudyHolding, newest_first
from p2pacs.federation.manifest import Manifest, ManifestEntry
from p2pacs.store import hash_bytes


def _entry(i: int, version: int = 0) -> ManifestEntry:
    data = f"instance {i} version {version}".encode()
    return ManifestEntry(
        series_uid=f"1.2.3.{i % 3}",
        sop_uid=f"1.2.3.4.{i}",
        received=1_700_000_000.0 + i + version,
        hash=hash_bytes(data),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        size=len(data),
        transfer_syntax="1.2.840.10008.1.2.1",
        prefix=b"DICM" + bytes([i % 256]),
    )


def test_manifest_is_canonical_whatever_the_order() -> None:
    entries = [_entry(i) for i in range(20)] + [_entry(3, version=1)]
    shuffled = entries[:]
    random.Random(7).shuffle(shuffled)
    a = Manifest("1.2.3", tuple(entries))
    b = Manifest("1.2.3", tuple(shuffled))
    assert a.encode() == b.encode()
    assert a.hash == b.hash == hash_bytes(a.encode())
    decoded = Manifest.decode(a.encode(), a.hash)
    assert decoded.entries == tuple(sorted(entries))
    assert decoded.instances == 20  # two versions of instance 3 count once
    assert decoded.total_bytes == sum(e.size for e in entries)
    assert decoded.covers(Manifest("1.2.3", tuple(entries[:5])))
    assert not Manifest("1.2.3", tuple(entries[:5])).covers(decoded)


def test_manifest_rejects_wrong_hash_and_garbage() -> None:
    m = Manifest("1.2.3", (_entry(1),))
    with pytest.raises(IntegrityError, match="do not match"):
        Manifest.decode(m.encode(), hash_bytes(b"other"))
    with pytest.raises(IntegrityError, match="malformed"):
        Manifest.decode(b"\x93\x01")
    with pytest.raises(IntegrityError, match="malformed"):
        Manifest.decode(m.encode()[:-3])


@given(st.binary(max_size=300))
def test_manifest_decode_never_crashes(data: bytes) -> None:
    with contextlib.suppress(IntegrityError):
        Manifest.decode(data)


def test_catalogue_orders_recovery_newest_first() -> None:
    entries = [
        CatalogueEntry("1.1", "a" * 64, "20200101", 10, 1000, 5.0),
        CatalogueEntry("1.2", "b" * 64, "20261124", 3, 300, 1.0),
        CatalogueEntry("1.3", "c" * 64, "", 1, 10, 9.0),
        CatalogueEntry("1.4", "d" * 64, "20261124", 2, 200, 2.0),
    ]
    assert [e.study_uid for e in newest_first(reversed(entries))] == ["1.4", "1.2", "1.1", "1.3"]


def test_dht_values_are_small_and_round_trip() -> None:
    holding = StudyHolding("f" * 64, 1234, 10**12)
    assert StudyHolding.decode(holding.encode()) == holding
    assert len(holding.encode()) < 100
    site = SiteRecord("clinic-a", "10.0.0.2", 11180, 11190, "e" * 64, 12, 1.5)
    assert SiteRecord.decode(site.encode()) == site
    assert len(site.encode()) < 200
    with pytest.raises(IntegrityError):
        StudyHolding.decode(b"\x90")
    with pytest.raises(IntegrityError):
        SiteRecord.decode(b"garbage")
