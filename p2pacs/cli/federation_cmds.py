"""``federation create`` and ``site enroll``: make a federation and its member sites."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from p2pacs import const
from p2pacs.cli.common import CommandError, console
from p2pacs.federation.identity import create_federation_dir, enroll_site, federation_info

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fed = sub.add_parser("federation", help="create a federation (CA and secret)")
    fed_sub = fed.add_subparsers(dest="federation_command", metavar="ACTION", required=True)
    p = fed_sub.add_parser("create", help="create a federation CA and secret in a new folder")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--name", default="p2pacs", help="federation name (default: p2pacs)")
    p.set_defaults(func=cmd_federation_create)

    site = sub.add_parser("site", help="enroll a site in a federation")
    site_sub = site.add_subparsers(dest="site_command", metavar="ACTION", required=True)
    p = site_sub.add_parser("enroll", help="issue a site identity and write its config")
    p.add_argument("--federation", type=Path, required=True, metavar="DIR")
    p.add_argument("--name", required=True, help="site name, e.g. clinic-a")
    p.add_argument("--out", type=Path, required=True, metavar="SITE_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address other sites use to reach it")
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    p.add_argument("--aet", help="DICOM AE title of the gateway")
    p.add_argument("--dicom-port", type=int, default=const.DEFAULT_DICOM_PORT)
    p.add_argument("--dht-port", type=int, default=const.DEFAULT_DHT_PORT)
    p.add_argument("--transfer-port", type=int, default=const.DEFAULT_TRANSFER_PORT)
    p.add_argument(
        "--bootstrap", action="append", default=[], metavar="HOST:PORT", help="DHT peer (repeat)"
    )
    p.add_argument(
        "--destination",
        action="append",
        default=[],
        metavar="AE=HOST:PORT",
        help="C-MOVE destination, e.g. the site's PACS (repeat)",
    )
    p.add_argument("--replication", type=int, help=f"R (default {const.DEFAULT_REPLICATION})")
    p.add_argument("--no-discovery", action="store_true", help="no mDNS announce/browse")
    p.set_defaults(func=cmd_site_enroll)


def cmd_federation_create(args: argparse.Namespace) -> int:
    out = create_federation_dir(args.out, args.name)
    info = federation_info(out)
    table = Table(title=f"federation {info['name']}", show_header=False)
    table.add_row("folder", str(out))
    table.add_row("fingerprint", info["fingerprint"])
    table.add_row("ca.key", "CA private key (0600): keep it offline, needed only to enroll")
    table.add_row("secret", "federation secret (0600): copied into every site's identity")
    console.print(table)
    return 0


def cmd_site_enroll(args: argparse.Namespace) -> int:
    destinations = {}
    for item in args.destination:
        ae, sep, addr = item.partition("=")
        if not sep:
            raise CommandError(f"--destination {item!r}: expected AE=HOST:PORT")
        destinations[ae] = addr
    site = enroll_site(
        args.federation,
        args.name,
        args.out,
        host=args.host,
        bind=args.bind,
        aet=args.aet,
        dicom_port=args.dicom_port,
        dht_port=args.dht_port,
        transfer_port=args.transfer_port,
        bootstrap=args.bootstrap,
        destinations=destinations,
        replication=args.replication,
        discovery=not args.no_discovery,
    )
    cfg = site.config
    table = Table(title=f"site {args.name} enrolled", show_header=False)
    table.add_row("site folder", str(site.path))
    table.add_row("identity", f"{site.identity_path} (back it up off-site)")
    table.add_row("DICOM", f"{cfg.dicom.ae_title} on port {cfg.dicom.port}")
    table.add_row("transfer (TCP)", str(cfg.federation.transfer_port))
    table.add_row("DHT (UDP)", str(cfg.federation.dht_port))
    table.add_row("bootstrap", ", ".join(cfg.federation.bootstrap) or "mDNS only")
    table.add_row("replication", str(cfg.federation.replication))
    console.print(table)
    return 0
