"""The status route set: ``/`` (the page), ``/status.json`` and ``/metrics``.

Each request takes one status snapshot from the site (``status``, which does its own slow part
on a thread) and renders from it; the Prometheus text is rendered on a thread too, so a scrape
never stalls the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from p2pacs.events import EventBus
from p2pacs.web.metrics import SiteMetrics
from p2pacs.web.page import page_headers, render_page
from p2pacs.web.recent import RecentFailures

__all__ = ["StatusRoutes"]

# the text exposition format every Prometheus version reads (generate_latest writes it)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

StatusFn = Callable[[], Awaitable[dict[str, Any]]]


class StatusRoutes:
    """Owns the site's metrics registry and its recent failures; ``install`` the routes."""

    def __init__(self, status: StatusFn, events: EventBus, *, refresh: float = 5.0):
        self._status = status
        self.metrics = SiteMetrics(events)
        self.failures = RecentFailures(events)
        self.refresh = refresh

    def install(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/status.json", self.status_json)
        app.router.add_get("/metrics", self.scrape)

    async def snapshot(self) -> dict[str, Any]:
        """The JSON of ``p2pacs status --json`` for a running site."""
        status = await self._status()
        return {"schema": status.get("schema"), "running": True, **status}

    async def page(self, request: web.Request) -> web.Response:
        text = render_page(
            await self.snapshot(), failures=self.failures.latest(), refresh=self.refresh
        )
        return web.Response(text=text, content_type="text/html", headers=page_headers(self.refresh))

    async def status_json(self, request: web.Request) -> web.Response:
        return web.json_response(await self.snapshot(), headers={"Cache-Control": "no-store"})

    async def scrape(self, request: web.Request) -> web.Response:
        status = await self.snapshot()
        body = await asyncio.to_thread(self.metrics.render, status)
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    def close(self) -> None:
        self.metrics.close()
        self.failures.close()
