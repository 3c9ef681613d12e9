"""WADO-RS routes (PS3.18 10.4): instances, metadata, frames, bulk data and renderings of what
this site holds (a study held elsewhere is fetched from the federation first). What to send is
decided by pure functions (wado.py, bulkdata.py, rendered.py); blobs are read and converted on
worker threads, instances streamed by stream.py."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

from aiohttp import web

from p2pacs.archive import Archive
from p2pacs.dicom import Level
from p2pacs.dicom.transcode import choose_target
from p2pacs.dicomweb import shared
from p2pacs.dicomweb.bulkdata import BulkDataNotFoundError, bulk_value, parse_path
from p2pacs.dicomweb.federated import Federation
from p2pacs.dicomweb.metastore import MetadataStore
from p2pacs.dicomweb.rendered import NotAnImageError, RenderParamError, parse_render, render
from p2pacs.dicomweb.stream import BufferPool, VerifiedBlobs, send_instances
from p2pacs.dicomweb.wado import (
    ANY_SYNTAX,
    DICOM_JSON,
    NotAcceptableError,
    accepted_syntaxes,
    bulk_accept,
    closing,
    frames_of,
    part_header,
    wants_json,
    with_base,
)
from p2pacs.errors import P2PacsError, TranscodeError
from p2pacs.index import InstanceRecord

__all__ = ["WadoRS"]

log = logging.getLogger(__name__)

_EXPLICIT = "1.2.840.10008.1.2.1"  # Explicit VR Little Endian: native frames


class WadoRS:
    """The retrieve handlers; one per application."""

    def __init__(self, archive: Archive, federation: Federation | None):
        self.archive = archive
        self.federation = federation
        self.meta_store = MetadataStore(archive)
        self.verified = VerifiedBlobs()
        self.buffers = BufferPool()

    def _instances(self, study: str, series: str = "", sop: str = "") -> list[InstanceRecord]:
        """The instances a WADO-RS path names (a worker thread: reads the index)."""
        query: dict[str, str | list[str] | None] = {"StudyInstanceUID": study}
        if series:
            query["SeriesInstanceUID"] = series
        if sop:
            query["SOPInstanceUID"] = sop
        out = []
        for row in self.archive.index.find(Level.IMAGE, query):
            rec = self.archive.index.instance(str(row.get("SOPInstanceUID", "")))
            if rec is not None:
                out.append(rec)
        return out

    async def _records(self, request: web.Request) -> list[InstanceRecord]:
        m = request.match_info
        shared.check_uids(m)
        if self.federation is not None:  # a study held elsewhere is fetched first, then served
            try:
                await self.federation.ensure_local(m["study"])
            except P2PacsError as exc:
                log.warning("WADO-RS read-through of %s failed: %s", m["study"], exc)
                raise web.HTTPBadGateway(text=f"the study could not be fetched: {exc}\n") from None
        records = await asyncio.to_thread(
            self._instances, m["study"], m.get("series", ""), m.get("instance", "")
        )
        if not records:
            raise web.HTTPNotFound(text="no such study, series or instance here\n")
        return records

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        try:
            wanted = accepted_syntaxes(request.headers.get("Accept"), "application/dicom")
        except NotAcceptableError as exc:
            return shared.text(406, str(exc))
        records = await self._records(request)
        plans = {}
        refused = []
        for rec in records:
            stored = rec.current.transfer_syntax
            accepted = [stored if ts == ANY_SYNTAX else ts for ts in wanted]
            plan = choose_target(stored, accepted)
            if plan is None:
                refused.append(f"{rec.sop_uid} (stored as {stored})")
            else:
                plans[rec.sop_uid] = plan
        if refused:
            return shared.text(
                406, f"cannot convert to {', '.join(wanted)}: {', '.join(refused[:20])}"
            )
        items = [(rec, plans[rec.sop_uid]) for rec in records]
        return await send_instances(request, self.archive, self.verified, self.buffers, items)

    async def metadata(self, request: web.Request) -> web.StreamResponse:
        if not wants_json(request.headers.get("Accept")):
            return shared.text(406, f"metadata is served as {DICOM_JSON} only")
        records = await self._records(request)
        base = shared.base(request)

        def run() -> bytes:
            versions = [(rec.current.hash, rec.current.transfer_syntax) for rec in records]
            entries = self.meta_store.get_many(versions)
            return (
                b"["
                + b",".join(
                    with_base(e, shared.url_of(base, Level.IMAGE, _uids(rec)))
                    for e, rec in zip(entries, records, strict=True)
                )
                + b"]"
            )

        try:
            body = await asyncio.to_thread(run)
        except P2PacsError as exc:
            log.error("WADO-RS metadata failed: %s", exc)
            return shared.text(500, f"an instance could not be read: {exc}")
        return web.Response(body=body, content_type=DICOM_JSON)

    async def frames(self, request: web.Request) -> web.StreamResponse:
        try:
            single, wanted = bulk_accept(request.headers.get("Accept"))
        except NotAcceptableError as exc:
            return shared.text(406, str(exc))
        try:
            numbers = [int(n) for n in request.match_info["frames"].split(",")]
        except ValueError:
            return shared.text(400, "frame numbers must be whole numbers separated by commas")
        if not {ANY_SYNTAX, _EXPLICIT}.intersection(wanted):
            return shared.text(406, f"frames are served as stored (*) or as {_EXPLICIT}")
        as_stored = wanted[0] == ANY_SYNTAX or _EXPLICIT not in wanted
        rec = (await self._records(request))[0]

        def run() -> tuple[list[bytes], str]:
            v = rec.current
            raw = self.archive.blob(v.hash)
            return frames_of(raw, v.transfer_syntax, numbers, as_stored=as_stored)

        return await _octet_parts(run, single, IndexError)

    async def bulkdata(self, request: web.Request) -> web.StreamResponse:
        """The value behind a BulkDataURI of ``/metadata`` (PS3.18 8.7.3.3, bulkdata.py)."""
        try:
            single, wanted = bulk_accept(request.headers.get("Accept"))
        except NotAcceptableError as exc:
            return shared.text(406, str(exc))
        if not {ANY_SYNTAX, _EXPLICIT}.intersection(wanted):
            return shared.text(406, f"bulk data is served as stored (*) or as {_EXPLICIT}")
        as_stored = wanted[0] == ANY_SYNTAX or _EXPLICIT not in wanted
        try:
            path = parse_path(request.match_info["path"])
        except ValueError as exc:
            return shared.text(400, str(exc))
        rec = (await self._records(request))[0]

        def run() -> tuple[list[bytes], str]:
            v = rec.current
            return bulk_value(
                self.archive.blob(v.hash), v.transfer_syntax, path, as_stored=as_stored
            )

        try:
            return await _octet_parts(run, single, BulkDataNotFoundError)
        except P2PacsError as exc:  # the blob could not be read (corrupt, no peer to repair)
            log.error("WADO-RS bulk data of %s failed: %s", rec.sop_uid, exc)
            return shared.text(500, f"the instance could not be read: {exc}")

    async def rendered(self, request: web.Request) -> web.StreamResponse:
        """An instance or frame as JPEG or PNG, or its thumbnail (PS3.18 8.3.5, rendered.py):
        a multi-frame instance's rendered and thumbnail resources show its first frame."""
        thumbnail = (request.match_info.route.name or "").startswith("thumbnail")
        try:
            params = parse_render(
                request.query.items(), request.headers.get("Accept"), thumbnail=thumbnail
            )
        except NotAcceptableError as exc:
            return shared.text(406, str(exc))
        except RenderParamError as exc:
            return shared.text(400, str(exc))
        frame = 1
        if "frames" in request.match_info:
            try:
                frame = int(request.match_info["frames"])
            except ValueError:
                return shared.text(400, "a rendered frame is one frame number")
        rec = (await self._records(request))[0]

        def run() -> bytes:
            v = rec.current
            return render(self.archive.blob(v.hash), v.transfer_syntax, frame, params)

        try:
            body = await asyncio.to_thread(run)
        except IndexError as exc:
            return shared.text(404, str(exc))
        except RenderParamError as exc:
            return shared.text(400, str(exc))
        except (NotAnImageError, TranscodeError) as exc:
            return shared.text(406, f"no {params.media} rendering: {exc}")
        except P2PacsError as exc:
            log.error("WADO-RS rendering of %s failed: %s", rec.sop_uid, exc)
            return shared.text(500, f"the instance could not be read: {exc}")
        return web.Response(body=body, content_type=params.media)


