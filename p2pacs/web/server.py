"""The site's web server: one aiohttp application on the ``[web]`` port, many route sets.

The status page and ``/metrics`` are one route set; others (DICOMweb) are mounted the same
way before the server starts: ``add_routes(install)`` puts routes on the root application,
``add_app(prefix, app)`` mounts a whole sub-application under a path prefix. Every route set
sits behind the same access control (``auth``; only CORS preflights from the origins in
``web.cors_origins`` are answered without it, ``cors``), and the server speaks HTTPS with the
configured certificate, or plain HTTP on a loopback address when configured so.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from p2pacs.config import WebConfig, is_loopback
from p2pacs.errors import WebError
from p2pacs.events import EventBus
from p2pacs.web.auth import Authenticator
from p2pacs.web.cors import Cors

__all__ = ["WebServer", "tls_context"]

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # bytes of a request body the root application accepts (route sets may differ)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for ``cert``/``key`` (PEM); TLS 1.2 or newer."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise WebError(
            f"cannot load web.tls_cert {cert} / web.tls_key {key}: {exc}; give a PEM "
            "certificate chain and its private key"
        ) from exc
    return ctx


class WebServer:
    """Start, serve every mounted route set, stop; ``address`` once started."""

    def __init__(self, config: WebConfig, events: EventBus, *, base: Path):
        """``base``: the folder relative ``tls_cert``/``tls_key`` paths start from (the site)."""
        self.config = config
        self.auth = Authenticator(config, events)
        self.cors = Cors(config.cors_origins)
        middlewares = [self.auth.middleware]
        if config.cors_origins:  # preflights are answered before access control
            middlewares.insert(0, self.cors.middleware)
        self.app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
        if config.cors_origins:
            self.app.on_response_prepare.append(self.cors.on_prepare)
        self._base = base
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def scheme(self) -> str:
        return "http" if self.config.plain_http else "https"

    def add_routes(self, install: Callable[[web.Application], None]) -> None:
        """Let ``install`` add its routes to the root application (before ``start``)."""
        self._not_started()
        install(self.app)

    def add_app(self, prefix: str, app: web.Application) -> None:
        """Mount ``app`` under ``prefix`` (e.g. ``/dicomweb``), behind the same access control."""
        self._not_started()
        self.app.add_subapp(prefix, app)

    def _not_started(self) -> None:
        if self._runner is not None:
            raise WebError("route sets must be added before the web server starts")

    def _ssl(self) -> ssl.SSLContext | None:
        c = self.config
        if c.plain_http:
            if not is_loopback(c.bind):  # Config.check refuses it too; never serve it anyway
                raise WebError(f"web.plain_http refused on a non-loopback bind {c.bind!r}")
            return None
        if not (c.tls_cert and c.tls_key):
            raise WebError("web.tls_cert and web.tls_key are required for HTTPS")
        return tls_context(self._base / c.tls_cert, self._base / c.tls_key)

    async def start(self) -> None:
        ctx = self._ssl()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner, self.config.bind, self.config.port, ssl_context=ctx, reuse_address=True
        )
        try:
            await self._site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise WebError(
                f"cannot listen on {self.config.bind}:{self.config.port} for the web server: "
                f"{exc.strerror or exc}; move it with 'p2pacs config set web.port N'"
            ) from exc
        host, port = self.address
        log.info("web server listening on %s://%s:%d", self.scheme, host, port)

    @property
    def address(self) -> tuple[str, int]:
        server = self._site._server if self._site is not None else None
        sockets = getattr(server, "sockets", None) or []
        if not sockets:
            raise WebError("the web server is not started")
        host, port = sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None
