"""kill -9 at random moments: no partial or wrong blob is visible; nothing acknowledged is lost.

Each round starts a writer process on the same database, kills it with SIGKILL after a random
delay, then reopens the database and checks every visible blob against its hash and every
acknowledged write against what is stored.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pacs.archive import Archive
from p2pacs.store import BlobStore, SiteDB

WRITER = Path(__file__).with_name("crash_writer.py")
ROUNDS = 6


def _run_and_kill(mode: str, db_dir: Path, seed: int, delay: float) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), mode, str(db_dir), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        # wait until the writer has acknowledged something, then a random extra moment
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, proc.stderr.read().decode() if proc.stderr else "writer died"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return [first.decode().strip(), *out.decode().split()]


@pytest.mark.slow
def test_kill_during_blob_puts(tmp_path: Path) -> None:
    rng = random.Random(1234)
    acked: set[str] = set()
    for round_no in range(ROUNDS):
        acked.update(_run_and_kill("blobs", tmp_path / "db", round_no, rng.uniform(0.05, 0.6)))
        db = SiteDB(tmp_path / "db")
        try:
            store = BlobStore(db, chunk_size=64 * 1024)
            visible = set(store.hashes())
            assert acked <= visible, f"acknowledged blobs lost: {sorted(acked - visible)[:3]}"
            assert store.verify() == [], "a visible blob does not match its hash"
            store.sweep()  # orphan chunks of interrupted streams are removable, never visible
        finally:
            db.close()
    assert len(acked) > ROUNDS


@pytest.mark.slow
def test_kill_during_archive_ingest(tmp_path: Path) -> None:
    rng = random.Random(99)
    acked: set[str] = set()
    for round_no in range(4):
        acked.update(_run_and_kill("archive", tmp_path / "db", round_no, rng.uniform(0.05, 0.5)))
        with Archive(tmp_path / "db") as archive:
            assert archive.blobs.verify() == []
            for sop in acked:
                record = archive.index.instance(sop)
                assert record is not None, f"acknowledged instance {sop} lost"
                assert archive.blobs.verify_blob(record.current.hash)
            # every indexed instance has its blob: index and blob were committed together
            for study in archive.index.studies():
                records = archive.index.study_instances(study.study_uid)
                assert len(records) == study.instances
                assert archive.blobs.missing([r.current.hash for r in records]) == []
    assert len(acked) > 4
