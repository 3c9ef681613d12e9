"""``recover`` and ``scrub``: bring a wiped site back, and re-hash (and repair) every blob.

Both drive the site's running node when there is one; otherwise they start the node in this
process for the duration (it serves DICOM meanwhile, so a study asked for during recovery is
fetched on demand), then stop it. "Running" means a process holds the site's lock
(``node.lock``): a ``node.json`` left by a process killed with SIGKILL or by a power loss is
stale, and the command starts the site itself, as the runbook says.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, aclosing
from typing import Any

from p2pacs.cli.common import CommandError, console, open_site, progress_bar
from p2pacs.cli.serve_cmds import ports_taken_message
from p2pacs.const import RECOVER_NOTICE_EVERY, RECOVER_WAIT
from p2pacs.control.client import LocalNode, connect, node_address
from p2pacs.site import Site, SiteRunningError

STARTING_WAIT = 60.0  # seconds to wait for a 'serve' that holds the lock to write node.json

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "recover", help="rebuild this site's archive from the other members (resumable)"
    )
    p.add_argument(
        "--wait",
        type=_seconds,
        default=RECOVER_WAIT,
        metavar="SECONDS",
        help="while a wiped site cannot find its last record (no member answers, or none has "
        f"it), exit 1 saying why after this long (default {RECOVER_WAIT:g})",
    )
    p.set_defaults(func=cmd_recover)
    p = sub.add_parser(
        "scrub", help="re-hash every stored blob; --repair fixes bad ones from peers"
    )
    p.add_argument("--repair", action="store_true", help="replace corrupt blobs from a peer")
    p.set_defaults(func=cmd_scrub)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds more than 0")
    return value


async def _drive(
    site: Site, path: str, params: dict[str, str]
) -> AsyncGenerator[dict[str, Any], None]:
    """Stream a long operation from the running node, starting one here if none runs."""
    async with AsyncExitStack() as stack:
        if not site.config.federation.enabled:
            raise CommandError("this site is not enrolled in a federation", 1)
        lock = site.lock()
        try:
            lock.acquire()
        except SiteRunningError:  # a serve runs (or is starting): drive it
            loop = asyncio.get_running_loop()
            deadline = loop.time() + STARTING_WAIT
            while node_address(site) is None and loop.time() < deadline:
                await asyncio.sleep(0.5)  # the serve holding the lock writes node.json when up
        else:  # nobody runs the site (a node.json left by a killed one is stale): run it here
            stack.callback(lock.release)
            from p2pacs.node import SiteNode

            taken = ports_taken_message(site)
            if taken:
                raise CommandError(taken, 1)
            await stack.enter_async_context(SiteNode(site))
        node: LocalNode = await stack.enter_async_context(connect(site))
        async for event in node.stream(path, **params):
            yield event


def cmd_recover(args: argparse.Namespace) -> int:
    site = open_site(args)

    async def run() -> dict[str, Any]:
        last: dict[str, Any] = {}
        said, said_at = "", 0.0
        loop = asyncio.get_running_loop()
        with progress_bar(transfer=True) as bar:
            task = bar.add_task("recover", total=None)
            # aclosing: a node started here stops inside this task, its sockets closed
            params = {"wait": str(args.wait)}
            async with aclosing(_drive(site, "/v1/recover", params)) as events:
                async for event in events:
                    if event.get("end"):
                        last = event
                        break
                    notice = event.get("notice", "")
                    now = loop.time()
                    if notice and (notice != said or now - said_at >= RECOVER_NOTICE_EVERY):
                        bar.console.print(f"[yellow]waiting:[/] {notice}")
                        said, said_at = notice, now
                    done, total = event["studies_done"], event["studies_total"]
                    bar.update(
                        task,
                        total=event["bytes_total"] or None,
                        completed=event["bytes_done"],
                        description=f"recover {done}/{total} studies",
                    )
        return last

    result = asyncio.run(run())
    if "error" in result:
        raise CommandError(result["error"], 1)
    p = result["result"]
    elapsed = (p["finished"] or p["started"]) - p["started"]
    console.print(
        f"recovered {p['studies_done'] - len(p['failed'])} of {p['studies_total']} studies, "
        f"{p['instances']} instances, {p['bytes_done'] / 1e6:.1f} MB in {max(elapsed, 0):.1f} s"
    )
    for uid, why in p["failed"].items():
        console.print(f"[red]not recovered[/] {uid}: {why}")
    return 1 if p["failed"] else 0


def cmd_scrub(args: argparse.Namespace) -> int:
    site = open_site(args)
    if not site.config.federation.enabled:
        if args.repair:
            raise CommandError("--repair needs a site enrolled in a federation", 2)
        raise CommandError("use 'p2pacs verify' on a site outside a federation", 2)

    async def run() -> dict[str, Any]:
        last: dict[str, Any] = {}
        with progress_bar() as bar:
            task = bar.add_task("scrub", total=None)
            params = {"repair": "1"} if args.repair else {}
            async with aclosing(_drive(site, "/v1/scrub", params)) as events:
                async for event in events:
                    if event.get("end"):
                        last = event
                        break
                    bar.update(task, total=event["total"], completed=event["checked"])
        return last

    result = asyncio.run(run())
    if "error" in result:
        raise CommandError(result["error"], 1)
    r = result["result"]
    console.print(
        f"{r['checked']} blobs checked, {len(r['corrupt'])} corrupt, {len(r['repaired'])} repaired"
    )
    for h, why in r["unrepaired"].items():
        console.print(f"[red]unrepaired[/] {h}: {why}")
    return 1 if r["unrepaired"] else 0
