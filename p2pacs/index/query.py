"""C-FIND over one LMDB read snapshot: choose candidates from an index, let matching decide.

A query walks the hierarchy from the most selective place it can start:
1. IMAGE level with a SOPInstanceUID list: ``ix_sop`` gives each instance's study and series;
2. SERIES/IMAGE level with a SeriesInstanceUID list: ``ix_series_uid`` gives their studies;
3. a StudyInstanceUID list: the study records themselves;
4. otherwise the secondary index (``secondary.py``) whose probes reach the fewest entries,
   counted up to ``COUNT_LIMIT`` (ties in the order of ``STUDY_INDEXES``); every other key that
   is a single value is checked against its own index before the study record is read (an
   intersection that costs one B-tree lookup per candidate);
5. no usable key: every study, in UID order.
Every candidate record is then matched by ``matching.matches`` on all the query's keys of its
level and above, exactly as a full scan would, so the index only decides what is read. Results
are produced lazily: the first answer of an unconstrained query comes after one record, memory
stays bounded, and a ``cancelled`` callable is polled while the walk reads records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lmdb
import msgpack

from p2pacs.dicom.header import LEVEL_KEYS, AttrValue, Level
from p2pacs.index.keys import Exact, Probe, probes, uid_list
from p2pacs.index.matching import matches
from p2pacs.index.secondary import (
    MODALITY_INDEX,
    PATIENT_INDEXES,
    STUDY_INDEXES,
    Secondary,
    SecondaryIndex,
)

__all__ = ["COUNT_LIMIT", "Query", "Tables", "run_find"]

Query = Mapping[str, str | list[str] | None]
COUNT_LIMIT = 1000  # index entries counted per probe when choosing where a query starts
CANCEL_EVERY = 256  # records read between polls of the cancel callable
_SEP = b"\x00"

_COMPUTED: Mapping[Level, tuple[str, ...]] = {
    Level.PATIENT: (
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ),
    Level.STUDY: (
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: ("NumberOfSeriesRelatedInstances",),
    Level.IMAGE: ("AvailableTransferSyntaxUID",),
}
_UNIQUE = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
_ORDER = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)


@dataclass(frozen=True, slots=True)
class Tables:
    """The record sub-databases a query reads, and the secondary indexes."""

    patient: Any
    study: Any
    series: Any
    instance: Any
    sop: Any
    secondary: Secondary


def _unpack(raw: Any) -> Any:
    return msgpack.unpackb(raw, raw=False)


def study_attrs(uid: str, raw: Mapping[str, Any]) -> dict[str, AttrValue]:
    """A study record's attributes with the computed STUDY-level ones."""
    return {
        **raw["a"],
        "StudyInstanceUID": uid,
        "ModalitiesInStudy": list(raw["m"]),
        "SOPClassesInStudy": list(raw["c"]),
        "NumberOfStudyRelatedSeries": str(raw["s"]),
        "NumberOfStudyRelatedInstances": str(raw["i"]),
    }


def match_level(query: Query, level: Level, attrs: Mapping[str, AttrValue]) -> bool:
    keys = LEVEL_KEYS[level] + _COMPUTED[level]
    return all(matches(kw, query[kw], attrs.get(kw)) for kw in keys if kw in query)


def respond(query: Query, attrs: Mapping[str, AttrValue], level: Level) -> dict[str, AttrValue]:
    """Every keyword of the query (empty where there is no value) plus the unique keys."""
    out: dict[str, AttrValue] = {kw: attrs.get(kw, "") for kw in query}
    for lv in _ORDER[: _ORDER.index(level) + 1]:
        kw = _UNIQUE[lv]
        if lv is not Level.PATIENT or kw in query:
            out[kw] = attrs.get(kw, "")
    return out


@dataclass(slots=True)
class _Target:
    """A candidate study, and (when a UID list chose it) the series and instances to visit."""

    uid: bytes
    raw: Any = None  # the study record, when the walk already read it
    series: dict[bytes, list[bytes] | None] | None = None


