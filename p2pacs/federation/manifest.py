"""Study manifests: what one site holds of a study, as a canonical, hash-addressed blob.

A manifest lists every stored version of every instance (blob hash, size, transfer syntax, the
original file meta prefix and arrival time), so a site that fetches it can rebuild the study
byte for byte, index included, from blobs alone. The encoding is canonical (sorted, msgpack), so
two sites holding the same content publish the same manifest hash. Pure: no I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pacs.errors import IntegrityError
from p2pacs.index import InstanceRecord
from p2pacs.store import hash_bytes

__all__ = ["MANIFEST_VERSION", "Manifest", "ManifestEntry", "build_manifest"]

MANIFEST_VERSION = 1


@dataclass(frozen=True, slots=True, order=True)
class ManifestEntry:
    """One stored version of one instance."""

    series_uid: str
    sop_uid: str
    received: float
    hash: str
    sop_class_uid: str
    size: int
    transfer_syntax: str
    prefix: bytes

    def to_wire(self) -> list[Any]:
        return [
            self.series_uid,
            self.sop_uid,
            self.received,
            self.hash,
            self.sop_class_uid,
            self.size,
            self.transfer_syntax,
            self.prefix,
        ]

    @classmethod
    def from_wire(cls, raw: Any) -> ManifestEntry:
        series, sop, received, h, sop_class, size, ts, prefix = raw
        entry = cls(
            str(series), str(sop), float(received), str(h), str(sop_class), int(size), str(ts),
            bytes(prefix),
        )  # fmt: skip
        if len(entry.hash) != 64 or entry.size < 0:
            raise ValueError(f"bad entry for {entry.sop_uid}")
        return entry


@dataclass(frozen=True, slots=True)
class Manifest:
    """The versions of a study's instances held at one site, sorted canonically."""

    study_uid: str
    entries: tuple[ManifestEntry, ...]

    def encode(self) -> bytes:
        body = [MANIFEST_VERSION, self.study_uid, [e.to_wire() for e in sorted(self.entries)]]
        return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]

    @property
    def hash(self) -> str:
        return hash_bytes(self.encode())

    @classmethod
    def decode(cls, data: bytes, expected_hash: str | None = None) -> Manifest:
        """Parse a manifest blob; with ``expected_hash`` the bytes are checked first."""
        if expected_hash is not None and hash_bytes(data) != expected_hash:
            raise IntegrityError(f"manifest bytes do not match {expected_hash}")
        try:
            version, study_uid, raw_entries = msgpack.unpackb(data, raw=False)
            if version != MANIFEST_VERSION:
                raise ValueError(f"unknown manifest version {version!r}")
            entries = tuple(sorted(ManifestEntry.from_wire(e) for e in raw_entries))
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"malformed study manifest: {exc}") from exc
        return cls(str(study_uid), entries)

    @property
    def instances(self) -> int:
        return len({e.sop_uid for e in self.entries})

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def blob_sizes(self) -> dict[str, int]:
        """Blob hash -> size of every version (a blob shared by two instances appears once)."""
        return {e.hash: e.size for e in self.entries}

    def covers(self, other: Manifest) -> bool:
        """Whether this manifest holds every version ``other`` lists."""
        mine = {(e.sop_uid, e.hash) for e in self.entries}
        return all((e.sop_uid, e.hash) in mine for e in other.entries)


def build_manifest(study_uid: str, records: Iterable[InstanceRecord]) -> Manifest:
    """The manifest of ``records`` (all instances of one study held here)."""
    entries = [
        ManifestEntry(
            rec.series_uid,
            rec.sop_uid,
            v.received,
            v.hash,
            rec.sop_class_uid,
            v.size,
            v.transfer_syntax,
            v.prefix,
        )
        for rec in records
        for v in rec.versions
    ]
    return Manifest(study_uid, tuple(sorted(entries)))
