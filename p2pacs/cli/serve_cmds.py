"""``p2pacs serve``: run the site (archive, DICOM gateway and, once enrolled, the federation)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from p2pacs.cli.common import open_site

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run this site until SIGTERM/SIGINT")
    p.add_argument("--port", type=int, help="DICOM port (overrides the config; 0 picks a free one)")
    p.add_argument("--aet", help="DICOM AE title (overrides the config)")
    p.add_argument("--bind", help="address the DICOM gateway listens on (overrides the config)")
    p.add_argument(
        "--new-site",
        action="store_true",
        help="this enrolled site never held anything: publish its empty catalogue without first "
        "looking for a previous one (only for an empty archive; never after a wipe)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from p2pacs.node import SiteNode

    site = open_site(args)
    if args.port is not None:
        site.config.dicom.port = args.port
    if args.aet:
        site.config.dicom.ae_title = args.aet
    if args.bind:
        site.config.dicom.bind = args.bind

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with SiteNode(site, new_site=args.new_site) as node:
            host, port = node.dicom_address
            print(f"ready {site.config.dicom.ae_title} {host}:{port}", flush=True)
            await stop.wait()
        print("stopped", file=sys.stderr, flush=True)

    asyncio.run(run())
    return 0
