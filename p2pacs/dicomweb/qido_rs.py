"""QIDO-RS routes (PS3.18 10.6): searches of this site's index, or of the whole federation
with ``federation=true``. Query parsing and DICOM JSON are pure (qido.py, federated.py); the
index is read on a worker thread."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from p2pacs.archive import Archive
from p2pacs.dicom import Level
from p2pacs.dicomweb import qido, shared
from p2pacs.dicomweb.federated import Federation, SiteRows, merge_rows
from p2pacs.dicomweb.wado import DICOM_JSON, wants_json
from p2pacs.errors import P2PacsError

__all__ = ["QidoRS", "search_response"]

log = logging.getLogger(__name__)


def search_response(results: list[dict[str, Any]], warnings: list[str]) -> web.Response:
    """A QIDO-RS answer: 204 when empty; warnings as ``Warning: 299`` (RFC 7234 5.5)."""
    headers = {}
    if warnings:
        # quoted-string text: printable ASCII, no quote (a member's error message may hold any)
        texts = ("".join(c if " " <= c <= "~" and c != '"' else "?" for c in w) for w in warnings)
        headers["Warning"] = ", ".join(f'299 p2pacs "{t}"' for t in texts)
    if not results:
        return web.Response(status=204, headers=headers)
    return web.Response(body=json.dumps(results).encode(), content_type=DICOM_JSON, headers=headers)


class QidoRS:
    """The search handler; one per application."""

    def __init__(self, archive: Archive, federation: Federation | None, ae_title: str):
        self.archive = archive
        self.federation = federation
        self.ae_title = ae_title

    async def search(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.route.name or ""
        level = {"studies": Level.STUDY, "series": Level.SERIES}.get(
            name.rsplit("_", 1)[-1], Level.IMAGE
        )
        shared.check_uids(request.match_info)
        if not wants_json(request.headers.get("Accept")):
            return shared.text(406, f"search results are served as {DICOM_JSON} only")
        fixed = {}
        if "study" in request.match_info:
            fixed["StudyInstanceUID"] = request.match_info["study"]
        if "series" in request.match_info:
            fixed["SeriesInstanceUID"] = request.match_info["series"]
        try:
            query = qido.parse_query(level, request.query.items(), fixed)
        except qido.QidoError as exc:
            return shared.text(400, str(exc))
        base = shared.base(request)
        if query.federation and self.federation is not None:
            return await self._search_federation(level, query, base)
        if query.federation:
            query.warnings.append("this site is in no federation: its own results only")

        def run() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            rows = self.archive.index.find(level, query.index_query())
            try:
                for i, row in enumerate(rows):
                    if i < query.offset:
                        continue
                    if len(out) >= query.limit:  # PS3.18 8.3.4.4: say more results exist
                        query.warnings.append("there are additional results to request")
                        break
                    out.append(qido.row_to_json(query.keys, row, shared.url_of(base, level, row)))
            finally:
                rows.close()
            return out

        try:
            results = await asyncio.to_thread(run)
        except P2PacsError as exc:
            log.error("QIDO-RS failed: %s", exc)
            return shared.text(500, f"the index could not be read: {exc}")
        return search_response(results, query.warnings)

    async def _search_federation(
        self, level: Level, query: qido.QidoQuery, base: str
    ) -> web.StreamResponse:
        """Search here and at every live member; merge by UID (federated.py)."""
        assert self.federation is not None
        want = query.offset + query.limit + 1  # one more says more results exist
        index_query = query.index_query()

        def local() -> list[dict[str, Any]]:
            rows = self.archive.index.find(level, index_query)
            try:
                return [dict(row) for _, row in zip(range(want), rows, strict=False)]
            finally:
                rows.close()

        try:
            own, found = await asyncio.gather(
                asyncio.to_thread(local), self.federation.search(level, index_query, want)
            )
        except P2PacsError as exc:
            log.error("federated QIDO-RS failed: %s", exc)
            return shared.text(500, f"the search failed: {exc}")
        merged = merge_rows(level, SiteRows("", self.ae_title, own), found.answers)
        query.warnings += [f"not searched: {why}" for why in found.unanswered]
        if len(merged) > query.offset + query.limit:
            query.warnings.append("there are additional results to request")
        page = merged[query.offset : query.offset + query.limit]

        def render() -> list[dict[str, Any]]:
            return [
                qido.row_to_json(
                    query.keys,
                    m.row,
                    shared.url_of(base, level, m.row),
                    ae_titles=m.ae_titles,
                    availability="ONLINE" if m.local else "NEARLINE",
                )
                for m in page
            ]

        return search_response(await asyncio.to_thread(render), query.warnings)
