"""Federation routes on the transfer server (mutual TLS: every caller is a member).

Peers use ``/v1/site`` (heartbeat) and ``/v1/notify`` (copy these studies). The site's own
command line, which connects with the site's own certificate, drives the running node through
``/v1/status``, ``/v1/find``, ``/v1/fetch``, ``/v1/recover`` and ``/v1/scrub``; those answer only
to the site itself. Long operations stream one JSON object per line so the CLI can draw progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from p2pacs.errors import P2PacsError, RecoveryError
from p2pacs.transfer.server import PEER_SITE_ID

if TYPE_CHECKING:
    from p2pacs.node import SiteNode

__all__ = ["install_routes"]

log = logging.getLogger(__name__)

MAX_NOTIFY_STUDIES = 10_000  # per request; a peer cannot queue unbounded work in one call


def _peer(request: web.Request) -> bytes | None:
    peer = request.get(PEER_SITE_ID)
    return bytes(peer) if peer is not None else None


def _only_self(node: SiteNode, request: web.Request) -> None:
    fed = node.federation
    assert fed is not None
    if _peer(request) != fed.site_id:
        raise web.HTTPForbidden(text="only this site's own identity may drive it")


async def _stream(
    request: web.Request, run: Callable[[Callable[[dict[str, Any]], None]], Any]
) -> web.StreamResponse:
    """Run ``run(emit)`` and stream every emitted event as a JSON line, then the result."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=1)

    def emit(event: dict[str, Any]) -> None:
        if queue.empty():  # progress is sampled: the newest event replaces nothing pending
            queue.put_nowait(event)

    async def runner() -> dict[str, Any]:
        try:
            return {"end": True, "result": await run(emit)}
        except P2PacsError as exc:
            return {"end": True, "error": str(exc)}

    task = asyncio.create_task(runner())
    while not task.done():
        getter = asyncio.create_task(queue.get())
        finished, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
        if getter in finished:
            event = getter.result()
            if event is not None:
                await response.write(json.dumps(event).encode() + b"\n")
        else:
            getter.cancel()
    await response.write(json.dumps(task.result(), default=str).encode() + b"\n")
    await response.write_eof()
    return response


