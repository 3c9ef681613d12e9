"""The DICOMweb service as an aiohttp application over an ``Archive``: QIDO-RS, WADO-RS,
STOW-RS (PS3.18). No server or configuration of its own: the site's web server mounts it,
``app.add_subapp("/dicomweb", dicomweb_app(archive))``.

Handlers run on the event loop and hand every index read, blob read, conversion and write to
a worker thread (``asyncio.to_thread``), one instance at a time, so nothing that walks the
archive or decodes pixels runs on the loop. Multipart responses are streamed part by part.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web

from p2pacs import const
from p2pacs.archive import Archive
from p2pacs.dicom import Level, split_part10
from p2pacs.dicom.transcode import choose_target
from p2pacs.dicomweb import qido
from p2pacs.dicomweb.bulkdata import BulkDataNotFoundError, bulk_value, parse_path
from p2pacs.dicomweb.federated import Federation, SiteRows, merge_rows
from p2pacs.dicomweb.metastore import MetadataStore, MetadataWarmer
from p2pacs.dicomweb.rendered import NotAnImageError, RenderParamError, parse_render, render
from p2pacs.dicomweb.stream import BufferPool, VerifiedBlobs, send_instances
from p2pacs.dicomweb.wado import (
    ANY_SYNTAX,
    DICOM_JSON,
    NotAcceptableError,
    StowResult,
    accepted_syntaxes,
    bulk_accept,
    closing,
    frames_of,
    part_header,
    stow_response,
    wants_json,
    with_base,
)
from p2pacs.errors import InvalidDicomError, P2PacsError, StoreFullError, TranscodeError
from p2pacs.index import InstanceRecord

__all__ = ["Ingest", "dicomweb_app"]

log = logging.getLogger(__name__)

# Archive.submit's shape: (dataset bytes, transfer syntax, file meta prefix) -> durable future
Ingest = Callable[[bytes, str, bytes], "Future[Any]"]

_STUDY, _SERIES, _INSTANCE = "{study}", "{series}", "{instance}"
_ROUTES = {  # name -> path pattern (the name says the handler and the level)
    "qido_studies": "/studies",
    "qido_series": "/series",
    "qido_instances": "/instances",
    "qido_study_series": f"/studies/{_STUDY}/series",
    "qido_study_instances": f"/studies/{_STUDY}/instances",
    "qido_series_instances": f"/studies/{_STUDY}/series/{_SERIES}/instances",
    "wado_study": f"/studies/{_STUDY}",
    "wado_series": f"/studies/{_STUDY}/series/{_SERIES}",
    "wado_instance": f"/studies/{_STUDY}/series/{_SERIES}/instances/{_INSTANCE}",
    "meta_study": f"/studies/{_STUDY}/metadata",
    "meta_series": f"/studies/{_STUDY}/series/{_SERIES}/metadata",
    "meta_instance": f"/studies/{_STUDY}/series/{_SERIES}/instances/{_INSTANCE}/metadata",
    "frames": f"/studies/{_STUDY}/series/{_SERIES}/instances/{_INSTANCE}/frames/{{frames}}",
    "bulkdata": f"/studies/{_STUDY}/series/{_SERIES}/instances/{_INSTANCE}/bulkdata/{{path:.+}}",
    "rendered_instance": f"/studies/{_STUDY}/series/{_SERIES}/instances/{_INSTANCE}/rendered",
    "rendered_frame": (
        f"/studies/{_STUDY}/series/{_SERIES}/instances/{_INSTANCE}/frames/{{frames}}/rendered"
    ),
    "thumbnail_instance": f"/studies/{_STUDY}/series/{_SERIES}/instances/{_INSTANCE}/thumbnail",
}
MAX_BOUNDARY = 200  # characters of a multipart boundary we take (RFC 2046: 70)
MAX_PART = 1 << 32  # bytes of one STOW-RS part held in memory: 4 GiB, far above any instance
_EXPLICIT = "1.2.840.10008.1.2.1"  # Explicit VR Little Endian: native frames
_PATTERNS = {**_ROUTES, "stow": "/studies", "stow_study": f"/studies/{_STUDY}"}
# STOW-RS FailureReason values (PS3.4 B.2.3 / PS3.18 10.5.3)
REFUSED_OUT_OF_RESOURCES = 0xA700
REFUSED_NOT_AUTHORIZED_STUDY = 0xA900  # the instance belongs to another study than the URL's
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # PS3.5 9.1: digits and dots, at most 64 characters


def _check_uids(match_info: Mapping[str, str]) -> None:
    """A UID in the path is one UID: wildcards or a UID list there would match many."""
    for key in ("study", "series", "instance"):
        uid = match_info.get(key)
        if uid is not None and (len(uid) > 64 or not _UID.fullmatch(uid)):
            raise web.HTTPBadRequest(text=f"{uid[:80]!r} in the path is not a UID\n")


def _text(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=reason + "\n")


def _search_response(results: list[dict[str, Any]], warnings: list[str]) -> web.Response:
    """A QIDO-RS answer: 204 when empty; warnings as ``Warning: 299`` (RFC 7234 5.5)."""
    headers = {}
    if warnings:
        # quoted-string text: printable ASCII, no quote (a member's error message may hold any)
        texts = ("".join(c if " " <= c <= "~" and c != '"' else "?" for c in w) for w in warnings)
        headers["Warning"] = ", ".join(f'299 p2pacs "{t}"' for t in texts)
    if not results:
        return web.Response(status=204, headers=headers)
    return web.Response(body=json.dumps(results).encode(), content_type=DICOM_JSON, headers=headers)


class DicomWeb:
    """The request handlers; one per application."""

    def __init__(
        self,
        archive: Archive,
        ingest: Ingest | None,
        federation: Federation | None = None,
        ae_title: str = "",
    ):
        self.archive = archive
        self.ingest: Ingest = ingest or self.archive.submit
        self.meta_store = MetadataStore(archive)
        self.verified = VerifiedBlobs()
        self.buffers = BufferPool()
        self.federation = federation
        self.ae_title = ae_title

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _base(request: web.Request) -> str:
        """The service root URL (scheme, host and the prefix the app is mounted under)."""
        route = request.match_info.route
        canonical = route.resource.canonical if route.resource is not None else ""
        own = _PATTERNS.get(route.name or "", "")
        prefix = canonical[: len(canonical) - len(own)] if canonical.endswith(own) else ""
        return _origin(request) + prefix

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
        _check_uids(m)
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

    # --- QIDO-RS --------------------------------------------------------------------------

    async def search(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.route.name or ""
        level = {"studies": Level.STUDY, "series": Level.SERIES}.get(
            name.rsplit("_", 1)[-1], Level.IMAGE
        )
        _check_uids(request.match_info)
        if not wants_json(request.headers.get("Accept")):
            return _text(406, f"search results are served as {DICOM_JSON} only")
        fixed = {}
        if "study" in request.match_info:
            fixed["StudyInstanceUID"] = request.match_info["study"]
        if "series" in request.match_info:
            fixed["SeriesInstanceUID"] = request.match_info["series"]
        try:
            query = qido.parse_query(level, request.query.items(), fixed)
        except qido.QidoError as exc:
            return _text(400, str(exc))
        base = self._base(request)
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
                    out.append(qido.row_to_json(query.keys, row, _url(base, level, row)))
            finally:
                rows.close()
            return out

        try:
            results = await asyncio.to_thread(run)
        except P2PacsError as exc:
            log.error("QIDO-RS failed: %s", exc)
            return _text(500, f"the index could not be read: {exc}")
        return _search_response(results, query.warnings)

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
            return _text(500, f"the search failed: {exc}")
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
                    _url(base, level, m.row),
                    ae_titles=m.ae_titles,
                    availability="ONLINE" if m.local else "NEARLINE",
                )
                for m in page
            ]

        return _search_response(await asyncio.to_thread(render), query.warnings)

    # --- WADO-RS --------------------------------------------------------------------------

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        try:
            wanted = accepted_syntaxes(request.headers.get("Accept"), "application/dicom")
        except NotAcceptableError as exc:
            return _text(406, str(exc))
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
            return _text(406, f"cannot convert to {', '.join(wanted)}: {', '.join(refused[:20])}")
        items = [(rec, plans[rec.sop_uid]) for rec in records]
        return await send_instances(request, self.archive, self.verified, self.buffers, items)

    async def metadata(self, request: web.Request) -> web.StreamResponse:
        if not wants_json(request.headers.get("Accept")):
            return _text(406, f"metadata is served as {DICOM_JSON} only")
        records = await self._records(request)
        base = self._base(request)

        def run() -> bytes:
            versions = [(rec.current.hash, rec.current.transfer_syntax) for rec in records]
            entries = self.meta_store.get_many(versions)
            return (
                b"["
                + b",".join(
                    with_base(e, _url(base, Level.IMAGE, _uids(rec)))
                    for e, rec in zip(entries, records, strict=True)
                )
                + b"]"
            )

        try:
            body = await asyncio.to_thread(run)
        except P2PacsError as exc:
            log.error("WADO-RS metadata failed: %s", exc)
            return _text(500, f"an instance could not be read: {exc}")
        return web.Response(body=body, content_type=DICOM_JSON)

    async def frames(self, request: web.Request) -> web.StreamResponse:
        try:
            single, wanted = bulk_accept(request.headers.get("Accept"))
        except NotAcceptableError as exc:
            return _text(406, str(exc))
        try:
            numbers = [int(n) for n in request.match_info["frames"].split(",")]
        except ValueError:
            return _text(400, "frame numbers must be whole numbers separated by commas")
        if not {ANY_SYNTAX, _EXPLICIT}.intersection(wanted):
            return _text(406, f"frames are served as stored (*) or as {_EXPLICIT}")
        as_stored = wanted[0] == ANY_SYNTAX or _EXPLICIT not in wanted
        rec = (await self._records(request))[0]

        def run() -> tuple[list[bytes], str]:
            v = rec.current
            raw = self.archive.blob(v.hash)
            return frames_of(raw, v.transfer_syntax, numbers, as_stored=as_stored)

        try:
            frames, syntax = await asyncio.to_thread(run)
        except IndexError as exc:
            return _text(404, str(exc))
        except TranscodeError as exc:
            return _text(406, str(exc))
        return _octet_response(frames, syntax, single)

    async def bulkdata(self, request: web.Request) -> web.StreamResponse:
        """The value behind a BulkDataURI of ``/metadata`` (PS3.18 8.7.3.3, bulkdata.py)."""
        try:
            single, wanted = bulk_accept(request.headers.get("Accept"))
        except NotAcceptableError as exc:
            return _text(406, str(exc))
        if not {ANY_SYNTAX, _EXPLICIT}.intersection(wanted):
            return _text(406, f"bulk data is served as stored (*) or as {_EXPLICIT}")
        as_stored = wanted[0] == ANY_SYNTAX or _EXPLICIT not in wanted
        try:
            path = parse_path(request.match_info["path"])
        except ValueError as exc:
            return _text(400, str(exc))
        rec = (await self._records(request))[0]

        def run() -> tuple[list[bytes], str]:
            v = rec.current
            return bulk_value(
                self.archive.blob(v.hash), v.transfer_syntax, path, as_stored=as_stored
            )

        try:
            parts, syntax = await asyncio.to_thread(run)
        except BulkDataNotFoundError as exc:
            return _text(404, str(exc))
        except TranscodeError as exc:
            return _text(406, str(exc))
        except P2PacsError as exc:  # the blob could not be read (corrupt, no peer to repair)
            log.error("WADO-RS bulk data of %s failed: %s", rec.sop_uid, exc)
            return _text(500, f"the instance could not be read: {exc}")
        return _octet_response(parts, syntax, single)

    async def rendered(self, request: web.Request) -> web.StreamResponse:
        """An instance or frame as JPEG or PNG, or its thumbnail (PS3.18 8.3.5, rendered.py):
        a multi-frame instance's rendered and thumbnail resources show its first frame."""
        thumbnail = (request.match_info.route.name or "").startswith("thumbnail")
        try:
            params = parse_render(
                request.query.items(), request.headers.get("Accept"), thumbnail=thumbnail
            )
        except NotAcceptableError as exc:
            return _text(406, str(exc))
        except RenderParamError as exc:
            return _text(400, str(exc))
        frame = 1
        if "frames" in request.match_info:
            try:
                frame = int(request.match_info["frames"])
            except ValueError:
                return _text(400, "a rendered frame is one frame number")
        rec = (await self._records(request))[0]

        def run() -> bytes:
            v = rec.current
            return render(self.archive.blob(v.hash), v.transfer_syntax, frame, params)

        try:
            body = await asyncio.to_thread(run)
        except IndexError as exc:
            return _text(404, str(exc))
        except RenderParamError as exc:
            return _text(400, str(exc))
        except (NotAnImageError, TranscodeError) as exc:
            return _text(406, f"no {params.media} rendering: {exc}")
        except P2PacsError as exc:
            log.error("WADO-RS rendering of %s failed: %s", rec.sop_uid, exc)
            return _text(500, f"the instance could not be read: {exc}")
        return web.Response(body=body, content_type=params.media)

    # --- STOW-RS --------------------------------------------------------------------------

    async def store(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "multipart/related":
            return _text(415, 'STOW-RS takes multipart/related; type="application/dicom"')
        study = request.match_info.get("study", "")
        base = self._base(request)
        results: list[StowResult] = []
        try:
            async for data in _parts(request):  # one part in memory at a time
                results.append(await asyncio.to_thread(self._store_one, data, study, base))
        except Exception as exc:  # aiohttp's multipart parser raises several kinds
            log.warning("STOW-RS body cut off: %s: %s", type(exc).__name__, exc)
            if not results:
                return _text(400, f"unreadable multipart body: {type(exc).__name__}: {exc}")
            # what came before stays stored; the unreadable rest is one failure
            results.append(StowResult("", "", CANNOT_UNDERSTAND))
        if not results:
            return _text(400, "the request holds no instance")
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
        url = _url(base, Level.IMAGE, {**attrs})
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


def _origin(request: web.Request) -> str:
    """Scheme, host and port of the URLs this service hands out. A Host header without a port
    means the scheme's default (RFC 9110 7.2), yet dicomweb-client sends its host name alone
    whatever the port: when the connection's own port is not the default, it is named."""
    origin = request.url.origin()
    host = request.headers.get("Host", "")
    transport = request.transport
    if host and ":" not in host.rsplit("]", 1)[-1] and transport is not None:
        sockname = transport.get_extra_info("sockname")
        default = 443 if request.url.scheme == "https" else 80
        if isinstance(sockname, tuple) and len(sockname) >= 2 and sockname[1] != default:
            origin = origin.with_port(int(sockname[1]))
    return str(origin)


def _octet_response(parts: list[bytes], syntax: str, single: bool) -> web.Response:
    """Frames or bulk data: ``multipart/related; type="application/octet-stream"``, one part
    each; a single ``application/octet-stream`` body when the client asked for that first and
    there is one part (406 when there are several)."""
    if single:
        if len(parts) != 1:
            return _text(406, f"{len(parts)} parts cannot go in one application/octet-stream")
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


def _url(base: str, level: Level, row: Any) -> str:
    """The WADO-RS URL of a study, series or instance result."""
    url = f"{base}/studies/{row.get('StudyInstanceUID', '')}"
    if level in (Level.SERIES, Level.IMAGE):
        url += f"/series/{row.get('SeriesInstanceUID', '')}"
    if level == Level.IMAGE:
        url += f"/instances/{row.get('SOPInstanceUID', '')}"
    return url


def _iter_routes(handlers: DicomWeb) -> Iterator[web.RouteDef]:
    for name, path in _ROUTES.items():
        kind = name.split("_", 1)[0]
        handler = {
            "qido": handlers.search,
            "wado": handlers.retrieve,
            "meta": handlers.metadata,
            "frames": handlers.frames,
            "bulkdata": handlers.bulkdata,
            "rendered": handlers.rendered,
            "thumbnail": handlers.rendered,
        }[kind]
        yield web.get(path, handler, name=name, allow_head=False)
    yield web.post("/studies", handlers.store, name="stow")
    yield web.post(f"/studies/{_STUDY}", handlers.store, name="stow_study")


def dicomweb_app(
    archive: Archive,
    *,
    ingest: Ingest | None = None,
    federation: Federation | None = None,
    ae_title: str = "",
    warm: bool = True,
) -> web.Application:
    """The DICOMweb service over ``archive`` as an aiohttp application to mount as a sub-app
    (``parent.add_subapp("/dicomweb", dicomweb_app(archive))``) or to run on its own.

    ``ingest``: where STOW-RS instances go, called as ``ingest(dataset, transfer_syntax,
    prefix)`` returning a future that completes once the instance is durable (default:
    ``archive.submit``, the C-STORE path). ``federation``: the members searched by
    ``federation=true`` and the source of studies not held here (read-through WADO-RS);
    ``ae_title``: this site's, named in federated results (RetrieveAETitle). ``warm``: build
    each ingested instance's ``/metadata`` in a background thread while the app runs
    (metastore.py), so a series' first ``/metadata`` is read, not built."""
    app = web.Application()  # STOW-RS bodies are read part by part, not bounded as a whole
    handlers = DicomWeb(archive, ingest, federation, ae_title)
    app.add_routes(list(_iter_routes(handlers)))
    if warm:  # every instance ingested while the app runs gets its /metadata built at once
        warmer = MetadataWarmer(handlers.meta_store)
        archive.on_ingest(warmer.offer)

        async def start(_app: web.Application) -> None:
            warmer.start()

        async def stop(_app: web.Application) -> None:
            await asyncio.to_thread(warmer.stop)

        app.on_startup.append(start)
        app.on_cleanup.append(stop)
    return app
