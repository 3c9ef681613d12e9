"""Where a study lives: rendezvous (highest-random-weight) hashing over live member sites.

Every site computes the same ranking from the study UID and the set of live sites alone, so no
coordinator is needed; when a site disappears only the studies it held move, one rank down
(Thaler & Ravishankar, "Using name-based mappings to increase hit rates", 1998). Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import blake3

__all__ = [
    "RepairPlan",
    "likely_holders_first",
    "placement",
    "plan_repairs",
    "plan_trims",
    "rank",
    "repairer",
    "trimmer",
]


def _score(study_uid: str, site_id: bytes) -> bytes:
    return blake3.blake3(site_id + b"\0" + study_uid.encode()).digest()


def rank(study_uid: str, sites: Iterable[bytes]) -> list[bytes]:
    """All ``sites`` ordered by preference for ``study_uid`` (highest weight first)."""
    return sorted(set(sites), key=lambda s: _score(study_uid, s), reverse=True)


def placement(study_uid: str, live: Iterable[bytes], replication: int) -> list[bytes]:
    """The ``replication`` live sites that should hold ``study_uid``."""
    return rank(study_uid, live)[: max(replication, 0)]


def likely_holders_first(
    study_uids: Iterable[str], members: Iterable[bytes], me: bytes, replication: int
) -> list[bytes]:
    """``members`` ordered so that the ones placement puts beside ``me`` for the first studies
    come first (in the order those studies need them), the rest after in their given order.

    A wiped site copies its members' trees in this order to learn who holds the studies it
    fetches first: placement is only a guess at where a study is (membership changes move
    studies), so every member is still copied; the guess only decides who goes first."""
    others = list(dict.fromkeys(m for m in members if m != me))
    out: dict[bytes, None] = {}
    for uid in study_uids:
        for site in rank(uid, [*others, me])[: max(replication, 1)]:
            if site != me:
                out.setdefault(site)
    return [*out, *(m for m in others if m not in out)]


def repairer(study_uid: str, live_holders: Iterable[bytes]) -> bytes | None:
    """The one live holder that acts to restore R for this study, so repairs don't stampede."""
    ranked = rank(study_uid, live_holders)
    return ranked[0] if ranked else None


@dataclass(frozen=True, slots=True)
class RepairPlan:
    under_replicated: list[str]  # studies with fewer than R live holders
    pull: list[str]  # studies this site should copy now
    notify: dict[bytes, list[str]]  # site_id -> studies it should copy (we are the repairer)


def plan_repairs(
    holders: Mapping[str, set[bytes]],
    live: set[bytes],
    me: bytes,
    replication: int,
    incomplete: Mapping[str, set[bytes]] | None = None,
) -> RepairPlan:
    """Pure decision of one anti-entropy pass.

    ``holders`` maps each study to the sites holding all of it; ``incomplete`` to the sites
    holding only part of it (a copy taken while the study was still arriving), which complete
    their copy whatever the count, and do not count towards R meanwhile."""
    under: list[str] = []
    pull: list[str] = []
    notify: dict[bytes, list[str]] = {}
    partial = incomplete or {}
    for study in sorted(set(holders) | set(partial)):
        sites = holders.get(study, set())
        if me in partial.get(study, set()) and me in live:
            pull.append(study)
        live_holders = sites & live
        if len(live_holders) >= replication:
            continue
        under.append(study)
        if not live_holders:  # every copy is on a site that is down: wait for one to return
            continue
        need = replication - len(live_holders)
        targets = rank(study, live - sites)[:need]
        if me in targets and study not in pull:
            pull.append(study)
        if live_holders and repairer(study, live_holders) == me:
            for t in targets:
                if t != me:
                    notify.setdefault(t, []).append(study)
    return RepairPlan(under, pull, notify)


def trimmer(
    study_uid: str, live_whole: Iterable[bytes], live: Iterable[bytes], replication: int
) -> bytes | None:
    """The one holder that may drop its copy of ``study_uid`` now, or None.

    Among the live sites holding the study whole, those outside its placement are surplus; the
    one ranked *last* (rendezvous order) is the trimmer, and only while more than
    ``replication`` live whole copies exist. One at a time per study is what keeps R: were every
    surplus holder to drop at once, each counting the others among "the R other copies", fewer
    than R could remain. With one trimmer, the others wait until its new catalogue shows the
    copy gone; a site whose view is stale still sees the trimmer holding (and so still names it,
    not itself), and a site that has not yet seen a newer holder counts fewer copies, never
    more. Every site computes the same answer from the same view, with no coordination."""
    whole = set(live_whole)
    if len(whole) <= replication:
        return None
    targets = set(placement(study_uid, live, replication))
    surplus = [s for s in rank(study_uid, whole) if s not in targets]
    return surplus[-1] if surplus else None


def plan_trims(
    holders: Mapping[str, set[bytes]],
    live: set[bytes],
    me: bytes,
    replication: int,
    incomplete: Mapping[str, set[bytes]] | None = None,
) -> list[str]:
    """The studies this site may drop, as far as who holds what decides it (the grace period
    and the local guards are the caller's).

    ``holders``/``incomplete`` as for ``plan_repairs``. A study qualifies when this site holds
    it whole, is not among its ``replication`` placement targets over ``live``, at least
    ``replication`` other live sites hold it whole (so dropping never leaves fewer than R, nor
    the last copies), no holder's copy is still incomplete (a copy being completed may be a
    target's), and this site is the study's ``trimmer``."""
    out: list[str] = []
    partial = incomplete or {}
    for study in sorted(holders):
        whole = holders[study] & live
        if me not in whole or partial.get(study, set()) & live:
            continue
        if len(whole - {me}) < replication:
            continue
        if trimmer(study, whole, live, replication) == me:
            out.append(study)
    return out
