"""``p2pacs serve``: run the site (archive, DICOM gateway and, once enrolled, the federation).

One process runs a site: ``serve`` holds the site's lock (``node.lock``) for as long as it runs,
so a second ``serve`` on the same folder says which pid runs it instead of fighting over the
ports. Before it listens, every port is checked, and a taken one is named with the setting that
moves it (``p2pacs config set dicom.port N``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from dht.errors import DhtError
from p2pacs.cli.common import CommandError, open_site
from p2pacs.doctor import busy_ports
from p2pacs.errors import P2PacsError
from p2pacs.site import Site, SiteRunningError

__all__ = ["ports_taken_message", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run this site until SIGTERM/SIGINT")
    p.add_argument(
        "--port", type=int, help="DICOM port for this run (overrides dicom.port; 0: any free one)"
    )
    p.add_argument("--aet", help="DICOM AE title (overrides the config)")
    p.add_argument("--bind", help="address the DICOM gateway listens on (overrides the config)")
    p.add_argument(
        "--new-site",
        action="store_true",
        help="this enrolled site never held anything: publish its empty catalogue without first "
        "looking for a previous one (only for an empty archive; never after a wipe)",
    )
    p.set_defaults(func=cmd_serve)


def ports_taken_message(site: Site) -> str | None:
    """What to tell the operator when some of the site's ports are taken, or None."""
    busy = busy_ports(site)
    if not busy:
        return None
    lines = [
        f"{what} is in use (by another program, or another site on this host): "
        f"change it with 'p2pacs --site {site.path} config set {setting} N'"
        for what, _host, _port, setting in busy
    ]
    return "\n  ".join(lines) + (
        "\n  several sites on one host need a port each: see 'site enroll --port-base' in "
        "the README"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from p2pacs.node import SiteNode

    site = open_site(args)
    if args.port is not None:
        if not 0 <= args.port < 65536:
            raise CommandError(f"--port {args.port} is not a port (0-65535)")
        site.config.dicom.port = args.port
    if args.aet:
        site.config.dicom.ae_title = args.aet
    if args.bind:
        site.config.dicom.bind = args.bind
    lock = site.lock()
    try:
        lock.acquire()
    except SiteRunningError as exc:
        raise CommandError(str(exc), 1) from None
    try:
        taken = ports_taken_message(site)
        if taken:
            raise CommandError(taken, 1)

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

        try:
            asyncio.run(run())
        except (P2PacsError, DhtError) as exc:
            # a port taken between the check and the listen: name the setting all the same
            taken = ports_taken_message(site)
            if taken:
                raise CommandError(f"{exc}. {taken}", 1) from None
            raise
    finally:
        lock.release()
    return 0
