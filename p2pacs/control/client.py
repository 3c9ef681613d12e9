"""The command line's connection to its own site's running node, over the site's mutual TLS.

``p2pacs serve`` writes ``node.json`` (its pid and ports) in the site directory; commands that
need the live federation (status, peers, find, fetch, recover, scrub) connect there with the
site's own certificate, and the node answers them on routes that only accept its own identity.

A ``node.json`` left behind by a process that died without stopping (SIGKILL, power loss) is
stale: the node counts as running only while its pid is alive and it holds the site's lock
(``node.lock``), or when it runs in this very process (a node started in-process).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from p2pacs.control.stream import iter_lines
from p2pacs.errors import PeerUnavailableError
from p2pacs.federation.identity import load_identity
from p2pacs.site import Site, lock_held
from p2pacs.transfer.tls import client_context

__all__ = ["RUNFILE", "LocalNode", "connect", "node_address", "pid_alive", "read_runfile"]

RUNFILE = "node.json"  # in the site directory while ``serve`` runs: its pid and ports


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (``kill(pid, 0)``; EPERM means it does)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_runfile(site: Site) -> dict[str, Any] | None:
    """The running node's ``node.json`` (pid, ports), or None when no live node wrote it."""
    try:
        info = json.loads((site.path / RUNFILE).read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(info, dict):
        return None
    if pid == os.getpid():  # a node started in this process (recover, scrub, tests)
        return info
    if not pid_alive(pid) or not lock_held(site.path):  # stale: killed, or power lost
        return None
    return info


def node_address(site: Site) -> tuple[int, str] | None:
    """(pid, https base URL) of the site's running node, or None when it is not running."""
    info = read_runfile(site)
    if info is None:
        return None
    try:
        host, port = str(info["transfer"][0]), int(info["transfer"][1])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return int(info["pid"]), f"https://{host}:{port}"


class LocalNode:
    def __init__(self, session: aiohttp.ClientSession, base: str):
        self.session = session
        self.base = base

    async def get_json(self, path: str, **params: str) -> Any:
        async with self.session.get(self.base + path, params=params) as resp:
            if resp.status != 200:
                raise PeerUnavailableError(f"{path}: the node answered {resp.status}")
            return await resp.json()

    async def stream(self, path: str, **params: str) -> AsyncIterator[dict[str, Any]]:
        async with self.session.post(self.base + path, params=params) as resp:
            if resp.status != 200:
                raise PeerUnavailableError(f"{path}: the node answered {resp.status}")
            async for event in iter_lines(resp.content.iter_any()):
                yield event


@asynccontextmanager
async def connect(site: Site, timeout: float | None = None) -> AsyncIterator[LocalNode]:
    found = node_address(site)
    if found is None:
        raise PeerUnavailableError(
            f"the site at {site.path} is not running; "
            f"start it with 'p2pacs --site {site.path} serve'"
        )
    identity, federation = load_identity(site)
    connector = aiohttp.TCPConnector(ssl=client_context(identity, federation))
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
            yield LocalNode(session, found[1])
    except aiohttp.ClientError as exc:
        raise PeerUnavailableError(f"cannot reach the running node at {found[1]}: {exc}") from exc
