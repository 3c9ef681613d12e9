"""Federation-wide search and read-through for DICOMweb (``p2pacs.dicomweb.Federation``).

A search is sent to every live member as ``POST /v1/search`` on the transfer API (mutual TLS:
patient data in queries and answers never leaves it); each member answers from its own index
only, at most ``limit`` rows. A member that does not answer within ``FIND_TIMEOUT`` is named
in the result, not waited for. A WADO-RS retrieve of a study not held here fetches it first
with ``FederationNode.fetch_study`` (verified, stored, published), as C-MOVE's read-through
does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from p2pacs.archive import Archive
from p2pacs.dicom import Level
from p2pacs.dicomweb.federated import FoundAt, SiteRows
from p2pacs.errors import FederationError

if TYPE_CHECKING:
    from p2pacs.federation.node import FederationNode

__all__ = ["FederatedSearch", "FindRequest", "find_rows", "parse_find"]

log = logging.getLogger(__name__)

FIND_TIMEOUT = 15.0  # seconds a federated search waits for one member's answer
MAX_FIND_ROWS = 10_000  # rows one member sends back at most (QIDO-RS's own MAX_LIMIT)
_LEVELS = {lv.value: lv for lv in (Level.STUDY, Level.SERIES, Level.IMAGE)}

Query = dict[str, str | list[str] | None]
FindRequest = tuple[Level, Query, int]


def parse_find(body: Any) -> FindRequest:
    """``(level, query, limit)`` from a ``/v1/search`` body; ``ValueError`` saying what is wrong."""
    if not isinstance(body, dict):
        raise ValueError('expected {"level": ..., "query": {...}, "limit": N}')
    level = _LEVELS.get(str(body.get("level", "")))
    if level is None:
        raise ValueError(f"level must be one of {', '.join(_LEVELS)}")
    raw = body.get("query")
    if not isinstance(raw, dict) or len(raw) > 200:
        raise ValueError("query must be an object of at most 200 keywords")
    query: Query = {}
    for key, value in raw.items():
        ok = value is None or isinstance(value, str)
        ok = ok or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        if not isinstance(key, str) or not ok:
            raise ValueError(f"query value of {str(key)[:64]!r} must be text, a list or null")
        query[key] = value
    limit = body.get("limit")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= MAX_FIND_ROWS:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_FIND_ROWS}")
    return level, query, limit


def find_rows(
    archive: Archive, level: Level, query: Mapping[str, Any], limit: int
) -> list[dict[str, Any]]:
    """At most ``limit`` index rows matching ``query`` (a worker thread: reads the index)."""
    out: list[dict[str, Any]] = []
    rows = archive.index.find(level, query)
    try:
        for row in rows:
            if len(out) >= limit:
                break
            out.append(row)
    finally:
        rows.close()
    return out


class FederatedSearch:
    """``p2pacs.dicomweb.Federation`` over a running ``FederationNode``."""

    def __init__(self, fed: FederationNode):
        self.fed = fed

    async def search(self, level: Level, query: Mapping[str, Any], limit: int) -> FoundAt:
        fed = self.fed
        client = fed.client
        found = FoundAt()
        if client is None:
            return found
        members = fed.live_members()
        body = {"level": level.value, "query": dict(query), "limit": min(limit, MAX_FIND_ROWS)}

        async def one(peer: Any) -> Any:
            return await asyncio.wait_for(
                client.request_json(peer, "POST", "/v1/search", json=body), FIND_TIMEOUT
            )

        answers = await asyncio.gather(
            *(one(fed.peer_of(m)) for m in members), return_exceptions=True
        )
        for member, answer in zip(members, answers, strict=True):
            if isinstance(answer, TimeoutError):
                why = "no answer in time"
            elif isinstance(answer, BaseException):
                why = str(answer) or type(answer).__name__
            else:
                try:
                    found.answers.append(_site_rows(member.name, answer))
                    continue
                except ValueError as exc:
                    why = str(exc)
            log.info("federated search: %s did not answer: %s", member.name, why)
            found.unanswered.append(f"{member.name}: {why}"[:200])
        return found

    async def ensure_local(self, study_uid: str) -> bool:
        fed = self.fed
        if await asyncio.to_thread(fed.held, study_uid):
            return True
        pending = fed.queued(study_uid)
        extra = (pending.manifest_hash,) if pending else ()
        if not extra and not [h for h in await fed.holders(study_uid) if h.peer is not None]:
            return False
        log.info("DICOMweb read-through: fetching study %s from peers", study_uid)
        fetched = await fed.fetch_study(study_uid, extra_manifests=extra)
        if not fetched.complete:
            first = next(iter(fetched.failed.values()), "")
            raise FederationError(
                f"study {study_uid} could not be fetched whole from the sites holding it: "
                f"{len(fetched.failed)} failed ({first[:200]})"
            )
        return True


def _site_rows(name: str, answer: Any) -> SiteRows:
    """A member's ``/v1/search`` answer, checked; ``ValueError`` when malformed."""
    if not isinstance(answer, dict) or not isinstance(answer.get("rows"), list):
        raise ValueError("malformed answer")
    rows = [r for r in answer["rows"] if isinstance(r, dict)]
    return SiteRows(name, str(answer.get("ae_title", "")), rows)