def install_routes(node: SiteNode) -> Callable[[web.Application], None]:
    async def site(request: web.Request) -> web.Response:
        fed = node.federation
        assert fed is not None
        signed = fed.signed_site_record()
        body = {
            **dataclasses.asdict(fed.site_record()),
            "signed": signed.hex() if signed else "",
            "time": time.time(),  # the caller compares clocks (the DHT drops skewed datagrams)
        }
        return web.json_response(body)

    def _site_id(request: web.Request) -> bytes:
        try:
            site_id = bytes.fromhex(request.match_info["site"])
        except ValueError:
            site_id = b""
        if len(site_id) != 20:
            raise web.HTTPBadRequest(text="expected a 40-hex-digit site id")
        return site_id

    async def signed_record(request: web.Request) -> web.Response:
        """The latest signed ``site/<id>`` record this site keeps of a member ("" if none)."""
        fed = node.federation
        assert fed is not None
        site_id = _site_id(request)
        raw = fed.signed_site_record() if site_id == fed.site_id else None
        raw = raw or fed.members.signed_record(site_id)
        return web.json_response({"record": raw.hex() if raw else ""})

    async def keep_record(request: web.Request) -> web.Response:
        """A member's newly signed site record: keep it (it is verified, never trusted)."""
        fed = node.federation
        assert fed is not None
        site_id = _site_id(request)
        try:
            raw = bytes.fromhex(str((await request.json())["record"]))
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='expected {"record": HEX}') from None
        return web.json_response({"kept": fed.keep_signed(site_id, raw)})

    async def notify(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            studies = [str(s) for s in body["studies"]][:MAX_NOTIFY_STUDIES]
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='expected {"studies": [UID, ...]}') from None
        assert node.healer is not None
        queued = sum(1 for uid in studies if node.healer.request(uid))
        return web.json_response({"queued": queued}, status=202)

    async def catalogue(request: web.Request) -> web.Response:
        """A member published a new catalogue: copy it from that member before answering."""
        fed = node.federation
        assert fed is not None
        try:
            h = str((await request.json())["hash"])
            bytes.fromhex(h)
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='expected {"hash": HEX}') from None
        sender = fed.members.get(_peer(request) or b"")
        peers = [fed.peer_of(sender)] if sender else fed.live_peers()
        try:
            await fed.fetch_blob(h, None, peers)
        except P2PacsError as exc:
            raise web.HTTPBadGateway(text=str(exc)) from None
        return web.json_response({"stored": h})

    async def status(request: web.Request) -> web.Response:
        _only_self(node, request)
        return web.json_response(await node.status())

    async def find(request: web.Request) -> web.Response:
        _only_self(node, request)
        fed = node.federation
        assert fed is not None
        uid = request.query.get("study", "")
        holders = await fed.holders(uid)
        rows = [
            {
                "site_id": h.site_id.hex(),
                "name": h.name,
                "up": h.up,
                "instances": h.holding.instances,
                "bytes": h.holding.size,
                "manifest": h.holding.manifest_hash,
            }
            for h in holders
        ]
        if fed.held(uid):
            record = fed.archive.index.study(uid)
            assert record is not None
            rows.insert(
                0,
                {
                    "site_id": fed.site_hex,
                    "name": f"{fed.name} (this site)",
                    "up": True,
                    "instances": record.instances,
                    "bytes": record.bytes,
                    "manifest": getattr(fed.publisher.entries.get(uid), "manifest_hash", ""),
                },
            )
        return web.json_response({"study": uid, "holders": rows})

    async def fetch(request: web.Request) -> web.StreamResponse:
        _only_self(node, request)
        fed = node.federation
        assert fed is not None
        uid = request.query.get("study", "")

        async def run(emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
            holders = await fed.holders(uid)
            total = max((h.holding.size for h in holders), default=0)
            emit({"bytes_total": total, "bytes_done": 0})
            result = await fed.fetch_study(
                uid, progress=lambda done: emit({"bytes_total": total, "bytes_done": done})
            )
            return dataclasses.asdict(result)

        return await _stream(request, run)

    async def recover(request: web.Request) -> web.StreamResponse:
        _only_self(node, request)
        recovery = node.recovery
        assert recovery is not None

        async def run(emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
            def listener(p: Any) -> None:
                emit(dataclasses.asdict(p))

            recovery.listeners.append(listener)
            try:
                await _until(recovery.changed, lambda: recovery.planned.is_set() or _stuck())
                if not recovery.planned.is_set():
                    raise RecoveryError(recovery.error)
                await _until(recovery.changed, recovery.settled)
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

        def _stuck() -> bool:
            """Planning has failed for longer than the give-up time: report why."""
            since = recovery.error_since
            late = bool(recovery.error) and time.time() - since >= recovery.give_up
            return late or bool(recovery.full)

        return await _stream(request, run)

    async def scrub(request: web.Request) -> web.StreamResponse:
        _only_self(node, request)
        from p2pacs.healing.scrub import scrub as run_scrub

        fed = node.federation
        assert fed is not None
        repair = request.query.get("repair") == "1"
        total = sum(1 for _ in fed.archive.blobs.hashes())

        async def run(emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
            done = 0

            def step(n: int) -> None:
                nonlocal done
                done += n
                emit({"total": total, "checked": done})

            report = await run_scrub(fed.archive, fed, repair=repair, progress=step)
            return dataclasses.asdict(report)

        return await _stream(request, run)

    def install(app: web.Application) -> None:
        app.router.add_get("/v1/site", site)
        app.router.add_get("/v1/sites/{site}/record", signed_record)
        app.router.add_post("/v1/sites/{site}/record", keep_record)
        app.router.add_post("/v1/notify", notify)
        app.router.add_post("/v1/catalogue", catalogue)
        app.router.add_get("/v1/status", status)
        app.router.add_get("/v1/find", find)
        app.router.add_post("/v1/fetch", fetch)
        app.router.add_post("/v1/recover", recover)
        app.router.add_post("/v1/scrub", scrub)

    return install


async def _until(changed: asyncio.Event, done: Callable[[], bool]) -> None:
    """Wait until ``done()``, woken by ``changed`` (and at least every second, for deadlines
    that pass without an event)."""
    while not done():
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), 1.0)


async def iter_lines(stream: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Parse an NDJSON byte stream into objects (the CLI side of ``_stream``)."""
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
