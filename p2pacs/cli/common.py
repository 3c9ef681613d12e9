"""Helpers shared by the command modules: console output, progress bars, opening the site."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

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
from p2pacs.site import Site

__all__ = ["CommandError", "console", "err_console", "open_archive", "open_site", "progress_bar"]

console = Console()
err_console = Console(stderr=True)


class CommandError(Exception):
    """A command-line usage problem, reported without a traceback."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def open_site(args: argparse.Namespace, *, create: bool = True) -> Site:
    return Site.open(args.site, create=create)


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
