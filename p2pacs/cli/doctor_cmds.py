"""``p2pacs doctor``: a table of what is right and wrong with this site (``p2pacs.doctor``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json

from rich.table import Table

from p2pacs.cli.common import console, open_site
from p2pacs.doctor import failed, run_checks

__all__ = ["register"]

_STYLE = {
    "ok": "[green]ok[/]",
    "warn": "[yellow]warn[/]",
    "fail": "[red]FAIL[/]",
    "skip": "[dim]-[/]",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="check ports, identity, disk, bootstrap and members, clock, C-MOVE destinations",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    site = open_site(args)
    checks, _status = asyncio.run(run_checks(site))
    bad = failed(checks)
    if args.json:
        print(
            json.dumps(
                {"schema": 1, "ok": not bad, "checks": [dataclasses.asdict(c) for c in checks]},
                indent=2,
            )
        )
        return 1 if bad else 0
    table = Table(title=f"p2pacs doctor: {site.path}")
    table.add_column("check", overflow="fold")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(c.name, _STYLE.get(c.verdict, c.verdict), c.detail)
    console.print(table)
    fails = sum(c.verdict == "fail" for c in checks)
    warns = sum(c.verdict == "warn" for c in checks)
    console.print(f"{fails} failed, {warns} warning(s)" if fails or warns else "every check passed")
    return 1 if bad else 0
