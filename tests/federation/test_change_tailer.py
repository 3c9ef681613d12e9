"""The federation's tail of the change log (real LMDB, a real loop; no sockets)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from p2pacs.archive import Archive
from p2pacs.dicom import split_part10
from p2pacs.federation.changes import ChangeTailer
from p2pacs.index import Version
from p2pacs.samples import generate_instances
from p2pacs.store import hash_bytes


async def _until(condition: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return bool(condition())  # type: ignore[operator]


def _write(archive: Archive, path: Path, *, log_change: bool) -> str:
    part = split_part10(path.read_bytes())
    attrs = archive.check(part.dataset, part.transfer_syntax)
    data = bytes(part.dataset)
    version = Version(hash_bytes(data), len(data), part.transfer_syntax, part.prefix, time.time())
    return archive.write_checked(attrs, version, data, log_change=log_change).result(30).study_uid


async def test_tailer_marks_what_workers_wrote_and_prunes_once_published(tmp_path: Path) -> None:
    files = generate_instances(tmp_path / "gen", studies=2, series_per_study=1,
                               instances_per_series=2, rows=64, columns=64, seed=5)  # fmt: skip
    archive = Archive(tmp_path / "db", map_size=1 << 28, sync=False)
    notified: list[str] = []
    archive.on_ingest(lambda i: notified.append(i.study_uid))
    try:
        studies = {await asyncio.to_thread(_write, archive, p, log_change=True) for p in files}
        assert len(studies) == 2 and not notified, "logged writes do not call on_ingest"
        assert archive.changes.pending() == len(files)
        marked: set[str] = set()
        tailer = ChangeTailer(archive, marked.update)
        task = asyncio.create_task(tailer.run())
        try:
            assert await _until(lambda: marked == studies)
            tailer.published(sorted(studies))  # this round may have started before the marks
            assert archive.changes.pending() == len(files), "nothing is surely published yet"
            tailer.published(sorted(studies))  # a round that began after them ended
            assert await _until(lambda: archive.changes.pending() == 0)
            later = await asyncio.to_thread(_write, archive, files[0], log_change=True)
            assert later in studies and archive.changes.pending() == 0, "same bytes: no change"
        finally:
            task.cancel()
        unlogged = generate_instances(
            tmp_path / "more", studies=1, series_per_study=1, instances_per_series=1,
            rows=64, columns=64, seed=6,
        )  # fmt: skip
        uid = await asyncio.to_thread(_write, archive, unlogged[0], log_change=False)
        assert notified == [uid] and archive.changes.pending() == 0
    finally:
        archive.close()
