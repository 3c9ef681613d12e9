"""The federation's peer routes on the transfer server (mutual TLS: every caller is a member).

Members call ``/v1/site`` (heartbeat: the site record, its signed form and the clock),
``/v1/sites/{site_id}/record`` (the signed site records every member keeps of every other) and
``/v1/catalogue`` (copy this new catalogue) and ``/v1/search`` (a federation-wide DICOMweb
search: answer from this site's index). The operator's routes (status, recover, scrub...)
are the site's control plane, ``p2pacs.control``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from p2pacs.errors import P2PacsError
from p2pacs.federation.search import find_rows, parse_find
from p2pacs.transfer.client import Peer
from p2pacs.transfer.server import PEER_SITE_ID

if TYPE_CHECKING:
    from p2pacs.federation.node import FederationNode

__all__ = ["caller", "install_peer_routes"]

log = logging.getLogger(__name__)


def caller(request: web.Request) -> bytes | None:
    """The site_id proven by the caller's certificate (mutual TLS)."""
    peer = request.get(PEER_SITE_ID)
    return bytes(peer) if peer is not None else None


def _site_id(request: web.Request) -> bytes:
    try:
        site_id = bytes.fromhex(request.match_info["site"])
    except ValueError:
        site_id = b""
    if len(site_id) != 20:
        raise web.HTTPBadRequest(text="expected a 40-hex-digit site id")
    return site_id


class _PeerRoutes:
    def __init__(self, fed: FederationNode):
        self.fed = fed

    async def site(self, request: web.Request) -> web.Response:
        signed = self.fed.signed_site_record()
        body = {
            **dataclasses.asdict(self.fed.site_record()),
            "signed": signed.hex() if signed else "",
            "time": time.time(),  # the caller compares clocks (the DHT drops skewed datagrams)
        }
        return web.json_response(body)

    async def signed_record(self, request: web.Request) -> web.Response:
        """The latest signed ``site/<id>`` record this site keeps of a member ("" if none)."""
        site_id = _site_id(request)
        raw = self.fed.signed_site_record() if site_id == self.fed.site_id else None
        raw = raw or self.fed.members.signed_record(site_id)
        return web.json_response({"record": raw.hex() if raw else ""})

    async def keep_record(self, request: web.Request) -> web.Response:
        """A member's newly signed site record: keep it (it is verified, never trusted)."""
        site_id = _site_id(request)
        try:
            raw = bytes.fromhex(str((await request.json())["record"]))
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='expected {"record": HEX}') from None
        return web.json_response({"kept": self.fed.keep_signed(site_id, raw)})

    async def catalogue(self, request: web.Request) -> web.Response:
        """A member published a new catalogue: copy it from that member before answering."""
        fed = self.fed
        try:
            body = await request.json()
            h = str(body["hash"])
            bytes.fromhex(h)
            port = int(body.get("port") or 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise web.HTTPBadRequest(text='expected {"hash": HEX, "port": N}') from None
        site_id = caller(request) or b""
        member = fed.members.get(site_id)
        if member is not None:
            peers = [fed.peer_of(member)]
        elif site_id and request.remote and 0 < port < 65536:
            # a site we have not met yet (its first publication): copy from where it called
            # from; the TLS handshake proves the server there is that site
            peers = [Peer(site_id, site_id.hex()[:12], request.remote, port)]
        else:
            peers = fed.live_peers()
        if not site_id:
            raise web.HTTPBadRequest(text="the caller's site is unknown")
        try:
            await fed.copy_catalogue(site_id, h, peers)
        except P2PacsError as exc:
            log.info("could not copy catalogue %s of %s: %s", h[:16], site_id.hex()[:12], exc)
            raise web.HTTPBadGateway(text=str(exc)) from None
        return web.json_response({"stored": h})

    async def search(self, request: web.Request) -> web.Response:
        """A member's federated search (DICOMweb ``federation=true``): answered from this
        site's own index only."""
        try:
            level, query, limit = parse_find(await request.json())
        except ValueError as exc:  # json.JSONDecodeError is one
            raise web.HTTPBadRequest(text=f"bad find request: {exc}") from None
        try:
            rows = await asyncio.to_thread(find_rows, self.fed.archive, level, query, limit)
        except P2PacsError as exc:
            log.error("federated search from a member failed: %s", exc)
            raise web.HTTPInternalServerError(text=f"the index could not be read: {exc}") from None
        ae_title = self.fed.site.config.dicom.ae_title
        return web.json_response({"site": self.fed.name, "ae_title": ae_title, "rows": rows})


def install_peer_routes(fed: FederationNode, app: web.Application) -> None:
    routes = _PeerRoutes(fed)
    app.router.add_get("/v1/site", routes.site)
    app.router.add_get("/v1/sites/{site}/record", routes.signed_record)
    app.router.add_post("/v1/sites/{site}/record", routes.keep_record)
    app.router.add_post("/v1/catalogue", routes.catalogue)
    app.router.add_post("/v1/search", routes.search)
