"""Archive commands: init, import, ls, show, export, verify."""

from __future__ import annotations

import argparse
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from rich.table import Table

from p2pacs.archive import Archive, Ingested
from p2pacs.cli.common import CommandError, console, err_console, open_archive, progress_bar
from p2pacs.errors import InvalidDicomError, StoreError
from p2pacs.site import Site

__all__ = ["import_paths", "register"]

_IMPORT_WORKERS = max(2, (os.cpu_count() or 2))  # parse+hash in parallel; writes group-commit


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init", help="create a site directory with a default config")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("import", help="import DICOM files and folders (recursively)")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("ls", help="list the studies held at this site")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("show", help="show one study: series and instances")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("export", help="write a study's files, byte-identical to what was stored")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("out_dir", type=Path, metavar="DIR")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="re-hash every stored blob and report mismatches")
    p.set_defaults(func=cmd_verify)


def cmd_init(args: argparse.Namespace) -> int:
    site = Site.init(args.site)
    console.print(f"site ready at [bold]{site.path}[/] (config: {site.config_path})")
    return 0


def import_paths(
    archive: Archive, paths: list[Path], *, show_progress: bool = True
) -> tuple[list[Ingested], list[tuple[Path, str]]]:
    """Import files and folders; bad files are reported and skipped, never abort the run."""
    files = list(archive.iter_files(paths))
    missing = [p for p in paths if not p.exists()]
    skipped: list[tuple[Path, str]] = [(p, "no such file or folder") for p in missing]
    done: list[Ingested] = []

    def parse(path: Path) -> Future[Ingested]:
        return archive.submit_file_bytes(path.read_bytes())

    with progress_bar() as bar, ThreadPoolExecutor(_IMPORT_WORKERS) as pool:
        task = bar.add_task("importing", total=len(files), visible=show_progress)
        pending: list[tuple[Path, Future[Future[Ingested]]]] = [
            (f, pool.submit(parse, f)) for f in files
        ]
        for path, outer in pending:
            try:
                done.append(outer.result().result())
            except (InvalidDicomError, OSError) as exc:
                skipped.append((path, str(exc)))
            except StoreError:
                raise
            bar.advance(task)
    return done, skipped


def cmd_import(args: argparse.Namespace) -> int:
    with open_archive(args) as (_site, archive):
        done, skipped = import_paths(archive, args.paths, show_progress=not args.quiet)
    for path, reason in skipped:
        err_console.print(f"[yellow]skipped[/] {path}: {reason}")
    new = sum(1 for d in done if d.new_instance)
    versions = sum(1 for d in done if d.new_version and not d.new_instance)
    studies = len({d.study_uid for d in done})
    console.print(
        f"imported {len(done)} file(s): {new} new instance(s), {versions} new version(s) of known "
        f"instance(s), {len(done) - new - versions} already stored; {studies} study(ies); "
        f"{len(skipped)} skipped"
    )
    return 0 if done or not skipped else 1


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def cmd_ls(args: argparse.Namespace) -> int:
    with open_archive(args) as (_site, archive):
        studies = sorted(
            archive.index.studies(), key=lambda s: str(s.attrs.get("StudyDate", "")), reverse=True
        )
    table = Table(title=f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}")
    for col in (
        "Study date",
        "Patient ID",
        "Patient name",
        "Modalities",
        "Series",
        "Instances",
        "Size",
        "Study UID",
    ):
        table.add_column(col, overflow="fold")
    for s in studies:
        a = s.attrs
        table.add_row(
            str(a.get("StudyDate", "")),
            str(a.get("PatientID", "")),
            str(a.get("PatientName", "")),
            "/".join(s.modalities),
            str(s.series),
            str(s.instances),
            _fmt_bytes(s.bytes),
            s.study_uid,
        )
    console.print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with open_archive(args) as (_site, archive):
        study = archive.index.study(args.study_uid)
        if study is None:
            raise CommandError(f"study {args.study_uid} is not held at this site", code=1)
        series = archive.index.series_of(args.study_uid)
        instances = archive.index.study_instances(args.study_uid)
    console.print(f"[bold]Study[/] {study.study_uid}")
    for key in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyDescription",
        "ReferringPhysicianName",
    ):
        console.print(f"  {key}: {study.attrs.get(key, '')}")
    console.print(
        f"  {study.series} series, {study.instances} instances, {_fmt_bytes(study.bytes)}"
    )
    table = Table()
    for col in (
        "Series",
        "Modality",
        "Description",
        "Instance",
        "SOP Instance UID",
        "Versions",
        "Size",
        "Hash",
    ):
        table.add_column(col, overflow="fold")
    described = {uid: attrs for uid, attrs, _ in series}
    for rec in instances:
        s_attrs = described.get(rec.series_uid, {})
        table.add_row(
            str(s_attrs.get("SeriesNumber", "")),
            str(s_attrs.get("Modality", "")),
            str(s_attrs.get("SeriesDescription", "")),
            str(rec.attrs.get("InstanceNumber", "")),
            rec.sop_uid,
            str(len(rec.versions)),
            _fmt_bytes(rec.current.size),
            rec.current.hash[:16],
        )
    console.print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with open_archive(args) as (_site, archive):
        paths = archive.export_study(args.study_uid, args.out_dir)
    console.print(f"exported {len(paths)} file(s) to {args.out_dir}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with open_archive(args) as (_site, archive):
        count, total = archive.blobs.totals()
        with progress_bar(transfer=True) as bar:
            task = bar.add_task("verifying", total=total, visible=not args.quiet)
            bad = archive.blobs.verify(progress=lambda n: bar.advance(task, n))
    if bad:
        for h in bad:
            err_console.print(f"[red]corrupt[/] blob {h}")
        console.print(
            f"{len(bad)} of {count} blob(s) fail their hash check; run 'p2pacs scrub --repair'"
        )
        return 1
    console.print(f"all {count} blob(s) ({_fmt_bytes(total)}) match their hashes")
    return 0
