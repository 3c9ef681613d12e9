"""``web user`` and ``web token``: who may open the status page and scrape ``/metrics``.

Passwords and tokens go into ``site.toml`` hashed only (``p2pacs.credentials``); a new token is
printed once and cannot be shown again. Restart ``serve`` for a change to take effect.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from p2pacs import credentials
from p2pacs.cli.common import CommandError, console, open_site
from p2pacs.control.client import read_runfile
from p2pacs.errors import ConfigError
from p2pacs.site import Site

__all__ = ["register"]

MAX_NAME = 64  # characters of a user or token name


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser("web", help="users and tokens of the status page and /metrics")
    w_sub = w.add_subparsers(dest="web_command", metavar="ACTION", required=True)
    p = w_sub.add_parser("user", help="add or remove a web user (HTTP Basic, password hashed)")
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    p.set_defaults(func=cmd_web_user)
    p = w_sub.add_parser("token", help="make or remove a bearer token (e.g. for Prometheus)")
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("name", metavar="NAME", help="what the token is for, e.g. prometheus")
    p.set_defaults(func=cmd_web_token)
    p = w_sub.add_parser("list", help="the web users and token names")
    p.set_defaults(func=cmd_web_list)


def _check_name(name: str) -> None:
    if not name or len(name) > MAX_NAME or ":" in name or not name.isprintable():
        raise CommandError(f"{name!r}: a name is 1 to {MAX_NAME} printable characters, no ':'", 2)


def _save(site: Site) -> None:
    problems = site.config.check()
    if problems:  # e.g. the last user removed while the web server is enabled
        raise CommandError("; ".join(problems) + f"; {site.config_path} is unchanged", 2)
    site.save_config()
    if read_runfile(site) is not None:
        console.print("[yellow]the site is running[/]: restart 'p2pacs serve' to apply this")


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if first != getpass.getpass("again: "):
        raise CommandError("the two passwords differ; nothing changed", 2)
    return first


def cmd_web_user(args: argparse.Namespace) -> int:
    site = open_site(args)
    _check_name(args.name)
    users = site.config.web.users
    if args.action == "remove":
        if users.pop(args.name, None) is None:
            raise CommandError(f"no web user {args.name!r}", 1)
        _save(site)
        console.print(f"web user {args.name} removed")
        return 0
    try:
        users[args.name] = credentials.hash_password(_read_password(args))
    except ConfigError as exc:
        raise CommandError(str(exc), 2) from None
    _save(site)
    console.print(f"web user {args.name} set ({site.config_path})")
    return 0


def cmd_web_token(args: argparse.Namespace) -> int:
    site = open_site(args)
    _check_name(args.name)
    tokens = site.config.web.tokens
    if args.action == "remove":
        if tokens.pop(args.name, None) is None:
            raise CommandError(f"no web token {args.name!r}", 1)
        _save(site)
        console.print(f"web token {args.name} removed")
        return 0
    token, stored = credentials.new_token()
    tokens[args.name] = stored
    _save(site)
    print(token)  # the only time it is shown: only its hash is kept
    print(
        f"web token {args.name} set; it is shown only now: send it as 'Authorization: Bearer "
        "TOKEN'",
        file=sys.stderr,
    )
    return 0


def cmd_web_list(args: argparse.Namespace) -> int:
    site = open_site(args)
    web = site.config.web
    state = "enabled" if web.enabled else "disabled"
    print(f"web {state}, {'http' if web.plain_http else 'https'}://{web.bind}:{web.port}/")
    for name in sorted(web.users):
        print(f"user  {name}")
    for name in sorted(web.tokens):
        print(f"token {name}")
    return 0
