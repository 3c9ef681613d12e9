"""Federation-wide QIDO-RS without sockets: what the DICOMweb service needs of the federation
(``Federation``, a narrow protocol the site implements) and how answers are merged.

A search with ``federation=true`` runs here and at every live member (over the members' mutual
TLS transfer API, never over the web port); results are merged by the UID of the searched
level, this site's own first. Which sites hold each result is said with standard attributes
(PS3.4 C.4.1.1.3.2, PS3.18 10.6.3): ``RetrieveAETitle`` (0008,0054) lists the AE titles of the
holding sites, and ``InstanceAvailability`` (0008,0056) is ``ONLINE`` when this site holds it
and ``NEARLINE`` when only other sites do (a retrieve here fetches it first).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from p2pacs.dicom import Level

__all__ = ["Federation", "FoundAt", "Merged", "SiteRows", "merge_rows"]

Row = Mapping[str, object]
_LEVEL_UID = {
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}


@dataclass(frozen=True, slots=True)
class SiteRows:
    """One site's answer to a federated search."""

    site: str  # the site's name
    ae_title: str  # the AE title its DICOM gateway answers to
    rows: Sequence[Row]


@dataclass(slots=True)
class FoundAt:
    """What the members answered (``answers``) and which of them did not (``unanswered``)."""

    answers: list[SiteRows] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)  # "site: why"


class Federation(Protocol):
    """What DICOMweb asks of the federation (the site's ``FederationNode`` behind it)."""

    async def search(
        self, level: Level, query: Mapping[str, str | list[str] | None], limit: int
    ) -> FoundAt:
        """Run the C-FIND-style ``query`` at every live member (not this site): at most
        ``limit`` rows from each."""
        ...

    async def ensure_local(self, study_uid: str) -> bool:
        """Make ``study_uid`` held here whole, fetching (verified, stored, published) what
        other sites hold; False when no other site holds it. Raises ``P2PacsError`` when
        holders exist but the fetch failed."""
        ...


@dataclass(frozen=True, slots=True)
class Merged:
    """One merged search result."""

    row: Row
    ae_titles: tuple[str, ...]  # every site holding it, this one first when it does
    local: bool


def merge_rows(level: Level, local: SiteRows, others: Iterable[SiteRows]) -> list[Merged]:
    """Merge search answers by the searched level's UID: one result per entity, the local row
    when this site holds it (else the first member's that does), all holders' AE titles in
    order. Rows without the UID are dropped (a member's malformed answer)."""
    key = _LEVEL_UID[level]
    order: list[str] = []
    rows: dict[str, Row] = {}
    holders: dict[str, list[str]] = {}
    is_local: set[str] = set()
    for answer in (local, *others):
        for row in answer.rows:
            uid = row.get(key)
            if not isinstance(uid, str) or not uid:
                continue
            if uid not in rows:
                order.append(uid)
                rows[uid] = row
                holders[uid] = []
                if answer is local:
                    is_local.add(uid)
            if answer.ae_title and answer.ae_title not in holders[uid]:
                holders[uid].append(answer.ae_title)
    return [Merged(rows[u], tuple(holders[u]), u in is_local) for u in order]