async def _octet_parts(
    run: Callable[[], tuple[list[bytes], str]], single: bool, missing: type[Exception]
) -> web.Response:
    """Frames or bulk data read by ``run`` (a worker thread), sent as ``_octet_response``:
    404 when ``run`` raises ``missing`` (no such frame or value), 406 when it cannot convert."""
    try:
        parts, syntax = await asyncio.to_thread(run)
    except missing as exc:
        return shared.text(404, str(exc))
    except TranscodeError as exc:
        return shared.text(406, str(exc))
    return _octet_response(parts, syntax, single)


def _octet_response(parts: list[bytes], syntax: str, single: bool) -> web.Response:
    """Frames or bulk data: ``multipart/related; type="application/octet-stream"``, one part
    each; a single ``application/octet-stream`` body when the client asked for that first and
    there is one part (406 when there are several)."""
    if single:
        if len(parts) != 1:
            return shared.text(406, f"{len(parts)} parts cannot go in one application/octet-stream")
        ctype = f"application/octet-stream; transfer-syntax={syntax}"
        return web.Response(body=parts[0], headers={"Content-Type": ctype})
    boundary = uuid.uuid4().hex
    body = b"".join(
        part_header(boundary, f"application/octet-stream; transfer-syntax={syntax}", i == 0) + p
        for i, p in enumerate(parts)
    ) + closing(boundary, not parts)
    ctype = f'multipart/related; type="application/octet-stream"; boundary={boundary}'
    return web.Response(body=body, headers={"Content-Type": ctype})


def _uids(rec: InstanceRecord) -> dict[str, str]:
    return {
        "StudyInstanceUID": rec.study_uid,
        "SeriesInstanceUID": rec.series_uid,
        "SOPInstanceUID": rec.sop_uid,
    }
