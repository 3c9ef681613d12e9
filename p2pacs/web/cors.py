"""Cross-origin requests from browsers (CORS, the Fetch standard) for the site's web server.

A web viewer served from another origin (OHIF on its own host or port) calls DICOMweb with a
bearer token in ``Authorization``; the browser first sends a preflight ``OPTIONS`` without any
credentials and only then the real request. So: a preflight from an origin in
``web.cors_origins`` is answered here, before access control (it reads and changes nothing);
every other request still needs credentials, and its response (401 included, so the viewer can
tell the user) carries ``Access-Control-Allow-Origin`` naming that origin. Origins not listed
get no CORS headers at all, so the browser keeps their pages out; a listed origin is echoed,
never ``*``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

__all__ = ["Cors"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALLOW_METHODS = "GET, POST, OPTIONS"
# headers a DICOMweb client sends beyond the CORS-safelisted ones
DEFAULT_ALLOW_HEADERS = "Authorization, Accept, Content-Type"
# response headers a page may read besides the safelisted ones (QIDO-RS warnings, challenges)
EXPOSE_HEADERS = "Warning, WWW-Authenticate, Content-Location, Content-Length"
MAX_AGE_S = 600  # seconds a browser may keep a preflight's answer
_HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
MAX_HEADER_LIST = 1024  # characters of Access-Control-Request-Headers echoed back


class Cors:
    """The allowed origins; ``middleware`` answers preflights, ``on_prepare`` marks responses."""

    def __init__(self, origins: Iterable[str]):
        self.origins = frozenset(origins)

    def allowed(self, request: web.BaseRequest) -> str | None:
        origin = request.headers.get("Origin")
        return origin if origin is not None and origin in self.origins else None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer a CORS preflight without credentials; pass everything else on."""
        if (
            request.method == "OPTIONS"
            and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers
        ):
            return self._preflight(request)
        return await handler(request)

    def _preflight(self, request: web.Request) -> web.Response:
        origin = self.allowed(request)
        if origin is None:
            return web.Response(
                status=403,
                text="403: this origin is not in web.cors_origins\n",
                headers={"Vary": "Origin"},
            )
        asked = request.headers.get("Access-Control-Request-Headers", "").strip()
        headers = (
            asked
            if asked and len(asked) <= MAX_HEADER_LIST and _HEADER_LIST.fullmatch(asked)
            else DEFAULT_ALLOW_HEADERS
        )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": headers,
                "Access-Control-Max-Age": str(MAX_AGE_S),
                "Vary": "Origin",
            },
        )

    async def on_prepare(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Every response to an allowed origin says so (errors and streamed bodies too)."""
        if "Access-Control-Allow-Origin" in response.headers:
            return
        response.headers.add("Vary", "Origin")
        origin = self.allowed(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
