"""``config get`` and ``config set``: read and edit ``site.toml`` one checked setting at a time."""

from __future__ import annotations

import argparse
import json

from p2pacs.cli.common import CommandError, console, open_site
from p2pacs.config import Config
from p2pacs.control.client import read_runfile
from p2pacs.errors import ConfigError

__all__ = ["register"]

READ_ONLY = {
    "federation.name": "it is the CN of the site's certificate; enroll a new site for a new name",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cfg = sub.add_parser("config", help="show or change a setting of site.toml (checked)")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = cfg_sub.add_parser("get", help="print one setting, or the whole site.toml")
    p.add_argument("key", nargs="?", metavar="KEY", help="section.name, e.g. federation.dht_port")
    p.set_defaults(func=cmd_config_get)
    p = cfg_sub.add_parser("set", help="change one setting; restart 'serve' to apply it")
    p.add_argument("key", metavar="KEY", help="section.name, e.g. dicom.port")
    p.add_argument(
        "value",
        metavar="VALUE",
        help="e.g. 11212, 2T, true, 'a:11190,b:11190', 'PACS=10.0.0.5:104'",
    )
    p.set_defaults(func=cmd_config_set)
    p = cfg_sub.add_parser("keys", help="list every setting")
    p.set_defaults(func=cmd_config_keys)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def cmd_config_get(args: argparse.Namespace) -> int:
    site = open_site(args)
    if args.key is None:
        print(site.config_path.read_text(), end="")
        return 0
    try:
        value = site.config.get_key(args.key)
    except ConfigError as exc:
        raise CommandError(str(exc), 2) from None
    print(_show(value))
    return 0


def cmd_config_set(args: argparse.Namespace) -> int:
    site = open_site(args)
    if args.key in READ_ONLY:
        raise CommandError(f"{args.key} cannot be changed: {READ_ONLY[args.key]}", 2)
    try:
        before = site.config.get_key(args.key)
        value = site.config.set_key(args.key, args.value)
    except ConfigError as exc:
        raise CommandError(f"{exc}; {site.config_path} is unchanged", 2) from None
    site.save_config()
    console.print(f"{args.key}: {_show(before)} -> {_show(value)} ({site.config_path})")
    running = read_runfile(site)
    if running is not None:
        console.print(
            f"[yellow]the site is running (pid {running['pid']})[/]: restart 'p2pacs serve' "
            "for the change to take effect"
        )
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    for key in Config.setting_keys():
        print(key)
    return 0
