"""``federation create`` and ``site enroll``: make a federation and its member sites.

``site enroll --port-base N`` gives a site the three ports N (DICOM), N+1 (peer transfer, TCP)
and N+2 (DHT, UDP), so several sites can share one host; an explicit ``--dicom-port``,
``--transfer-port`` or ``--dht-port`` wins over the base for its own port.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from p2pacs import const
from p2pacs.cli.common import CommandError, console
from p2pacs.config import PORT_SETTINGS
from p2pacs.federation.identity import create_federation_dir, enroll_site, federation_info

__all__ = ["PORT_OFFSETS", "register"]

PORT_OFFSETS = {"dicom_port": 0, "transfer_port": 1, "dht_port": 2}  # from --port-base


class _Port(argparse.Action):
    """Store a port and remember it was given, so ``--port-base`` does not override it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        given = set(getattr(namespace, "ports_given", set()))
        namespace.ports_given = given | {self.dest}


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


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
    p.add_argument(
        "--bind",
        default="0.0.0.0",
        help="address every listener binds: DICOM gateway, peer transfer and DHT",
    )
    p.add_argument("--aet", help="DICOM AE title of the gateway")
    p.add_argument(
        "--port-base",
        type=_port,
        metavar="N",
        help="DICOM port N, peer transfer N+1 (TCP), DHT N+2 (UDP): one site per base on a host",
    )
    p.add_argument(
        "--dicom-port", type=_port, default=const.DEFAULT_DICOM_PORT, action=_Port, metavar="PORT"
    )
    p.add_argument(
        "--dht-port", type=_port, default=const.DEFAULT_DHT_PORT, action=_Port, metavar="PORT"
    )
    p.add_argument(
        "--transfer-port",
        type=_port,
        default=const.DEFAULT_TRANSFER_PORT,
        action=_Port,
        metavar="PORT",
    )
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


def enroll_ports(args: argparse.Namespace) -> dict[str, int]:
    """The three ports from ``--port-base`` and the explicit port flags (which win)."""
    ports = {dest: int(getattr(args, dest)) for dest in PORT_OFFSETS}
    if args.port_base is not None:
        if args.port_base + max(PORT_OFFSETS.values()) > 65535:
            raise CommandError(f"--port-base {args.port_base}: N+2 must be a port (at most 65535)")
        given: set[str] = getattr(args, "ports_given", set())
        for dest, offset in PORT_OFFSETS.items():
            if dest not in given:
                ports[dest] = args.port_base + offset
    if ports["dicom_port"] == ports["transfer_port"]:
        raise CommandError(
            f"--dicom-port and --transfer-port are both {ports['dicom_port']} (both TCP): "
            "give them different ports"
        )
    return ports


def _check_federation_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CommandError(f"--federation {folder}: no such folder", 1)
    if not (folder / "federation.toml").is_file() or not (folder / "ca.crt").is_file():
        hint = (
            " (it is a site folder: give the folder 'p2pacs federation create --out' made)"
            if (folder / "site.toml").is_file()
            else ""
        )
        raise CommandError(
            f"--federation {folder} is not a federation folder: it has no federation.toml and "
            f"ca.crt{hint}",
            1,
        )
    if not (folder / "ca.key").is_file():
        raise CommandError(
            f"--federation {folder} has no ca.key: enroll on the machine that keeps the "
            "federation's CA key (it is kept offline)",
            1,
        )


def cmd_site_enroll(args: argparse.Namespace) -> int:
    destinations = {}
    for item in args.destination:
        ae, sep, addr = item.partition("=")
        if not sep:
            raise CommandError(f"--destination {item!r}: expected AE=HOST:PORT")
        destinations[ae] = addr
    ports = enroll_ports(args)
    _check_federation_folder(args.federation)
    if (args.out / "identity" / "site.key").exists():
        raise CommandError(
            f"{args.out} is already enrolled; enroll a new site in a new folder, or change "
            f"this one's settings with 'p2pacs --site {args.out} config set KEY VALUE' "
            f"(ports: {', '.join(PORT_SETTINGS.values())})",
            1,
        )
    site = enroll_site(
        args.federation,
        args.name,
        args.out,
        host=args.host,
        bind=args.bind,
        aet=args.aet,
        dicom_port=ports["dicom_port"],
        dht_port=ports["dht_port"],
        transfer_port=ports["transfer_port"],
        bootstrap=args.bootstrap,
        destinations=destinations,
        replication=args.replication,
        discovery=not args.no_discovery,
    )
    cfg = site.config
    table = Table(title=f"site {args.name} enrolled", show_header=False)
    table.add_row("site folder", str(site.path))
    table.add_row("identity", f"{site.identity_path} (back it up off-site)")
    table.add_row("DICOM", f"{cfg.dicom.ae_title} on {cfg.dicom.bind}:{cfg.dicom.port}")
    table.add_row("transfer (TCP)", f"{cfg.federation.bind}:{cfg.federation.transfer_port}")
    table.add_row("DHT (UDP)", f"{cfg.federation.bind}:{cfg.federation.dht_port}")
    table.add_row("bootstrap", ", ".join(cfg.federation.bootstrap) or "mDNS only")
    table.add_row("replication", str(cfg.federation.replication))
    console.print(table)
    return 0
