"""``status``, ``peers``, ``find`` and ``fetch``: the federation as seen from this site."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from rich.table import Table

from p2pacs.cli.common import CommandError, console, open_site, progress_bar
from p2pacs.control.client import connect
from p2pacs.errors import P2PacsError
from p2pacs.site import Site

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="this site and the federation at a glance")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("peers", help="known member sites: up or down, last seen, addresses")
    p.set_defaults(func=cmd_peers)
    p = sub.add_parser("find", help="which sites hold a study (from the DHT)")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.set_defaults(func=cmd_find)
    p = sub.add_parser("fetch", help="pull a study from the sites that hold it")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.set_defaults(func=cmd_fetch)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


async def _status(site: Site) -> dict[str, Any]:
    async with connect(site, timeout=15) as node:
        return dict(await node.get_json("/v1/status"))


def _local_status(site: Site) -> dict[str, Any]:
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


def cmd_status(args: argparse.Namespace) -> int:
    site = open_site(args, create=False)
    try:
        status = asyncio.run(_status(site))
        status["running"] = True
    except P2PacsError as exc:
        status = _local_status(site)
        status["error"] = str(exc)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0 if status["running"] else 1
    running = "[green]running[/]" if status["running"] else "[red]not running[/]"
    console.print(f"[bold]{status['site']}[/] {running}")
    console.print(
        f"  {status['studies']} studies, {status['instances']} instances, "
        f"{status['blobs']} blobs, {_size(status['bytes'])}"
    )
    fed = status.get("federation")
    if fed:
        console.print(
            f"  federation: {fed['sites_up']} sites up, {fed['sites_down']} down; "
            f"R={fed['replication']}, under-replicated studies: {fed['under_replicated']}"
        )
        last = fed["last_repair"]
        console.print(
            f"  repairs: {fed['pulls_done']} done, {fed['pulls_failed']} failed, last "
            + (f"{time.time() - last:.0f} s ago" if last else "never")
        )
        clock = fed["clock"]
        if clock["off"]:
            console.print(
                f"  [red]clock off[/]: the members' clocks differ from this one by "
                f"{clock['offset_s']:+.0f} s (beyond the DHT's 30 s window): check NTP"
            )
        rec = fed["recovery"]
        if rec["awaiting_record"]:
            console.print(
                "  [red]awaiting its last site record[/]: this archive was wiped; it publishes "
                f"no catalogue until a member answers ({rec['error'] or 'looking'})"
            )
        if fed["recovery_pending"]:
            console.print(
                f"  [yellow]recovering[/]: {fed['recovery_pending']} studies left "
                f"({_size(rec['bytes_done'])} of {_size(rec['bytes_total'])}), "
                f"{rec['retrying']} retrying"
            )
        for uid, why in rec["given_up"].items():
            console.print(f"  [red]not recovered[/] {uid}: {why}")
        _members_table(fed["members"])
    elif "error" in status:
        console.print(f"  [dim]{status['error']}[/]")
    return 0 if status["running"] else 1


def _members_table(members: list[dict[str, Any]]) -> None:
    table = Table(title="member sites")
    for col in ("site", "state", "last seen", "address", "studies", "site id"):
        table.add_column(col)
    for m in members:
        state = "[green]up[/]" if m["up"] else "[red]down[/]"
        seen = f"{m['last_seen_s']:.0f} s ago" if m["last_seen_s"] is not None else "never"
        table.add_row(m["name"], state, seen, m["address"], str(m["studies"]), m["site_id"][:16])
    console.print(table)


def cmd_peers(args: argparse.Namespace) -> int:
    site = open_site(args, create=False)
    status = asyncio.run(_status(site))
    fed = status.get("federation")
    if not fed:
        raise CommandError("this site is not enrolled in a federation", 1)
    _members_table(fed["members"])
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    site = open_site(args, create=False)

    async def run() -> dict[str, Any]:
        async with connect(site, timeout=30) as node:
            return dict(await node.get_json("/v1/find", study=args.study_uid))

    found = asyncio.run(run())
    if not found["holders"]:
        console.print(f"no site holds study {args.study_uid}")
        return 1
    table = Table(title=f"study {args.study_uid}")
    for col in ("site", "state", "instances", "size", "site id"):
        table.add_column(col)
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
    site = open_site(args, create=False)

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
