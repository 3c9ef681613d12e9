"""Helpers shared by the command modules: console output, progress bars, opening the site."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from p2pacs.archive import Archive
from p2pacs.site import Site, default_site_dir, is_site

__all__ = [
    "CommandError",
    "console",
    "err_console",
    "open_archive",
    "open_site",
    "progress_bar",
    "site_source",
]

console = Console()
err_console = Console(stderr=True)


class CommandError(Exception):
    """A command-line usage problem, reported without a traceback."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def site_source(args: argparse.Namespace) -> str:
    """Where the site folder came from: ``--site``, ``$P2PACS_SITE`` or the default."""
    if getattr(args, "site_given", False):
        return "--site"
    if os.environ.get("P2PACS_SITE"):
        return "$P2PACS_SITE"
    return f"the default (neither --site nor $P2PACS_SITE is set; {default_site_dir()})"


def open_site(args: argparse.Namespace) -> Site:
    """The existing site folder the command works on. Only ``init`` and ``site enroll`` make
    one: a mistyped ``--site`` must fail, never become a new, unreplicated archive."""
    path: Path = args.site
    if not is_site(path):
        what = "does not exist" if not path.exists() else "is not a site folder (no site.toml)"
        raise CommandError(
            f"{path} {what}; it came from {site_source(args)}. Give an existing site with "
            "--site DIR or $P2PACS_SITE, or create one with 'p2pacs --site DIR init' "
            "(standalone) or 'p2pacs site enroll' (a federation member)",
            1,
        )
    return Site.open(path)


@contextmanager
def open_archive(args: argparse.Namespace) -> Iterator[tuple[Site, Archive]]:
    site = open_site(args)
    archive = site.archive()
    try:
        yield site, archive
    finally:
        archive.close()


def progress_bar(*, transfer: bool = False) -> Progress:
    """A rich progress bar with rate and ETA; bytes-per-second when ``transfer``."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn() if not transfer else TaskProgressColumn(),
        TransferSpeedColumn() if transfer else TextColumn(""),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, console=err_console, transient=False)
