"""The member sites this site knows: where they are, what they hold, whether they answer.

Liveness comes from p2pacs's own heartbeats (mDNS never reports a partition and DHT contacts
linger), so a site is "up" only while it has answered within ``down_after`` seconds. The table is
kept in the site database so a restarted site still knows the federation, including the last
catalogue of a member that is down: that is what lets the survivors restore its studies.

Beside it, the table keeps each member's latest *signed* ``site/<id>`` record exactly as the
member signed it, for as long as the member exists rather than for the record's TTL: a site
wiped after an outage longer than the TTL reads its own last record back from these copies
(``p2pacs.federation.continuity``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import msgpack

from p2pacs.federation.catalogue import SiteRecord
from p2pacs.store import SiteDB

__all__ = ["ClockVerdict", "Member", "MemberTable", "clock_verdict", "heartbeat_interval"]

SEEN_PERSIST = 30.0  # seconds between writes of a member's last_seen (heartbeats are ~1 s)


HEARTBEATS_TO_DOWN = 5  # missed heartbeats before a member is down (two make it suspect)


def heartbeat_interval(down_after: float) -> float:
    """Seconds between heartbeats: ``down_after`` spans five of them (0.5 s to 5 s)."""
    return max(0.5, min(5.0, down_after / HEARTBEATS_TO_DOWN))


@dataclass(frozen=True, slots=True)
class ClockVerdict:
    """How this site's clock compares with its live members' (from heartbeat round trips)."""

    offset: float | None  # seconds the members' clocks are ahead of ours (median); None: no data
    members: int  # how many members were measured
    off: bool  # |offset| beyond the DHT replay window: datagrams to and from here are dropped


def clock_verdict(offsets: list[float], window: float) -> ClockVerdict:
    """The low median of the members' offsets: one member with a wrong clock does not make ours
    look wrong, and with two sites either may be the one to fix (both are then told)."""
    if not offsets:
        return ClockVerdict(None, 0, False)
    ordered = sorted(offsets, key=abs)
    middle = ordered[(len(ordered) - 1) // 2]
    return ClockVerdict(middle, len(offsets), abs(middle) > window)


@dataclass(frozen=True, slots=True)
class Member:
    site_id: bytes
    record: SiteRecord
    last_seen: float  # unix time of the last answer; 0 if never
    first_seen: float

    @property
    def name(self) -> str:
        return self.record.name

    def is_up(self, down_after: float, now: float | None = None) -> bool:
        """Live: answered within ``down_after`` (up or only suspected)."""
        return (now if now is not None else time.time()) - self.last_seen < down_after

    def state(self, down_after: float, now: float | None = None) -> str:
        """``up``; ``suspect`` after two missed heartbeats (still live: placement does not
        move for one slow answer, so copies don't flap); ``down`` after ``down_after``."""
        age = (now if now is not None else time.time()) - self.last_seen
        if age >= down_after:
            return "down"
        return "suspect" if age >= 2 * heartbeat_interval(down_after) else "up"


class MemberTable:
    """Members by site_id, persisted in the ``fed_members`` sub-database."""

    def __init__(self, db: SiteDB, own_id: bytes):
        self._db = db
        self._table = db.db("fed_members")
        self.own_id = own_id
        self._cache: dict[bytes, Member] = {}
        self._persisted: dict[bytes, float] = {}  # last_seen as last written
        self._signed_table = db.db("fed_site_records")
        self._signed: dict[bytes, tuple[int, bytes]] = {}  # site_id -> (seq, signed record)
        with db.read() as txn:
            for key, raw in txn.cursor(db=self._signed_table):
                seq, record = msgpack.unpackb(raw, raw=False)
                self._signed[bytes(key)] = (int(seq), bytes(record))
            for key, raw in txn.cursor(db=self._table):
                rec, last_seen, first_seen = msgpack.unpackb(raw, raw=False)
                self._cache[bytes(key)] = Member(
                    bytes(key), SiteRecord.decode(rec), float(last_seen), float(first_seen)
                )

    def __iter__(self) -> Iterator[Member]:
        return iter(list(self._cache.values()))

    def get(self, site_id: bytes) -> Member | None:
        return self._cache.get(site_id)

    def upsert(self, site_id: bytes, record: SiteRecord, *, seen: bool) -> Member:
        """Record what a member published; ``seen`` when it has just answered us."""
        if site_id == self.own_id:
            raise ValueError("a site is not its own member")
        now = time.time()
        old = self._cache.get(site_id)
        member = Member(
            site_id,
            record,
            now if seen else (old.last_seen if old else 0.0),
            old.first_seen if old else now,
        )
        if old is None or old.record != member.record:
            self._save(member)
        elif member.last_seen - old.last_seen > 0:
            self._touch(member)
        return member

    def mark_seen(self, site_id: bytes) -> None:
        old = self._cache.get(site_id)
        if old is not None:
            self._touch(replace(old, last_seen=time.time()))

    def _touch(self, member: Member) -> None:
        """A new last_seen: kept in memory, written at most every SEEN_PERSIST seconds."""
        self._cache[member.site_id] = member
        if member.last_seen - self._persisted.get(member.site_id, 0.0) > SEEN_PERSIST:
            self._save(member)

    def signed_record(self, site_id: bytes) -> bytes | None:
        """A member's latest signed ``site/<id>`` record as it signed it (None if never seen)."""
        kept = self._signed.get(site_id)
        return kept[1] if kept else None

    def is_kept(self, site_id: bytes, record: bytes) -> bool:
        kept = self._signed.get(site_id)
        return kept is not None and kept[1] == record

    def keep_signed(self, site_id: bytes, seq: int, record: bytes) -> bool:
        """Keep a verified signed record if it is newer than the one kept; True if it was."""
        kept = self._signed.get(site_id)
        if kept is not None and kept[0] >= seq:
            return False
        self._signed[site_id] = (seq, record)
        raw = msgpack.packb([seq, record], use_bin_type=True)
        table = self._signed_table
        self._db.submit(lambda txn: txn.put(site_id, raw, db=table))
        return True

    def up(self, down_after: float) -> list[Member]:
        now = time.time()
        return [m for m in self._cache.values() if m.is_up(down_after, now)]

    def _save(self, member: Member) -> None:
        self._cache[member.site_id] = member
        self._persisted[member.site_id] = member.last_seen
        raw = msgpack.packb(
            [member.record.encode(), member.last_seen, member.first_seen], use_bin_type=True
        )

        def job(txn: object) -> None:
            txn.put(member.site_id, raw, db=self._table)  # type: ignore[attr-defined]

        self._db.submit(job)
