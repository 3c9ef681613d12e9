"""The site's control plane: the operator's API on the transfer server.

The site's own command line connects with the site's own certificate and drives the running
node through ``/v1/status``, ``/v1/find``, ``/v1/fetch``, ``/v1/recover`` and ``/v1/scrub``
(those answer only to the site itself); members ask for repairs through ``/v1/notify``. Long
operations stream one JSON object per line so the CLI can draw progress. Each route reaches the
site's parts through narrow views (``ports``): the federation node, anti-entropy, recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from p2pacs.const import RECOVER_NOTICE_EVERY, RECOVER_WAIT
from p2pacs.control.ports import HealerPort, RecoveryPort
from p2pacs.control.stream import Emit, stream
from p2pacs.errors import RecoveryError
from p2pacs.federation.node import FederationNode
from p2pacs.federation.routes import caller
from p2pacs.healing.scrub import ScrubTotals, scrub

__all__ = ["MAX_NOTIFY_STUDIES", "ControlPlane"]

MAX_NOTIFY_STUDIES = 10_000  # per request; a peer cannot queue unbounded work in one call


class ControlPlane:
    """The operator routes of one enrolled site (``install`` them on its transfer server)."""

    def __init__(
        self,
        federation: FederationNode,
        healer: HealerPort,
        recovery: RecoveryPort,
        status: Callable[[], Awaitable[dict[str, Any]]],
        scrubs: ScrubTotals | None = None,
    ):
        """``scrubs``: where each scrub's findings are added up (``status``, metrics)."""
        self.fed = federation
        self.healer = healer
        self.recovery = recovery
        self._status = status
        self.scrubs = scrubs if scrubs is not None else ScrubTotals()

    def install(self, app: web.Application) -> None:
        app.router.add_post("/v1/notify", self.notify)
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/v1/find", self.find)
        app.router.add_post("/v1/fetch", self.fetch)
        app.router.add_post("/v1/recover", self.recover)
        app.router.add_post("/v1/scrub", self.scrub)

    def _only_self(self, request: web.Request) -> None:
        if caller(request) != self.fed.site_id:
            raise web.HTTPForbidden(text="only this site's own identity may drive it")

    async def notify(self, request: web.Request) -> web.Response:
        """A member asks this site to copy studies (it is one of their repair targets)."""
        try:
            body = await request.json()
            studies = [str(s) for s in body["studies"]][:MAX_NOTIFY_STUDIES]
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='expected {"studies": [UID, ...]}') from None
        queued = sum(1 for uid in studies if self.healer.request(uid))
        return web.json_response({"queued": queued}, status=202)

    async def status(self, request: web.Request) -> web.Response:
        self._only_self(request)
        return web.json_response(await self._status())

    async def find(self, request: web.Request) -> web.Response:
        self._only_self(request)
        fed = self.fed
        uid = request.query.get("study", "")
        rows = [
            {
                "site_id": h.site_id.hex(),
                "name": h.name,
                "up": h.up,
                "instances": h.holding.instances,
                "bytes": h.holding.size,
                "manifest": h.holding.manifest_hash,
            }
            for h in await fed.holders(uid)
        ]
        record = fed.archive.index.study(uid) if fed.held(uid) else None
        if record is not None:
            entry = fed.publisher.entries.get(uid)
            rows.insert(
                0,
                {
                    "site_id": fed.site_hex,
                    "name": f"{fed.name} (this site)",
                    "up": True,
                    "instances": record.instances,
                    "bytes": record.bytes,
                    "manifest": entry.manifest_hash if entry else "",
                },
            )
        return web.json_response({"study": uid, "holders": rows})

    async def fetch(self, request: web.Request) -> web.StreamResponse:
        self._only_self(request)
        fed = self.fed
        uid = request.query.get("study", "")

        async def run(emit: Emit) -> dict[str, Any]:
            holders = await fed.holders(uid)
            total = max((h.holding.size for h in holders), default=0)
            emit({"bytes_total": total, "bytes_done": 0})
            result = await fed.fetch_study(
                uid, progress=lambda done: emit({"bytes_total": total, "bytes_done": done})
            )
            return dataclasses.asdict(result)

        return await stream(request, run)

    async def recover(self, request: web.Request) -> web.StreamResponse:
        """Stream the recovery's progress until every queued study is back or given up on.

        ``wait``: seconds to wait for the plan (a wiped site finding its last record) before
        ending with the reason; meanwhile every event carries ``notice``, what it waits for."""
        self._only_self(request)
        recovery = self.recovery
        try:
            wait = float(request.query.get("wait", RECOVER_WAIT))
        except ValueError:
            wait = -1.0
        if not 0 < wait < float("inf"):
            raise web.HTTPBadRequest(text="wait must be a number of seconds, more than 0")

        async def run(emit: Emit) -> dict[str, Any]:
            def event(progress: Any) -> dict[str, Any]:
                return {**dataclasses.asdict(progress), "notice": recovery.waiting()}

            def listener(progress: Any) -> None:
                emit(event(progress))

            recovery.listeners.append(listener)
            try:
                await self._planned(recovery, wait, lambda: emit(event(recovery.progress)))
                if not recovery.planned.is_set():
                    raise RecoveryError(recovery.error or recovery.full)
                await recovery.wait_until(recovery.settled)
                if recovery.full:
                    raise RecoveryError(
                        f"{recovery.full}; recovery is paused, what is stored is served; free "
                        "disk space or raise [store] map_size and restart, then run recover again"
                    )
            finally:
                recovery.listeners.remove(listener)
            result = dataclasses.asdict(recovery.progress)
            result["failed"] = recovery.given_up()
            return result

        return await stream(request, run)

    @staticmethod
    async def _planned(recovery: RecoveryPort, wait: float, remind: Callable[[], None]) -> None:
        """Wait until recovery is planned or stuck, reminding the caller every few seconds of
        what it waits for; a plan still failing after ``wait`` seconds ends it with the reason
        (no member answers, none holds this site's record...), the site looking on meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait

        def done() -> bool:
            return recovery.planned.is_set() or recovery.stuck()

        while not done():
            remind()
            left = deadline - loop.time()
            if left <= 0 and recovery.error:
                raise RecoveryError(
                    f"{recovery.error} (recover waited {wait:g} s; the site keeps looking while "
                    "it runs: run recover again, with a longer --wait if needed)"
                )
            step = RECOVER_NOTICE_EVERY if left <= 0 else min(RECOVER_NOTICE_EVERY, left)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recovery.wait_until(done), step)

    async def scrub(self, request: web.Request) -> web.StreamResponse:
        self._only_self(request)
        fed = self.fed
        repair = request.query.get("repair") == "1"
        total = await asyncio.to_thread(lambda: sum(1 for _ in fed.archive.blobs.hashes()))

        async def run(emit: Emit) -> dict[str, Any]:
            done = 0

            def step(n: int) -> None:
                nonlocal done
                done += n
                emit({"total": total, "checked": done})

            report = await scrub(fed.archive, fed, repair=repair, progress=step)
            self.scrubs.add(report)
            return dataclasses.asdict(report)

        return await stream(request, run)
