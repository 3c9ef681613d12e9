"""How long the site's event loop was kept from running: a tick that measures its own lateness.

Nothing that walks the archive may run on the event loop (heartbeats, DHT answers and every
peer request wait behind it); this probe makes a violation visible in ``status`` and in tests,
as the worst lateness since start and over the last minute.

Work moved off the loop can still stop it: a thread that allocates hundreds of thousands of
objects (a catalogue listed, a tree compared) triggers full collections of the cyclic garbage
collector, which walk every object of the process holding the GIL (measured: 0.4-0.5 s while
listing 200,000 catalogue entries, 8 ms without). ``bulk()`` keeps the collector off while such
work runs; what it allocates is freed by reference counting as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Iterator

__all__ = ["LoopLag", "bulk"]

TICK = 0.05  # seconds between ticks: lateness below this is not worth reporting
WINDOW = 60.0  # seconds over which ``recent_ms`` is the worst lateness


class LoopLag:
    def __init__(self) -> None:
        self.worst = 0.0  # seconds, since start
        self._recent: list[tuple[float, float]] = []  # (when, lateness) above one tick
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + TICK
            await asyncio.sleep(TICK)
            late = max(0.0, loop.time() - due)
            self.worst = max(self.worst, late)
            if late > TICK:
                now = time.monotonic()
                self._recent = [(t, v) for t, v in self._recent if now - t < WINDOW]
                self._recent.append((now, late))

    def snapshot(self) -> dict[str, float]:
        now = time.monotonic()
        recent = max((v for t, v in self._recent if now - t < WINDOW), default=0.0)
        return {"max_ms": round(1000 * self.worst, 1), "recent_ms": round(1000 * recent, 1)}


class _Bulk:
    """Counts the bulk jobs running: the collector comes back when the last one ends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0


_BULK = _Bulk()


@contextlib.contextmanager
def bulk() -> Iterator[None]:
    """No cyclic garbage collection while bulk work runs on any thread (nested and
    concurrent uses are counted)."""
    with _BULK.lock:
        _BULK.running += 1
        gc.disable()
    try:
        yield
    finally:
        with _BULK.lock:
            _BULK.running -= 1
            if _BULK.running == 0:
                gc.enable()
