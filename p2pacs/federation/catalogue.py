"""Site catalogues and the small records a site publishes on the DHT.

A catalogue lists every study a site holds with the hash of its manifest; it is a blob that the
other members keep a copy of, so a wiped site that has only its identity can find out what it
held (``site/<id>`` record -> catalogue hash -> catalogue -> manifests -> blobs). DHT values stay
tiny (a hash and a few numbers): lists never go on the DHT. Pure: no I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pacs.errors import IntegrityError
from p2pacs.store import hash_bytes

__all__ = [
    "SITE_NAMESPACE",
    "STUDY_NAMESPACE",
    "Catalogue",
    "CatalogueEntry",
    "SiteRecord",
    "StudyHolding",
]

STUDY_NAMESPACE = "study"  # key: study UID; one entry per holding site
SITE_NAMESPACE = "site"  # key: site_id hex; the site's own entry

_CATALOGUE_VERSION = 1


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True, order=True)
class CatalogueEntry:
    study_uid: str
    manifest_hash: str
    study_date: str  # DICOM DA, "" when unknown; recovery restores the newest studies first
    instances: int
    bytes: int
    updated: float


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Every study one site holds."""

    site_id: str  # hex
    entries: tuple[CatalogueEntry, ...]

    def encode(self) -> bytes:
        rows = [
            [e.study_uid, e.manifest_hash, e.study_date, e.instances, e.bytes, e.updated]
            for e in sorted(self.entries)
        ]
        return _pack([_CATALOGUE_VERSION, self.site_id, rows])

    @property
    def hash(self) -> str:
        return hash_bytes(self.encode())

    @classmethod
    def decode(cls, data: bytes, expected_hash: str | None = None) -> Catalogue:
        if expected_hash is not None and hash_bytes(data) != expected_hash:
            raise IntegrityError(f"catalogue bytes do not match {expected_hash}")
        try:
            version, site_id, rows = msgpack.unpackb(data, raw=False)
            if version != _CATALOGUE_VERSION:
                raise ValueError(f"unknown catalogue version {version!r}")
            entries = tuple(
                sorted(
                    CatalogueEntry(str(s), str(m), str(d), int(n), int(b), float(t))
                    for s, m, d, n, b, t in rows
                )
            )
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"malformed catalogue: {exc}") from exc
        return cls(str(site_id), entries)

    def newest_first(self) -> list[CatalogueEntry]:
        """Recovery order: the last days' studies first, then the archive of years."""
        return sorted(self.entries, key=lambda e: (e.study_date, e.updated), reverse=True)

    @classmethod
    def of(cls, site_id: str, entries: Iterable[CatalogueEntry]) -> Catalogue:
        return cls(site_id, tuple(sorted(entries)))


@dataclass(frozen=True, slots=True)
class StudyHolding:
    """Value of a ``study/<uid>`` entry: one site holds this manifest of the study."""

    manifest_hash: str
    instances: int
    size: int  # bytes of every version listed

    def encode(self) -> bytes:
        return _pack([self.manifest_hash, self.instances, self.size])

    @classmethod
    def decode(cls, data: bytes) -> StudyHolding:
        try:
            m, n, b = msgpack.unpackb(data, raw=False)
            return cls(str(m), int(n), int(b))
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"malformed study record: {exc}") from exc


@dataclass(frozen=True, slots=True)
class SiteRecord:
    """Value of a ``site/<id>`` entry: where to reach a site and what it holds."""

    name: str
    host: str
    transfer_port: int
    dht_port: int
    catalogue_hash: str  # "" before the first study
    studies: int
    started: float  # when this run of the site began

    def encode(self) -> bytes:
        return _pack(
            [
                self.name,
                self.host,
                self.transfer_port,
                self.dht_port,
                self.catalogue_hash,
                self.studies,
                self.started,
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> SiteRecord:
        try:
            name, host, tport, dport, cat, studies, started = msgpack.unpackb(data, raw=False)
            return cls(str(name), str(host), int(tport), int(dport), str(cat), int(studies),
                       float(started))  # fmt: skip
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"malformed site record: {exc}") from exc
