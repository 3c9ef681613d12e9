"""NDJSON streams of long operations: the node side (``stream``) and the CLI side
(``iter_lines``). Progress is sampled: a slow reader sees the newest event, never a backlog."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from p2pacs.errors import P2PacsError

__all__ = ["Emit", "iter_lines", "stream"]

Emit = Callable[[dict[str, Any]], None]


async def stream(
    request: web.Request, run: Callable[[Emit], Awaitable[dict[str, Any]]]
) -> web.StreamResponse:
    """Run ``run(emit)`` and stream every emitted event as a JSON line, then the result (or
    ``{"end": true, "error": ...}`` for a ``P2PacsError``)."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1)

    def emit(event: dict[str, Any]) -> None:
        if queue.empty():
            queue.put_nowait(event)

    async def runner() -> dict[str, Any]:
        try:
            return {"end": True, "result": await run(emit)}
        except P2PacsError as exc:
            return {"end": True, "error": str(exc)}

    task = asyncio.create_task(runner())
    try:
        while not task.done():
            getter = asyncio.create_task(queue.get())
            finished, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                await response.write(json.dumps(getter.result()).encode() + b"\n")
            else:
                getter.cancel()
    finally:
        if not task.done():  # the client went away: stop the work it asked for
            task.cancel()
    await response.write(json.dumps(task.result(), default=str).encode() + b"\n")
    await response.write_eof()
    return response


async def iter_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Parse an NDJSON byte stream into objects (the CLI side of ``stream``)."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
