"""Site catalogues and the small records a site publishes on the DHT.

A catalogue lists every study a site holds with the hash of its manifest (one ``CatalogueEntry``
each); it is kept as a Merkle tree of blobs (``cattree``) that the other members copy, so a
wiped site that has only its identity can find out what it held (``site/<id>`` record -> tree
root -> entries -> manifests -> blobs). DHT values stay tiny (a hash and a few numbers): lists
never go on the DHT. Pure: no I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pacs.errors import IntegrityError

__all__ = [
    "SITE_NAMESPACE",
    "STUDY_NAMESPACE",
    "CatalogueEntry",
    "SiteRecord",
    "StudyHolding",
    "newest_first",
]

STUDY_NAMESPACE = "study"  # key: study UID; one entry per holding site
SITE_NAMESPACE = "site"  # key: site_id hex; the site's own entry


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


def newest_first(entries: Iterable[CatalogueEntry]) -> list[CatalogueEntry]:
    """Recovery order: the last days' studies first, then the archive of years."""
    return sorted(entries, key=lambda e: (e.study_date, e.updated), reverse=True)


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