class _Find:
    def __init__(
        self,
        tables: Tables,
        txn: lmdb.Transaction,
        level: Level,
        query: Query,
        cancelled: Callable[[], bool] | None,
    ):
        self.t = tables
        self.sec = tables.secondary
        self.txn = txn
        self.level = level
        self.query = query
        self.cancelled = cancelled
        self.reads = 0

    def _stop(self) -> bool:
        """Count one record read; poll ``cancelled`` every CANCEL_EVERY reads."""
        self.reads += 1
        return self.cancelled is not None and self.reads % CANCEL_EVERY == 0 and self.cancelled()

    # --- choosing where to start ----------------------------------------------------------------

    def _usable(
        self, indexes: tuple[SecondaryIndex, ...]
    ) -> list[tuple[int, int, SecondaryIndex, list[Probe]]]:
        """(estimated entries, rank, index, probes) of every key an index can answer."""
        out = []
        for rank, ix in enumerate(indexes):
            keyword = ix.keyword
            if (
                ix is MODALITY_INDEX
                and keyword not in self.query
                and self.level
                in (
                    Level.SERIES,
                    Level.IMAGE,
                )
            ):
                keyword = "Modality"  # the series' own modality is in the study's set
            if keyword not in self.query:
                continue
            found = probes(keyword, ix.kind, self.query[keyword])
            if found is None:
                continue
            estimate = sum(self.sec.count(self.txn, ix, p, COUNT_LIMIT) for p in found)
            out.append((estimate, rank, ix, found))
        out.sort(key=lambda o: (o[0], o[1]))
        return out

    def _targets(self) -> Iterator[_Target]:
        q = self.query
        sops = uid_list("SOPInstanceUID", q.get("SOPInstanceUID"))
        if self.level is Level.IMAGE and sops is not None:
            yield from self._by_sop(sops)
            return
        series = uid_list("SeriesInstanceUID", q.get("SeriesInstanceUID"))
        if self.level in (Level.SERIES, Level.IMAGE) and series is not None:
            yield from self._by_series(series)
            return
        studies = uid_list("StudyInstanceUID", q.get("StudyInstanceUID"))
        if studies is not None:
            yield from (_Target(uid.encode()) for uid in studies)
            return
        options = self._usable((*STUDY_INDEXES, MODALITY_INDEX))
        if not options:
            for key, raw in self._all(self.t.study):
                yield _Target(key, raw)
            return
        _, _, driver, driver_probes = options[0]
        checks = [(ix, ps) for _, _, ix, ps in options[1:] if all(isinstance(p, Exact) for p in ps)]
        seen: set[bytes] = set()
        for p in driver_probes:
            for uid in self.sec.entries(self.txn, driver, p):
                if uid in seen:
                    continue
                seen.add(uid)
                if all(self._holds(ix, ps, uid) for ix, ps in checks):
                    yield _Target(uid)

    def _holds(self, ix: SecondaryIndex, found: list[Probe], uid: bytes) -> bool:
        """Is ``uid`` under one of the (single value) keys ``found`` in ``ix``?"""
        return any(self.sec.contains(self.txn, ix, p, uid) for p in found if isinstance(p, Exact))

    def _by_sop(self, sops: list[str]) -> Iterator[_Target]:
        grouped: dict[bytes, dict[bytes, list[bytes] | None]] = {}
        for sop in sops:
            home = self.txn.get(sop.encode(), db=self.t.sop)
            if home is not None:
                study, _, series = bytes(home).partition(_SEP)
                listed = grouped.setdefault(study, {}).setdefault(series, [])
                assert listed is not None
                listed.append(sop.encode())
        yield from (_Target(study, series=by_series) for study, by_series in grouped.items())

    def _by_series(self, series_uids: list[str]) -> Iterator[_Target]:
        grouped: dict[bytes, dict[bytes, list[bytes] | None]] = {}
        cursor = self.txn.cursor(db=self.sec.series_uid)
        for uid in series_uids:
            key = uid.encode()
            if cursor.set_key(key):
                for study in cursor.iternext_dup():
                    grouped.setdefault(bytes(study), {})[key] = None
        yield from (_Target(study, series=by_series) for study, by_series in grouped.items())

    # --- walking down -----------------------------------------------------------------------

    def run(self) -> Iterator[dict[str, AttrValue]]:
        if self.level is Level.PATIENT:
            yield from self._patients()
            return
        for target in self._targets():
            if self._stop():
                return
            raw = target.raw
            if raw is None:
                raw = self.txn.get(target.uid, db=self.t.study)
            if raw is None:
                continue
            attrs = study_attrs(target.uid.decode(), _unpack(raw))
            if not (
                match_level(self.query, Level.PATIENT, attrs)
                and match_level(self.query, Level.STUDY, attrs)
            ):
                continue
            if self.level is Level.STUDY:
                yield respond(self.query, attrs, Level.STUDY)
                continue
            for found in self._series(target, attrs):
                if found is None:
                    return  # cancelled
                yield found

    def _all(self, db: Any) -> Iterator[tuple[bytes, Any]]:
        for k, v in self.txn.cursor(db=db):
            yield bytes(k), v

    def _prefix(self, db: Any, prefix: bytes) -> Iterator[tuple[bytes, Any]]:
        cursor = self.txn.cursor(db=db)
        if cursor.set_range(prefix):
            for k, v in cursor:
                key = bytes(k)
                if not key.startswith(prefix):
                    return
                yield key, v

    def _series(
        self, target: _Target, study: dict[str, AttrValue]
    ) -> Iterator[dict[str, AttrValue] | None]:
        """Matching series (or their instances) of a study; None when cancelled."""
        head = target.uid + _SEP
        rows: Iterator[tuple[bytes, Any]]
        if target.series is None:
            rows = self._prefix(self.t.series, head)
        else:
            rows = (
                (head + s, raw)
                for s in target.series
                if (raw := self.txn.get(head + s, db=self.t.series)) is not None
            )
        for key, raw in rows:
            if self._stop():
                yield None
                return
            series_uid = key[len(head) :]
            rec = _unpack(raw)
            attrs: dict[str, AttrValue] = {
                **study,
                **rec["a"],
                "SeriesInstanceUID": series_uid.decode(),
                "NumberOfSeriesRelatedInstances": str(rec["n"]),
            }
            if not match_level(self.query, Level.SERIES, attrs):
                continue
            if self.level is Level.SERIES:
                yield respond(self.query, attrs, Level.SERIES)
                continue
            sops = None if target.series is None else target.series.get(series_uid)
            yield from self._instances(key + _SEP, sops, attrs)

    def _instances(
        self, head: bytes, sops: list[bytes] | None, series: dict[str, AttrValue]
    ) -> Iterator[dict[str, AttrValue] | None]:
        rows: Iterator[tuple[bytes, Any]]
        if sops is None:
            rows = self._prefix(self.t.instance, head)
        else:
            rows = (
                (head + s, raw)
                for s in sops
                if (raw := self.txn.get(head + s, db=self.t.instance)) is not None
            )
        for key, raw in rows:
            if self._stop():
                yield None
                return
            rec = _unpack(raw)
            attrs: dict[str, AttrValue] = {
                **series,
                **rec["a"],
                "SOPInstanceUID": key[len(head) :].decode(),
                "SOPClassUID": rec["c"],
                "AvailableTransferSyntaxUID": rec["v"][-1]["ts"],
            }
            if match_level(self.query, Level.IMAGE, attrs):
                yield respond(self.query, attrs, Level.IMAGE)

    def _patients(self) -> Iterator[dict[str, AttrValue]]:
        options = self._usable(PATIENT_INDEXES)
        keys: Iterator[tuple[bytes, Any]]
        if options:
            _, _, ix, found = options[0]
            keys = self._patient_rows(ix, found)
        else:
            keys = self._all(self.t.patient)
        for _, raw in keys:
            if self._stop():
                return
            rec = _unpack(raw)
            attrs: dict[str, AttrValue] = dict(rec["a"])
            studies = [
                _unpack(s)
                for uid in rec["st"]
                if (s := self.txn.get(uid.encode(), db=self.t.study)) is not None
            ]
            attrs["NumberOfPatientRelatedStudies"] = str(len(studies))
            attrs["NumberOfPatientRelatedSeries"] = str(sum(s["s"] for s in studies))
            attrs["NumberOfPatientRelatedInstances"] = str(sum(s["i"] for s in studies))
            if match_level(self.query, Level.PATIENT, attrs):
                yield respond(self.query, attrs, Level.PATIENT)

    def _patient_rows(self, ix: SecondaryIndex, found: list[Probe]) -> Iterator[tuple[bytes, Any]]:
        seen: set[bytes] = set()
        for p in found:
            for key in self.sec.entries(self.txn, ix, p):
                if key not in seen:
                    seen.add(key)
                    raw = self.txn.get(key, db=self.t.patient)
                    if raw is not None:
                        yield key, raw


def run_find(
    tables: Tables,
    txn: lmdb.Transaction,
    level: Level,
    query: Query,
    cancelled: Callable[[], bool] | None = None,
) -> Iterator[dict[str, AttrValue]]:
    """Matches of ``query`` at ``level``, read lazily from ``txn`` (see the module docstring)."""
    return _Find(tables, txn, level, query, cancelled).run()
