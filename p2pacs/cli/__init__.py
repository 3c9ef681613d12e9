"""The ``p2pacs`` command line: verbs a PACS administrator would guess, dcmtk-style flags.

Each command group lives in its own module with a ``register(subparsers)`` function; ``main``
is testable in-process (``main(["--site", DIR, "ls"])``) and is also ``python -m p2pacs``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from dht.errors import DhtError
from p2pacs import __version__
from p2pacs.allocator import tune_allocator
from p2pacs.cli import (
    archive_cmds,
    config_cmds,
    demo_cmds,
    doctor_cmds,
    federation_cmds,
    healing_cmds,
    node_cmds,
    serve_cmds,
    store_cmds,
    web_cmds,
)
from p2pacs.cli.common import CommandError
from p2pacs.errors import P2PacsError
from p2pacs.site import default_site_dir

__all__ = ["build_parser", "main"]

_GROUPS = [
    archive_cmds,
    serve_cmds,
    federation_cmds,
    config_cmds,
    node_cmds,
    doctor_cmds,
    healing_cmds,
    demo_cmds,
    web_cmds,
    store_cmds,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pacs",
        description="A peer-to-peer, content-addressed archive for medical images.",
    )
    parser.add_argument("--version", action="version", version=f"p2pacs {__version__}")
    parser.add_argument(
        "--site",
        type=Path,
        default=None,
        help=f"site directory (default: $P2PACS_SITE or {default_site_dir()})",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="informational messages")
    verbosity.add_argument("-d", "--debug", action="store_true", help="debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in _GROUPS:
        group.register(sub)
    for command in sub.choices.values():
        # also accepted after the command, as in 'p2pacs recover --site DIR'
        command.add_argument("--site", type=Path, default=argparse.SUPPRESS, help="site directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (
        logging.ERROR
        if args.quiet
        else logging.DEBUG
        if args.debug
        else logging.INFO
        if args.verbose
        else logging.WARNING
    )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_allocator()
    args.site_given = args.site is not None
    if args.site is None:
        args.site = default_site_dir()
    # every failure ends in one line saying what to do, never in a traceback (-d shows it)
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"p2pacs: {exc}", file=sys.stderr)
        return exc.code
    except (P2PacsError, DhtError) as exc:
        _debug_traceback(args)
        print(f"p2pacs: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        _debug_traceback(args)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"p2pacs: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("p2pacs: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, and the traceback with -d
        _debug_traceback(args)
        print(
            f"p2pacs: internal error: {type(exc).__name__}: {exc} "
            "(run again with -d for the traceback, and report it)",
            file=sys.stderr,
        )
        return 70  # EX_SOFTWARE


def _debug_traceback(args: argparse.Namespace) -> None:
    if args.debug:
        traceback.print_exc()
