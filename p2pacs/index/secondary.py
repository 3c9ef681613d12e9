"""Secondary indexes for C-FIND: LMDB dupsort sub-databases from a normalised value to records.

Study indexes map ``keys.value_keys`` of one study attribute to the study UIDs holding it:

| sub-database | key (``keys.Kind``) | duplicates |
|---|---|---|
| ``ix_by_patient_id`` | PatientID (EXACT) | study UIDs |
| ``ix_by_patient_name`` | PatientName, folded (NAME) | study UIDs |
| ``ix_by_accession`` | AccessionNumber (EXACT) | study UIDs |
| ``ix_by_study_date`` | StudyDate, ``YYYYMMDD`` (DATE) | study UIDs |
| ``ix_by_study_time`` | StudyTime, ``HHMMSS.FFFFFF`` (TIME) | study UIDs |
| ``ix_by_modality`` | each of ModalitiesInStudy and of its series' Modality (EXACT) | study UIDs |
| ``ix_patient_by`` | ``I`` + PatientID / ``N`` + folded PatientName | ``ix_patient`` keys |
| ``ix_series_uid`` | SeriesInstanceUID | study UIDs |
| ``ix_meta`` | ``version`` | the index layout version (``INDEX_VERSION``) |

They are written in the transaction that writes the records they point at (``DicomIndex.add``),
and rebuilt in one pass when a site's index predates them (``build``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lmdb
import msgpack

from p2pacs.dicom.header import AttrValue
from p2pacs.index.keys import IRREGULAR, Exact, Kind, Prefix, Probe, Scan, value_keys
from p2pacs.store.db import SiteDB

__all__ = [
    "INDEX_VERSION",
    "MODALITY_INDEX",
    "PATIENT_INDEXES",
    "STUDY_INDEXES",
    "Secondary",
    "SecondaryIndex",
    "modality_keys",
]

INDEX_VERSION = 2  # 1: records only (every C-FIND scanned); 2: the secondary indexes here
_VERSION_KEY = b"version"


@dataclass(frozen=True, slots=True)
class SecondaryIndex:
    """One attribute's index: a dupsort sub-database, with a tag before every key when several
    indexes share it."""

    keyword: str
    kind: Kind
    name: str
    tag: bytes = b""


STUDY_INDEXES = (
    SecondaryIndex("PatientID", Kind.EXACT, "ix_by_patient_id"),
    SecondaryIndex("PatientName", Kind.NAME, "ix_by_patient_name"),
    SecondaryIndex("AccessionNumber", Kind.EXACT, "ix_by_accession"),
    SecondaryIndex("StudyDate", Kind.DATE, "ix_by_study_date"),
    SecondaryIndex("StudyTime", Kind.TIME, "ix_by_study_time"),
)
MODALITY_INDEX = SecondaryIndex("ModalitiesInStudy", Kind.EXACT, "ix_by_modality")
PATIENT_INDEXES = (
    SecondaryIndex("PatientID", Kind.EXACT, "ix_patient_by", b"I"),
    SecondaryIndex("PatientName", Kind.NAME, "ix_patient_by", b"N"),
)


def modality_keys(modalities: Iterable[str], series_modality: AttrValue | None) -> set[bytes]:
    """Keys of a study in the modality index: ModalitiesInStudy and a series' Modality (a
    multi-valued Modality is not in ModalitiesInStudy, but SERIES-level matching sees it)."""
    return value_keys(Kind.EXACT, list(modalities)) | value_keys(Kind.EXACT, series_modality)


class Secondary:
    """Handles of the secondary sub-databases, and reads and writes inside a caller's txn."""

    def __init__(self, db: SiteDB):
        self._handles: dict[str, Any] = {}
        for ix in (*STUDY_INDEXES, MODALITY_INDEX, *PATIENT_INDEXES):
            self._handles[ix.name] = db.db(ix.name, dupsort=True)
        self.series_uid = db.db("ix_series_uid", dupsort=True)
        self.meta = db.db("ix_meta")

    def handle(self, ix: SecondaryIndex) -> Any:
        return self._handles[ix.name]

    def handles(self) -> dict[str, Any]:
        return {**self._handles, "ix_series_uid": self.series_uid, "ix_meta": self.meta}

    # --- writes (inside the writer's transaction) -----------------------------------------------

    def put(
        self, txn: lmdb.Transaction, ix: SecondaryIndex, keys: Iterable[bytes], to: bytes
    ) -> None:
        db = self.handle(ix)
        for key in keys:
            txn.put(ix.tag + key, to, db=db)

    def delete(
        self, txn: lmdb.Transaction, ix: SecondaryIndex, keys: Iterable[bytes], to: bytes
    ) -> None:
        db = self.handle(ix)
        for key in keys:
            txn.delete(ix.tag + key, to, db=db)

    def update(
        self,
        txn: lmdb.Transaction,
        indexes: Iterable[SecondaryIndex],
        old: Mapping[str, AttrValue],
        new: Mapping[str, AttrValue],
        to: bytes,
    ) -> None:
        """Move ``to`` from the keys of ``old`` attributes to those of ``new`` ones."""
        for ix in indexes:
            before, after = old.get(ix.keyword), new.get(ix.keyword)
            if before == after:
                continue
            old_keys, new_keys = value_keys(ix.kind, before), value_keys(ix.kind, after)
            self.delete(txn, ix, old_keys - new_keys, to)
            self.put(txn, ix, new_keys - old_keys, to)

    def version(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_VERSION_KEY, db=self.meta)
        return 1 if raw is None else int(bytes(raw))

    def build(
        self,
        txn: lmdb.Transaction,
        studies: Iterable[Any],
        series: Iterable[Any],
        patients: Iterable[Any],
    ) -> int:
        """Fill every secondary index from the records (cursors over their sub-databases: (key,
        msgpack) rows); returns how many studies it indexed."""
        for handle in self.handles().values():
            txn.drop(handle, delete=False)
        n = 0
        for key, raw in studies:
            study = msgpack.unpackb(raw, raw=False)
            self.update(txn, STUDY_INDEXES, {}, study["a"], key)
            self.put(txn, MODALITY_INDEX, modality_keys(study["m"], None), key)
            n += 1
        sep = b"\x00"
        for key, raw in series:
            study_uid, _, series_uid = bytes(key).partition(sep)
            txn.put(series_uid, study_uid, db=self.series_uid)
            attrs = msgpack.unpackb(raw, raw=False)["a"]
            self.put(txn, MODALITY_INDEX, modality_keys((), attrs.get("Modality")), study_uid)
        for key, raw in patients:
            self.update(txn, PATIENT_INDEXES, {}, msgpack.unpackb(raw, raw=False)["a"], key)
        txn.put(_VERSION_KEY, str(INDEX_VERSION).encode(), db=self.meta)
        return n

    # --- reads ----------------------------------------------------------------------------------

    def count(self, txn: lmdb.Transaction, ix: SecondaryIndex, probe: Probe, limit: int) -> int:
        """How many entries ``probe`` reaches, counted up to ``limit``."""
        db = self.handle(ix)
        if isinstance(probe, Exact):
            cursor = txn.cursor(db=db)
            return int(cursor.count()) if cursor.set_key(ix.tag + probe.key) else 0
        if isinstance(probe, Scan):
            return int(txn.stat(db)["entries"])
        n = 0
        for _ in self.entries(txn, ix, probe):
            n += 1
            if n >= limit:
                break
        return n

    def contains(self, txn: lmdb.Transaction, ix: SecondaryIndex, probe: Exact, to: bytes) -> bool:
        return bool(txn.cursor(db=self.handle(ix)).set_key_dup(ix.tag + probe.key, to))

    def entries(self, txn: lmdb.Transaction, ix: SecondaryIndex, probe: Probe) -> Iterator[bytes]:
        """The records (study UIDs, patient keys) ``probe`` reaches, in key order, lazily."""
        cursor = txn.cursor(db=self.handle(ix))
        tag = ix.tag
        if isinstance(probe, Exact):
            if cursor.set_key(tag + probe.key):
                yield from (bytes(v) for v in cursor.iternext_dup())
            return
        if isinstance(probe, Prefix):
            yield from self._walk(cursor, tag + probe.prefix, lambda k: True)
            return
        if isinstance(probe, Scan):
            yield from self._walk(cursor, tag, lambda k: probe.accept(k[len(tag) :]))
            return
        low = tag + (probe.low or b"")
        high = None if probe.high is None else tag + probe.high
        if _seek(cursor, low):
            for k, v in cursor:
                key = bytes(k)
                if not key.startswith(tag) or key[len(tag) :].startswith(IRREGULAR):
                    break
                if high is not None and key > high:
                    break
                yield bytes(v)
        yield from self._walk(txn.cursor(db=self.handle(ix)), tag + IRREGULAR, lambda k: True)

    @staticmethod
    def _walk(cursor: Any, prefix: bytes, accept: Any) -> Iterator[bytes]:
        if not _seek(cursor, prefix):
            return
        for k, v in cursor:
            key = bytes(k)
            if not key.startswith(prefix):
                return
            if accept(key):
                yield bytes(v)


def _seek(cursor: Any, key: bytes) -> bool:
    """Put ``cursor`` on the first key >= ``key`` (LMDB keys cannot be empty: b"" is the first)."""
    return bool(cursor.set_range(key) if key else cursor.first())
