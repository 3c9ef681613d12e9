"""STOW-RS routes (PS3.18 10.5): multipart/related bodies of Part-10 files, read one part at a
time, each checked whole and ingested on a worker thread; the response (pure, wado.py) names
each instance stored or refused."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web

from p2pacs import const
from p2pacs.archive import Archive
from p2pacs.dicom import Level, split_part10
from p2pacs.dicomweb import shared
from p2pacs.dicomweb.wado import DICOM_JSON, StowResult, stow_response
from p2pacs.errors import InvalidDicomError, StoreFullError

__all__ = ["Ingest", "StowRS"]

log = logging.getLogger(__name__)

# Archive.submit's shape: (dataset bytes, transfer syntax, file meta prefix) -> durable future
Ingest = Callable[[bytes, str, bytes], "Future[Any]"]

MAX_BOUNDARY = 200  # characters of a multipart boundary we take (RFC 2046: 70)
MAX_PART = 1 << 32  # bytes of one STOW-RS part held in memory: 4 GiB, far above any instance
# STOW-RS FailureReason values (PS3.4 B.2.3 / PS3.18 10.5.3)
REFUSED_OUT_OF_RESOURCES = 0xA700
REFUSED_NOT_AUTHORIZED_STUDY = 0xA900  # the instance belongs to another study than the URL's
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


class StowRS:
    """The store handler; one per application."""

    def __init__(self, archive: Archive, ingest: Ingest | None):
        self.archive = archive
        self.ingest: Ingest = ingest or archive.submit

    async def store(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "multipart/related":
            return shared.text(415, 'STOW-RS takes multipart/related; type="application/dicom"')
        study = request.match_info.get("study", "")
        base = shared.base(request)
        results: list[StowResult] = []
        try:
            async for data in _parts(request):  # one part in memory at a time
                results.append(await asyncio.to_thread(self._store_one, data, study, base))
        except Exception as exc:  # aiohttp's multipart parser raises several kinds
            log.warning("STOW-RS body cut off: %s: %s", type(exc).__name__, exc)
            if not results:
                return shared.text(400, f"unreadable multipart body: {type(exc).__name__}: {exc}")
            # what came before stays stored; the unreadable rest is one failure
            results.append(StowResult("", "", CANNOT_UNDERSTAND))
        if not results:
            return shared.text(400, "the request holds no instance")
        stored = sum(r.failure is None for r in results)
        studies = {r.retrieve_url.split("/series/")[0] for r in results if r.retrieve_url}
        study_url = (
            f"{base}/studies/{study}" if study else (studies.pop() if len(studies) == 1 else "")
        )
        status = 200 if stored == len(results) else 409 if stored == 0 else 202
        body = json.dumps(stow_response(results, study_url)).encode()
        return web.Response(status=status, body=body, content_type=DICOM_JSON)

    def _store_one(self, data: bytes, study: str, base: str) -> StowResult:
        """Validate and ingest one Part-10 file (a worker thread); never raises."""
        try:
            part = split_part10(data)
            attrs = self.archive.check(part.dataset, part.transfer_syntax)
        except InvalidDicomError as exc:
            log.warning("STOW-RS part refused: %s", exc)
            return StowResult("", "", CANNOT_UNDERSTAND)
        sop_class, sop = str(attrs["SOPClassUID"]), str(attrs["SOPInstanceUID"])
        if study and str(attrs["StudyInstanceUID"]) != study:
            return StowResult(sop_class, sop, REFUSED_NOT_AUTHORIZED_STUDY)
        try:
            self.ingest(bytes(part.dataset), part.transfer_syntax, part.prefix).result(
                const.WRITE_TIMEOUT
            )
        except StoreFullError as exc:
            log.error("STOW-RS refused, archive full: %s", exc)
            return StowResult(sop_class, sop, REFUSED_OUT_OF_RESOURCES)
        except InvalidDicomError as exc:
            log.warning("STOW-RS part refused: %s", exc)
            return StowResult(sop_class, sop, CANNOT_UNDERSTAND)
        except Exception as exc:  # the archive's failure: reported for this instance only
            log.error("STOW-RS store of %s failed: %s", sop, exc)
            return StowResult(sop_class, sop, PROCESSING_FAILURE)
        url = shared.url_of(base, Level.IMAGE, {**attrs})
        return StowResult(sop_class, sop, None, url)


class _Reader(MultipartReader):
    """aiohttp's multipart reader, taking boundaries up to ``MAX_BOUNDARY`` characters: RFC
    2046 allows 70, aiohttp refuses more, and Orthanc's DICOMweb plugin sends 73."""

    def _get_boundary(self) -> str:
        boundary = str(self._mimetype.parameters["boundary"])
        if not 0 < len(boundary) <= MAX_BOUNDARY:
            raise ValueError(f"boundary of {len(boundary)} characters (1-{MAX_BOUNDARY} taken)")
        return boundary


async def _parts(request: web.Request) -> AsyncIterator[bytes]:
    """The bodies of a multipart/related request's parts, one at a time (nested multiparts
    skipped). Read here rather than with ``request.multipart()``, so the size limit is ours
    (``MAX_PART``), not the root application's ``client_max_size``."""
    reader = _Reader(request.headers, request.content)
    while True:
        part = await reader.next()
        if part is None:
            return
        if isinstance(part, BodyPartReader):
            data = bytearray()
            while chunk := await part.read_chunk(1 << 20):
                data += chunk
                if len(data) > MAX_PART:
                    raise ValueError(f"a part is larger than {MAX_PART} bytes")
            yield bytes(data)
