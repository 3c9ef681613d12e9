"""How long a wiped site's event loop stalls when its recovery queue starts draining.

A wiped site's queue lists every study it held (200,000 at S = 10, N = 1 M). ``Recovery.drain``
used to sort the queue on the event loop and create one task per study, all waiting on a
semaphore of ``STUDIES_AT_ONCE``: creating and first-stepping them runs in one turn of the loop.
It now sorts a snapshot off the loop and runs ``STUDIES_AT_ONCE`` workers that take the next
study in turn. Both scheduling patterns run here on the same queue, with a fetch that only
yields (the network is not what is measured), and a ticking probe measures the loop's worst
lateness and the time until the first study starts. The last line is JSON with the ratios.

    python bench/recovery_drain_start.py             # 200,000 studies, 3 rounds
    python bench/recovery_drain_start.py --studies 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pacs.federation.catalogue import CatalogueEntry, newest_first
from p2pacs.healing.recovery import STUDIES_AT_ONCE

Queue = dict[str, CatalogueEntry]


async def one_task_per_study(queue: Queue, started: asyncio.Event) -> None:
    """The previous ``drain``: sorted on the loop, a task per study behind a semaphore."""
    order = newest_first(queue.values())
    slots = asyncio.Semaphore(STUDIES_AT_ONCE)

    async def one(entry: CatalogueEntry) -> None:
        async with slots:
            started.set()
            await asyncio.sleep(0.001)

    await asyncio.gather(*(one(e) for e in order))


async def workers(queue: Queue, started: asyncio.Event) -> None:
    """The current ``drain``: a snapshot sorted off the loop, ``STUDIES_AT_ONCE`` workers."""
    entries = await asyncio.to_thread(newest_first, list(queue.values()))
    order = iter(entries)

    async def worker() -> None:
        for _entry in order:
            started.set()
            await asyncio.sleep(0.001)

    async with asyncio.TaskGroup() as tg:
        for _ in range(STUDIES_AT_ONCE):
            tg.create_task(worker())


async def measure(
    queue: Queue, drain: Callable[[Queue, asyncio.Event], Coroutine[None, None, None]]
) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    stop, started = asyncio.Event(), asyncio.Event()

    async def probe() -> float:
        worst = 0.0
        while not stop.is_set():
            due = loop.time() + 0.005
            await asyncio.sleep(0.005)
            worst = max(worst, loop.time() - due)
        return worst

    ticking = asyncio.create_task(probe())
    await asyncio.sleep(0.05)
    t = time.perf_counter()
    running = asyncio.create_task(drain(queue, started))
    await started.wait()
    first = time.perf_counter() - t
    await asyncio.sleep(0.5)
    stop.set()
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    return first, await ticking


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--studies", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    queue = {
        uid: CatalogueEntry(
            uid, f"{i:064x}", f"20{10 + i % 16}{1 + i % 12:02d}01", 30, 10, float(i)
        )
        for i in range(args.studies)
        for uid in (f"1.2.826.0.1.3680043.10.5.{i}",)
    }
    out: dict[str, dict[str, list[float]]] = {"one_task_per_study": {}, "workers": {}}
    for _ in range(args.rounds):  # alternated, so the machine's other load hits both alike
        for name, drain in (("one_task_per_study", one_task_per_study), ("workers", workers)):
            first, lag = asyncio.run(measure(queue, drain))
            out[name].setdefault("first_study_ms", []).append(round(first * 1000, 1))
            out[name].setdefault("loop_lag_ms", []).append(round(lag * 1000, 1))
            print(json.dumps({"pattern": name, "first_study_ms": round(first * 1000, 1),
                              "loop_lag_ms": round(lag * 1000, 1)}), flush=True)  # fmt: skip
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in out.items()}
    old, new = med["one_task_per_study"], med["workers"]
    report = {
        "studies": args.studies,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "median": med,
        "loop_lag_ratio_old_vs_new": round(old["loop_lag_ms"] / max(new["loop_lag_ms"], 0.1), 1),
        "first_study_ratio_old_vs_new": round(
            old["first_study_ms"] / max(new["first_study_ms"], 0.1), 1
        ),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
