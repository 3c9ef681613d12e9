"""Record storage backends (real LMDB)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_dht_records import build

from dht.membership import FederationCA
from dht.storage import LmdbRecordStore, MemoryRecordStore, OwnEntry, RecordStore

from dht_helpers import make_identity


@pytest.mark.parametrize("backend", ["lmdb", "memory"])
def test_put_merge_cull(backend: str, tmp_path: Path, ca: FederationCA) -> None:
    store: RecordStore = (
        LmdbRecordStore(tmp_path / "db") if backend == "lmdb" else MemoryRecordStore()
    )
    try:
        a, b = make_identity(ca, "a"), make_identity(ca, "b")
        now = time.time()
        r1, r2 = build(a, ca, seq=1, now=now), build(a, ca, seq=2, now=now)
        rb = build(b, ca, seq=5, ttl=1, now=now)
        assert store.put(r1, now)
        assert store.put(r2, now)
        assert not store.put(r1, now)  # lower seq refused
        assert store.put(rb, now)
        assert [r.seq for r in store.records(r1.dht_key, now)] == sorted(
            [2, 5], key=lambda s: a.site_id if s == 2 else b.site_id
        )
        assert len(store) == 2
        assert store.cull(now + 30) == 1  # b's record expired
        assert [r.publisher for r in store.records(r1.dht_key, now + 30)] == [a.site_id]
        assert store.records(b"\xff" * 20, now) == []
    finally:
        store.close()


def test_lmdb_survives_reopen(tmp_path: Path, ca: FederationCA) -> None:
    a = make_identity(ca, "a")
    now = time.time()
    record = build(a, ca, seq=3, now=now)
    store = LmdbRecordStore(tmp_path / "db")
    store.put(record, now)
    store.put_own(OwnEntry(record.dht_key, record.sealed, 60.0, 0, record.expires_ms))
    store.set_meta("seq", b"\x00\x07")
    store.close()
    again = LmdbRecordStore(tmp_path / "db")
    try:
        assert again.records(record.dht_key, now) == [record]
        assert [e.dht_key for e in again.own_entries()] == [record.dht_key]
        assert again.get_meta("seq") == b"\x00\x07"
        again.drop_own(record.dht_key)
        assert again.own_entries() == []
    finally:
        again.close()
