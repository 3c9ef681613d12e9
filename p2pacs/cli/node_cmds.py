"""``status``, ``peers``, ``find`` and ``fetch``: the federation as seen from this site."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from p2pacs.cli.common import CommandError, console, open_site, progress_bar
from p2pacs.control.client import connect, read_runfile
from p2pacs.errors import P2PacsError
from p2pacs.site import Site
from p2pacs.web.view import (
    STATUS_SCHEMA,
    member_rows,
    size,
    status_lines,
    status_warnings,
)

__all__ = ["register"]

WATCH_EVERY = 2.0  # seconds between refreshes of 'status --watch'


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="this site and the federation at a glance")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=WATCH_EVERY,
        default=None,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {WATCH_EVERY:g}) until Ctrl-C",
    )
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("peers", help="known member sites: up or down, last seen, addresses")
    p.set_defaults(func=cmd_peers)
    p = sub.add_parser("find", help="which sites hold a study (from the DHT)")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.set_defaults(func=cmd_find)
    p = sub.add_parser("fetch", help="pull a study from the sites that hold it")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.set_defaults(func=cmd_fetch)


_size = size


async def _status(site: Site) -> dict[str, Any]:
    async with connect(site, timeout=15) as node:
        return dict(await node.get_json("/v1/status"))


def _local_status(site: Site) -> dict[str, Any]:
    patients = studies = instances = blobs = stored = 0
    if site.db_path.exists():  # a wiped site has no archive yet: status never creates one
        with site.archive() as archive:
            patients, studies, instances = archive.index.counts()
            blobs, stored = archive.blobs.totals()
    return {
        "site": site.config.federation.name or site.path.name,
        "running": False,
        "patients": patients,
        "studies": studies,
        "instances": instances,
        "blobs": blobs,
        "bytes": stored,
    }


def _own_transfer_address(site: Site) -> str | None:
    fed = site.config.federation
    return f"{fed.host}:{fed.transfer_port}" if fed.enabled else None


def _gather(site: Site) -> dict[str, Any]:
    """The status JSON: from the running node, else what the stopped site's folder holds."""
    running = read_runfile(site)
    try:
        status = asyncio.run(_status(site))
        status["running"] = True
    except P2PacsError as exc:
        status = _local_status(site)
        status["error"] = str(exc)
    # one schema for machines and people: the JSON fields are documented in operations.md
    status = {"schema": STATUS_SCHEMA, **status}
    if status["running"] and running is not None:
        status["pid"] = running["pid"]
    return status


def _render(site: Site, status: dict[str, Any]) -> Group:
    now = time.time()
    site_host = site.config.federation.host if site.config.federation.enabled else None
    parts: list[RenderableType] = [
        Text.from_markup(line) for line in status_lines(status, site_host, now)
    ]
    warnings = status_warnings(status, site.config.federation.bootstrap)
    for warning in warnings:
        parts.append(Text.from_markup("  [red]warning[/]: ") + Text(warning))
    if warnings:
        parts.append(Text("  run 'p2pacs doctor' for the checks behind these warnings"))
    if status.get("federation"):
        parts.append(_members_table(status, _own_transfer_address(site), now))
    elif "error" in status:
        parts.append(Text(f"  {status['error']}", style="dim"))
    return Group(*parts)


def cmd_status(args: argparse.Namespace) -> int:
    site = open_site(args)
    if args.watch is not None:
        if args.json:
            raise CommandError("--watch shows the human status; leave out --json", 2)
        if not args.watch > 0:
            raise CommandError(f"--watch {args.watch:g}: give a number of seconds above 0", 2)
        return _watch(site, args.watch)
    status = _gather(site)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0 if status["running"] else 1
    console.print(_render(site, status))
    return 0 if status["running"] else 1


def _watch(site: Site, every: float) -> int:
    """Redraw the status every ``every`` seconds in place until Ctrl-C (then exit 0)."""

    def frame() -> Group:
        status = _gather(site)
        stamp = time.strftime("%H:%M:%S")
        note = Text(f"every {every:g} s, Ctrl-C to stop; updated {stamp}", style="dim")
        return Group(_render(site, status), note)

    try:
        with Live(frame(), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(every)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return 0


def _members_table(status: dict[str, Any], own_address: str | None, now: float) -> Table:
    table = Table(title="sites (this site and the members it knows)")
    for col in ("site", "state", "last seen", "address", "studies", "site id"):
        # addresses and ids are folded onto more lines, never cut
        table.add_column(col, overflow="fold", no_wrap=col in ("state", "studies"))
    for row in member_rows(status, own_address, now):
        table.add_row(*row)
    return table


def cmd_peers(args: argparse.Namespace) -> int:
    site = open_site(args)
    status = asyncio.run(_status(site))
    if not status.get("federation"):
        raise CommandError("this site is not enrolled in a federation", 1)
    console.print(_members_table(status, _own_transfer_address(site), time.time()))
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    site = open_site(args)

    async def run() -> dict[str, Any]:
        async with connect(site, timeout=30) as node:
            return dict(await node.get_json("/v1/find", study=args.study_uid))

    found = asyncio.run(run())
    if not found["holders"]:
        console.print(f"no site holds study {args.study_uid}")
        return 1
    table = Table(title=f"study {args.study_uid}")
    for col in ("site", "state", "instances", "size", "site id"):
        table.add_column(col, overflow="fold")
    for h in found["holders"]:
        table.add_row(
            h["name"],
            "[green]up[/]" if h["up"] else "[red]down[/]",
            str(h["instances"]),
            _size(h["bytes"]),
            h["site_id"][:16],
        )
    console.print(table)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    site = open_site(args)

    async def run() -> dict[str, Any]:
        result: dict[str, Any] = {}
        async with connect(site) as node:
            with progress_bar(transfer=True) as bar:
                task = bar.add_task(f"fetch {args.study_uid[-24:]}", total=None)
                async for event in node.stream("/v1/fetch", study=args.study_uid):
                    if event.get("end"):
                        result = event
                    else:
                        bar.update(task, total=event["bytes_total"] or None,
                                   completed=event["bytes_done"])  # fmt: skip
        return result

    result = asyncio.run(run())
    if "error" in result:
        raise CommandError(result["error"], 1)
    fetched = result["result"]
    console.print(
        f"{fetched['instances']} instances stored ({_size(fetched['bytes'])} fetched)"
        + (f", [red]{len(fetched['failed'])} failed[/]" if fetched["failed"] else "")
    )
    return 1 if fetched["failed"] else 0
