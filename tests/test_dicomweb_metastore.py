"""/metadata kept in LMDB by blob hash: built on a miss and kept, built after ingest by the
warmer, read back by a fresh store without building anything. Real archive, real files."""

from __future__ import annotations

import json
import time
from pathlib import Path

from p2pacs.archive import Archive
from p2pacs.dicom import split_part10
from p2pacs.dicomweb.metastore import MetadataStore, MetadataWarmer
from p2pacs.dicomweb.wado import metadata_json
from p2pacs.samples import generate_instances


def _versions(archive: Archive, study: str) -> list[tuple[str, str]]:
    return [
        (r.current.hash, r.current.transfer_syntax) for r in archive.index.study_instances(study)
    ]


def _wait_idle(warmer: MetadataWarmer, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not warmer.idle and time.monotonic() < deadline:
        time.sleep(0.02)
    return warmer.idle


def test_built_once_then_read_from_lmdb(tmp_path: Path) -> None:
    paths = generate_instances(
        tmp_path / "gen", studies=1, series_per_study=1, instances_per_series=4, rows=32,
        columns=32, seed=4,
    )  # fmt: skip
    archive = Archive(tmp_path / "db", map_size=1 << 28, sync=False)
    try:
        (study,) = {archive.import_file(p).study_uid for p in paths}
        versions = _versions(archive, study)
        store = MetadataStore(archive)
        first = store.get_many(versions)
        assert store.built == len(paths)
        by_sop = {json.loads(m)["00080018"]["Value"][0]: json.loads(m) for m in first}
        for p in paths:
            part = split_part10(p.read_bytes())
            want = metadata_json(part.dataset, part.transfer_syntax)
            assert by_sop[want["00080018"]["Value"][0]] == want
        deadline = time.monotonic() + 10  # kept by a write job the request did not wait for
        fresh = MetadataStore(archive)
        while len(fresh.stored(h for h, _ in versions)) < len(paths):
            assert time.monotonic() < deadline, "entries were not kept"
            time.sleep(0.02)
        fresh = MetadataStore(archive)
        assert fresh.get_many(versions) == first and fresh.built == 0
    finally:
        archive.close()


def test_warmer_builds_at_ingest(tmp_path: Path) -> None:
    paths = generate_instances(
        tmp_path / "gen", studies=2, series_per_study=2, instances_per_series=3, rows=32,
        columns=32, seed=5,
    )  # fmt: skip
    archive = Archive(tmp_path / "db", map_size=1 << 28, sync=False)
    warmer = MetadataWarmer(MetadataStore(archive))
    archive.on_ingest(warmer.offer)
    warmer.start()
    try:
        studies = {archive.import_file(p).study_uid for p in paths}
        assert _wait_idle(warmer)
        assert warmer.store.built == len(paths) and warmer.dropped == 0
        archive.import_file(paths[0])  # the same bytes again: nothing new to build
        assert _wait_idle(warmer) and warmer.store.built == len(paths)
        fresh = MetadataStore(archive)  # what a restarted site reads
        for study in studies:
            got = fresh.get_many(_versions(archive, study))
            assert all(json.loads(m)["0020000D"]["Value"] == [study] for m in got)
        assert fresh.built == 0
    finally:
        warmer.stop()
        archive.close()


def test_warmer_is_off_until_started(tmp_path: Path) -> None:
    paths = generate_instances(
        tmp_path / "gen", studies=1, series_per_study=1, instances_per_series=2, rows=32,
        columns=32, seed=6,
    )  # fmt: skip
    archive = Archive(tmp_path / "db", map_size=1 << 28, sync=False)
    warmer = MetadataWarmer(MetadataStore(archive))
    archive.on_ingest(warmer.offer)
    try:
        for p in paths:
            archive.import_file(p)
        assert warmer.idle and warmer.store.built == 0
    finally:
        archive.close()
