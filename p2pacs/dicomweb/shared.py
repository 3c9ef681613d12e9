"""What every DICOMweb route shares: the paths, the service's own URLs (its base as the client
sees it, a study's, series' or instance's), UIDs checked in the path, plain-text refusals."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from p2pacs.dicom import Level

__all__ = ["PATTERNS", "ROUTES", "base", "check_uids", "text", "url_of"]

_STUDY, _SERIES, _INSTANCE = "{study}", "{series}", "{instance}"
ROUTES = {  # name -> path pattern of the GET routes (the name says the handler and the level)
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
PATTERNS = {**ROUTES, "stow": "/studies", "stow_study": f"/studies/{_STUDY}"}  # every route

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # PS3.5 9.1: digits and dots, at most 64 characters


def check_uids(match_info: Mapping[str, str]) -> None:
    """A UID in the path is one UID: wildcards or a UID list there would match many."""
    for key in ("study", "series", "instance"):
        uid = match_info.get(key)
        if uid is not None and (len(uid) > 64 or not _UID.fullmatch(uid)):
            raise web.HTTPBadRequest(text=f"{uid[:80]!r} in the path is not a UID\n")


def text(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=reason + "\n")


def base(request: web.Request) -> str:
    """The service root URL (scheme, host and the prefix the app is mounted under)."""
    route = request.match_info.route
    canonical = route.resource.canonical if route.resource is not None else ""
    own = PATTERNS.get(route.name or "", "")
    prefix = canonical[: len(canonical) - len(own)] if canonical.endswith(own) else ""
    return _origin(request) + prefix


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


def url_of(base: str, level: Level, row: Any) -> str:
    """The WADO-RS URL of a study, series or instance result."""
    url = f"{base}/studies/{row.get('StudyInstanceUID', '')}"
    if level in (Level.SERIES, Level.IMAGE):
        url += f"/series/{row.get('SeriesInstanceUID', '')}"
    if level == Level.IMAGE:
        url += f"/instances/{row.get('SOPInstanceUID', '')}"
    return url
