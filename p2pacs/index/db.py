"""The DICOM index: patient / study / series / instance records in the site's LMDB environment.

Named sub-databases (keys are UTF-8, joined by NUL so a study's series and instances are one
prefix scan):
- ``ix_patient``: PatientID -> patient attributes and the study UIDs of that patient
- ``ix_study``: StudyInstanceUID -> study + patient attributes and maintained counts
- ``ix_series``: study NUL series -> series attributes and instance count
- ``ix_instance``: study NUL series NUL sop -> instance attributes and its stored versions
- ``ix_sop``: SOPInstanceUID -> study NUL series
- secondary indexes for C-FIND (``secondary.py``), written in the same transaction

Duplicates (PS3.4 leaves the policy to the SCP): the same SOP Instance UID arriving with
different bytes is never silently dropped. Every distinct version is kept (its blob and file
meta); the newest received is what retrieval returns; identical bytes are stored once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import lmdb
import msgpack

from p2pacs.dicom.header import LEVEL_KEYS, AttrValue, Level
from p2pacs.index.query import Tables, run_find
from p2pacs.index.secondary import (
    INDEX_VERSION,
    MODALITY_INDEX,
    PATIENT_INDEXES,
    STUDY_INDEXES,
    Secondary,
    modality_keys,
)
from p2pacs.store.db import SiteDB

__all__ = ["DicomIndex", "IndexUpdate", "InstanceRecord", "StudyRecord", "Version"]

log = logging.getLogger(__name__)

_SEP = "\x00"
BUILD_TIMEOUT = 3600.0  # seconds the one-pass build of the secondary indexes may take


def _pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def _unpack(raw: bytes | memoryview | None) -> Any:
    return None if raw is None else msgpack.unpackb(raw, raw=False)


def _patient_key(patient_id: str) -> bytes:
    """LMDB keys cannot be empty: instances without a PatientID share one anonymous patient."""
    return b"P" + patient_id.encode()


def _key(*parts: str) -> bytes:
    return _SEP.join(parts).encode()


@dataclass(frozen=True, slots=True)
class Version:
    """One stored encoding of an instance: its blob, file meta prefix and arrival time."""

    hash: str
    size: int
    transfer_syntax: str
    prefix: bytes
    received: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "h": self.hash,
            "n": self.size,
            "ts": self.transfer_syntax,
            "p": self.prefix,
            "t": self.received,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Version:
        return cls(str(d["h"]), int(d["n"]), str(d["ts"]), bytes(d["p"]), float(d["t"]))


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    attrs: dict[str, AttrValue]
    versions: tuple[Version, ...]

    @property
    def current(self) -> Version:
        """The version retrieval returns: the newest received."""
        return self.versions[-1]


@dataclass(frozen=True, slots=True)
class StudyRecord:
    study_uid: str
    attrs: dict[str, AttrValue]
    series: int
    instances: int
    bytes: int
    modalities: list[str]
    sop_classes: list[str]
    updated: float


@dataclass(frozen=True, slots=True)
class IndexUpdate:
    """What one ``add`` changed, for callers that publish or report."""

    study_uid: str
    sop_uid: str
    new_instance: bool
    new_version: bool


@dataclass(slots=True)
class _Levels:
    patient: dict[str, AttrValue] = field(default_factory=dict)
    study: dict[str, AttrValue] = field(default_factory=dict)
    series: dict[str, AttrValue] = field(default_factory=dict)
    image: dict[str, AttrValue] = field(default_factory=dict)


def _split(attrs: Mapping[str, AttrValue]) -> _Levels:
    out = _Levels()
    for level, target in (
        (Level.PATIENT, out.patient),
        (Level.STUDY, out.study),
        (Level.SERIES, out.series),
        (Level.IMAGE, out.image),
    ):
        for kw in LEVEL_KEYS[level]:
            if kw in attrs:
                target[kw] = attrs[kw]
    return out


def _merge_missing(old: dict[str, AttrValue], new: Mapping[str, AttrValue]) -> dict[str, AttrValue]:
    """Keep the first value seen for each attribute, fill in those still missing."""
    merged = dict(old)
    for k, v in new.items():
        merged.setdefault(k, v)
    return merged


class DicomIndex:
    """Query and update the DICOM hierarchy. Updates run inside a caller's write transaction."""

    def __init__(self, db: SiteDB):
        self._db = db
        self._patient = db.db("ix_patient")
        self._study = db.db("ix_study")
        self._series = db.db("ix_series")
        self._instance = db.db("ix_instance")
        self._sop = db.db("ix_sop")
        self._secondary = Secondary(db)
        self._tables = Tables(
            self._patient, self._study, self._series, self._instance, self._sop, self._secondary
        )
        self._ensure_secondary()

    def _ensure_secondary(self) -> None:
        """Build the secondary indexes of an index written before them (one pass, logged)."""
        with self._db.read() as txn:
            version = self._secondary.version(txn)
            studies = int(txn.stat(self._study)["entries"])
        if version >= INDEX_VERSION:
            return
        if studies:
            log.info("building the C-FIND indexes of %d studies (index v%d)", studies, version)
        started = time.monotonic()

        def build(txn: lmdb.Transaction) -> int:
            return self._secondary.build(
                txn,
                txn.cursor(db=self._study),
                txn.cursor(db=self._series),
                txn.cursor(db=self._patient),
            )

        built = self._db.write(build, timeout=BUILD_TIMEOUT)
        if built:
            seconds = time.monotonic() - started
            log.info("built the C-FIND indexes of %d studies in %.1f s", built, seconds)

    # --- updates (writer thread) ---------------------------------------------------------------

    def add(
        self, txn: lmdb.Transaction, attrs: Mapping[str, AttrValue], version: Version
    ) -> IndexUpdate:
        """Index one received instance version (inside the transaction that stores its blob)."""
        study_uid = str(attrs["StudyInstanceUID"])
        series_uid = str(attrs["SeriesInstanceUID"])
        sop_uid = str(attrs["SOPInstanceUID"])
        levels = _split(attrs)
        ikey = _key(study_uid, series_uid, sop_uid)
        old = _unpack(txn.get(ikey, db=self._instance))
        if old is None:
            moved = txn.get(sop_uid.encode(), db=self._sop)
            if moved is not None:  # same SOP UID filed under another study/series: keep that home
                ikey = bytes(moved) + _SEP.encode() + sop_uid.encode()
                study_uid, series_uid = bytes(moved).decode().split(_SEP)
                old = _unpack(txn.get(ikey, db=self._instance))
        if old is not None:
            hashes = [v["h"] for v in old["v"]]
            if hashes[-1] == version.hash or (
                version.hash in hashes and version.received <= old["v"][-1]["t"]
            ):
                return IndexUpdate(study_uid, sop_uid, new_instance=False, new_version=False)
            known = version.hash in hashes
            # newest received wins retrieval: a version received again becomes current again
            old["v"] = [v for v in old["v"] if v["h"] != version.hash] + [version.to_wire()]
            old["a"] = levels.image
            txn.put(ikey, _pack(old), db=self._instance)
            self._bump_study(
                txn, study_uid, levels, 0 if known else version.size,
                new_series=False, new_instance=False,
            )  # fmt: skip
            return IndexUpdate(study_uid, sop_uid, new_instance=False, new_version=True)

        record = {"c": str(attrs["SOPClassUID"]), "a": levels.image, "v": [version.to_wire()]}
        txn.put(ikey, _pack(record), db=self._instance)
        txn.put(sop_uid.encode(), _key(study_uid, series_uid), db=self._sop)

        skey = _key(study_uid, series_uid)
        series = _unpack(txn.get(skey, db=self._series))
        new_series = series is None
        if series is None:
            series = {"a": levels.series, "n": 0}
            txn.put(series_uid.encode(), study_uid.encode(), db=self._secondary.series_uid)
        series["a"] = _merge_missing(series["a"], levels.series)
        series["n"] += 1
        txn.put(skey, _pack(series), db=self._series)
        self._bump_study(
            txn,
            study_uid,
            levels,
            version.size,
            new_series=new_series,
            new_instance=True,
            sop_class=str(attrs["SOPClassUID"]),
        )
        return IndexUpdate(study_uid, sop_uid, new_instance=True, new_version=True)

    def _bump_study(
        self,
        txn: lmdb.Transaction,
        study_uid: str,
        levels: _Levels,
        size: int,
        *,
        new_series: bool,
        new_instance: bool,
        sop_class: str = "",
    ) -> None:
        key = study_uid.encode()
        study = _unpack(txn.get(key, db=self._study))
        if study is None:
            study = {"a": {}, "s": 0, "i": 0, "b": 0, "m": [], "c": [], "t": 0.0}
            self._link_patient(txn, levels.patient, study_uid)
        old_attrs = study["a"]
        study["a"] = _merge_missing(old_attrs, {**levels.patient, **levels.study})
        self._secondary.update(txn, STUDY_INDEXES, old_attrs, study["a"], key)
        study["s"] += int(new_series)
        study["i"] += int(new_instance)
        study["b"] += size
        modality = levels.series.get("Modality")
        if isinstance(modality, str) and modality and modality not in study["m"]:
            study["m"].append(modality)
            self._secondary.put(txn, MODALITY_INDEX, modality_keys((modality,), None), key)
        elif isinstance(modality, list):  # never in ModalitiesInStudy, but SERIES level sees it
            self._secondary.put(txn, MODALITY_INDEX, modality_keys((), modality), key)
        if sop_class and sop_class not in study["c"]:
            study["c"].append(sop_class)
        study["t"] = time.time()
        txn.put(key, _pack(study), db=self._study)

    def _link_patient(
        self, txn: lmdb.Transaction, patient: Mapping[str, AttrValue], study_uid: str
    ) -> None:
        key = _patient_key(str(patient.get("PatientID", "")))
        rec = _unpack(txn.get(key, db=self._patient)) or {"a": {}, "st": []}
        old_attrs = rec["a"]
        rec["a"] = _merge_missing(old_attrs, patient)
        self._secondary.update(txn, PATIENT_INDEXES, old_attrs, rec["a"], key)
        if study_uid not in rec["st"]:
            rec["st"].append(study_uid)
        txn.put(key, _pack(rec), db=self._patient)

    def remove_study(self, txn: lmdb.Transaction, study_uid: str) -> list[tuple[str, Version]]:
        """Remove a study and everything below it (inside the caller's write transaction): its
        instance, series and study records, their secondary index entries, and the study from
        its patient (the patient goes too when it has no other study). Returns the removed
        (SOP Instance UID, version) pairs, so the caller can drop their blobs."""
        key = study_uid.encode()
        study = _unpack(txn.get(key, db=self._study))
        if study is None:
            return []
        sep = _SEP.encode()
        prefix = key + sep
        removed: list[tuple[str, Version]] = []
        rows: list[bytes] = []
        cursor = txn.cursor(db=self._instance)
        if cursor.set_range(prefix):
            for k, v in cursor:
                if not bytes(k).startswith(prefix):
                    break
                rows.append(bytes(k))
                sop = bytes(k).split(sep)[2].decode()
                removed.extend((sop, Version.from_wire(w)) for w in _unpack(v)["v"])
        for k in rows:
            txn.delete(k, db=self._instance)
            txn.delete(k.split(sep)[2], db=self._sop)
        series_rows: list[tuple[bytes, Any]] = []
        cursor = txn.cursor(db=self._series)
        if cursor.set_range(prefix):
            for k, v in cursor:
                if not bytes(k).startswith(prefix):
                    break
                series_rows.append((bytes(k), _unpack(v)))
        for k, series in series_rows:
            txn.delete(k, db=self._series)
            txn.delete(k.split(sep)[1], key, db=self._secondary.series_uid)
            modality = modality_keys((), series["a"].get("Modality"))
            self._secondary.delete(txn, MODALITY_INDEX, modality, key)
        self._secondary.delete(txn, MODALITY_INDEX, modality_keys(study["m"], None), key)
        self._secondary.update(txn, STUDY_INDEXES, study["a"], {}, key)
        txn.delete(key, db=self._study)
        # the patient it was linked to: by its PatientID, or the anonymous one when its first
        # instance had none (a PatientID seen later fills in the study, not the link)
        for pkey in dict.fromkeys((_patient_key(str(study["a"].get("PatientID", ""))), b"P")):
            patient = _unpack(txn.get(pkey, db=self._patient))
            if patient is None or study_uid not in patient["st"]:
                continue
            patient["st"] = [s for s in patient["st"] if s != study_uid]
            if patient["st"]:
                txn.put(pkey, _pack(patient), db=self._patient)
            else:
                self._secondary.update(txn, PATIENT_INDEXES, patient["a"], {}, pkey)
                txn.delete(pkey, db=self._patient)
            break
        return removed

    # --- lookups --------------------------------------------------------------------------------

    def study(self, study_uid: str) -> StudyRecord | None:
        with self._db.read() as txn:
            raw = _unpack(txn.get(study_uid.encode(), db=self._study))
        return None if raw is None else self._study_record(study_uid, raw)

    @staticmethod
    def _study_record(uid: str, raw: Mapping[str, Any]) -> StudyRecord:
        return StudyRecord(
            uid, raw["a"], raw["s"], raw["i"], raw["b"], raw["m"], raw["c"], raw["t"]
        )

    def studies(self) -> Iterator[StudyRecord]:
        """Every study, in UID order, read lazily from one snapshot (held while iterating)."""
        with self._db.read() as txn:
            for k, v in txn.cursor(db=self._study):
                yield self._study_record(bytes(k).decode(), _unpack(v))

    def instance(self, sop_uid: str) -> InstanceRecord | None:
        with self._db.read() as txn:
            home = txn.get(sop_uid.encode(), db=self._sop)
            if home is None:
                return None
            study_uid, series_uid = bytes(home).decode().split(_SEP)
            raw = _unpack(txn.get(_key(study_uid, series_uid, sop_uid), db=self._instance))
        return None if raw is None else self._instance_record(study_uid, series_uid, sop_uid, raw)

    @staticmethod
    def _instance_record(
        study: str, series: str, sop: str, raw: Mapping[str, Any]
    ) -> InstanceRecord:
        versions = tuple(Version.from_wire(v) for v in raw["v"])
        return InstanceRecord(study, series, sop, raw["c"], raw["a"], versions)

    def study_instances(
        self, study_uid: str, series_uid: str | None = None
    ) -> list[InstanceRecord]:
        """Instances of a study (or one of its series), in series then SOP UID order."""
        prefix = (
            _key(study_uid, series_uid) + _SEP.encode()
            if series_uid
            else _key(study_uid) + _SEP.encode()
        )
        out = []
        with self._db.read() as txn:
            cursor = txn.cursor(db=self._instance)
            if cursor.set_range(prefix):
                for k, v in cursor:
                    key = bytes(k)
                    if not key.startswith(prefix):
                        break
                    study, series, sop = key.decode().split(_SEP)
                    out.append(self._instance_record(study, series, sop, _unpack(v)))
        return out

    def series_of(self, study_uid: str) -> list[tuple[str, dict[str, AttrValue], int]]:
        """(series UID, attributes, instance count) of each series in a study."""
        prefix = _key(study_uid) + _SEP.encode()
        out = []
        with self._db.read() as txn:
            cursor = txn.cursor(db=self._series)
            if cursor.set_range(prefix):
                for k, v in cursor:
                    key = bytes(k)
                    if not key.startswith(prefix):
                        break
                    raw = _unpack(v)
                    out.append((key.decode().split(_SEP)[1], raw["a"], raw["n"]))
        return out

    def counts(self) -> tuple[int, int, int]:
        """(patients, studies, instances)."""
        with self._db.read() as txn:
            patients = txn.stat(self._patient)["entries"]
            studies = txn.stat(self._study)["entries"]
            instances = txn.stat(self._sop)["entries"]
        return int(patients), int(studies), int(instances)

    # --- C-FIND ---------------------------------------------------------------------------------

    def find(
        self,
        level: Level,
        query: Mapping[str, str | list[str] | None],
        cancelled: Callable[[], bool] | None = None,
    ) -> Generator[dict[str, AttrValue], None, None]:
        """Records at ``level`` whose attributes (at this level and above) match ``query``.

        ``query`` maps keywords to C-FIND match strings ("" is universal matching). Each result
        holds every keyword of the query (empty string where the archive has no value), plus
        the unique keys down to ``level``; keys below ``level`` are ignored. Candidates come
        from the indexes (``query.py``), results are produced lazily from one read snapshot
        (held until the generator ends or is closed), and the walk stops once ``cancelled()``
        returns true.
        """
        with self._db.read() as txn:
            yield from run_find(self._tables, txn, level, query, cancelled)
