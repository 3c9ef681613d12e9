"""``store migrate`` and ``store sweep``: move instance bytes between LMDB and the object store.

Both work on a stopped site (they take its lock), as a migration is a maintenance step.
"""

from __future__ import annotations

import argparse

from p2pacs.cli.common import CommandError, console, open_site, progress_bar
from p2pacs.errors import StoreError
from p2pacs.site import SiteRunningError
from p2pacs.store.migrate import WORKERS, migrate

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    store = sub.add_parser("store", help="where instance bytes live: migrate, sweep")
    store_sub = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    p = store_sub.add_parser(
        "migrate",
        help="move blob bytes to the object store (--to s3) or back (--to lmdb); resumable",
    )
    p.add_argument("--to", choices=("s3", "lmdb"), required=True, help="where the bytes go")
    p.add_argument("-j", "--jobs", type=int, default=WORKERS, help="blobs moved at once")
    p.set_defaults(func=cmd_migrate)
    p = store_sub.add_parser(
        "sweep", help="delete objects no index entry names (left by a crash mid-ingest)"
    )
    p.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        help="seconds: leave younger objects alone (default 3600)",
    )
    p.set_defaults(func=cmd_sweep)


def cmd_migrate(args: argparse.Namespace) -> int:
    site = open_site(args)
    st = site.config.store
    if not st.s3_bucket:
        raise CommandError(
            "no object store configured: set store.s3_endpoint and store.s3_bucket "
            "(docs/operations.md, 'Instance bytes on an object store')",
            1,
        )
    lock = site.lock()
    try:
        lock.acquire()
    except SiteRunningError as exc:
        raise CommandError(f"stop the site first ('serve' runs): {exc}", 1) from exc
    try:
        with site.archive() as archive:
            assert archive.blobs.objects is not None
            archive.blobs.objects.check()
            count, _ = archive.blobs.totals()
            with progress_bar() as bar:
                task = bar.add_task(f"to {args.to}", total=count)
                report = migrate(
                    archive.blobs,
                    args.to == "s3",
                    workers=max(1, args.jobs),
                    progress=lambda n: bar.advance(task, n),
                )
            swept = 0
            if args.to == "lmdb" and not report.failed:
                swept = archive.blobs.sweep_objects(grace=0.0)  # the site is stopped: all stale
    except StoreError as exc:
        raise CommandError(f"migration stopped: {exc}; run it again to resume", 1) from exc
    finally:
        lock.release()
    console.print(
        f"moved {report.moved} blobs ({report.bytes} bytes), {report.already} already in place"
        + (f", {swept} stale objects removed" if swept else "")
    )
    for h, why in sorted(report.failed.items()):
        console.print(f"[red]not moved[/] {h}: {why}")
    if report.failed:
        console.print("run 'p2pacs scrub --repair' on the running site, then migrate again")
        return 1
    site.config.store.backend = args.to
    site.save_config()
    console.print(f'store.backend = "{args.to}": new instances go there from the next start')
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    site = open_site(args)
    lock = site.lock()
    try:
        lock.acquire()
    except SiteRunningError as exc:
        raise CommandError(f"stop the site first ('serve' runs): {exc}", 1) from exc
    try:
        with site.archive() as archive:
            removed = archive.blobs.sweep_objects(grace=args.grace)
    except StoreError as exc:
        raise CommandError(f"sweep stopped: {exc}", 1) from exc
    finally:
        lock.release()
    console.print(f"removed {removed} orphan objects")
    return 0
