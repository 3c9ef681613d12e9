"""Whether a site's archive knows its own past: what keeps a wiped site from publishing an
empty catalogue over the one the federation holds for it.

A site may publish ``site/<id>`` (and so its catalogue) only once its archive has a *baseline*:
positive evidence of what it held before. The evidence is local (``enrolled``: the site identity
was issued into this archive, so it never held anything elsewhere; ``existing``: the archive
already held studies when this state was first recorded, i.e. a site upgraded in place;
``new-site``: the operator said so at first start) or remote (``record``: the site's own signed
``site/<id>`` record, read back from the DHT or from a member's copy). The absence of a record
is never evidence: a DHT record lapses after an outage longer than its TTL, and a site restarted
with no peer reachable finds nothing at all.

An archive without a baseline is *awaiting*: it serves DICOM and ingests, but does not publish
its catalogue until recovery has found its last record. The state lives in the site database, so
a wipe (which loses the database) always yields an awaiting archive.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import msgpack

from p2pacs.store import SiteDB

__all__ = ["Baseline", "Evidence", "mark_baseline", "read_baseline", "settle_at_start"]

_TABLE = "fed_state"
_KEY = b"baseline"


class Evidence(StrEnum):
    ENROLLED = "enrolled"
    EXISTING = "existing"
    NEW_SITE = "new-site"
    RECORD = "record"
    AWAITING = "awaiting"  # no evidence yet: recovery must find the site's last record


@dataclass(frozen=True, slots=True)
class Baseline:
    evidence: Evidence
    since: float  # unix time it was recorded
    detail: str = ""

    @property
    def known(self) -> bool:
        return self.evidence is not Evidence.AWAITING


def read_baseline(db: SiteDB) -> Baseline | None:
    table = db.db(_TABLE)  # opened before the read transaction, as LMDB requires
    with db.read() as txn:
        raw = txn.get(_KEY, db=table)
    if raw is None:
        return None
    evidence, since, detail = msgpack.unpackb(raw, raw=False)
    return Baseline(Evidence(evidence), float(since), str(detail))


def mark_baseline(db: SiteDB, evidence: Evidence, detail: str = "") -> Baseline:
    """Record the state durably (the write is committed and fsynced before this returns)."""
    baseline = Baseline(evidence, time.time(), detail)
    raw = msgpack.packb([baseline.evidence.value, baseline.since, detail], use_bin_type=True)
    table = db.db(_TABLE)
    db.write(lambda txn: txn.put(_KEY, raw, db=table))
    return baseline


def settle_at_start(db: SiteDB, *, holds_studies: bool, new_site: bool = False) -> Baseline:
    """The archive's state before it serves anything (a wiped archive is awaiting from its first
    C-STORE on, so studies ingested meanwhile never pass for the site's past).

    ``new_site``: the operator's explicit word that this site never held anything; honoured
    only for an archive that holds nothing yet."""
    current = read_baseline(db)
    if current is not None and (current.known or not new_site or holds_studies):
        return current
    if new_site and not holds_studies:
        return mark_baseline(db, Evidence.NEW_SITE, "serve --new-site")
    if holds_studies:
        return mark_baseline(db, Evidence.EXISTING, "studies were held when first recorded")
    return mark_baseline(db, Evidence.AWAITING)
