"""Whole-site recovery throughput, against rsync over ssh and a plain folder copy of the same bytes.

Three site processes on loopback (R=2). N generated instances (~0.5 MB each, 100 per study; one
study dated 2026-11-24, the others spread over the ten years before) arrive at clinic-a over
C-STORE; once every study is at two sites, clinic-a is killed, wiped and recovered from the
other two. ``recovery_s`` runs from the restart of the wiped site (process start included) until
``p2pacs recover`` reports done; ``recent_day_s``, from the same moment until a C-FIND at
clinic-a shows every instance of the most recent day's studies (polled every 0.1 s). Then
clinic-b is killed and the time until every study is again held by two live sites is measured.

Baselines, same run, same bytes (the Part-10 files that were ingested), median of three rounds
each (this VM's disk swings 3x between identical copies):

- what an administrator would do to restore an archive from a backup host: ``rsync -a
  --whole-file --fsync`` over ``ssh`` (AES-128-GCM) into an empty folder, through a throwaway
  sshd on loopback that the benchmark starts (``bench/rsync_baseline.py``; needs Debian's rsync
  and openssh-server), ssh start-up included; ``ratio_vs_rsync`` = recovery MB/s / rsync MB/s;
- a ceiling: copy the files from one plain folder to another and fsync them (``ratio_vs_raw``).

Last line: a JSON object; MB means 10**6 bytes here.

    python bench/recovery.py --instances 2000   # about 1 GB
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rsync_baseline import RsyncOverSsh, require_tools

from p2pacs.dicom.header import extract_attributes
from p2pacs.dicom.part10 import split_part10
from p2pacs.dicom.scu import store_files
from p2pacs.dicom.uids import STUDY_ROOT_FIND
from p2pacs.samples import generate_bench_instances
from p2pacs.testbed import Testbed, wait_for

SITES = ("research-lab", "clinic-a", "clinic-b")
BASELINE_ROUNDS = 3
POLL_INTERVAL = 0.1  # seconds between C-FINDs for the most recent day's studies


def plain_copy(files: list[Path], dest: Path) -> float:
    """Seconds to copy ``files`` into ``dest`` durably (fsync per file and the folder)."""
    dest.mkdir()
    start = time.perf_counter()
    for f in files:
        target = dest / f.name
        shutil.copyfile(f, target)
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def study_counts(host: str, port: int, aet: str, study_date: str) -> dict[str, int]:
    """Study UID -> instances held, for the studies of ``study_date`` at a site (C-FIND)."""
    ae = AE(ae_title="P2PACS-BENCH")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        return {}
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyDate = study_date
    query.StudyInstanceUID = ""
    query.NumberOfStudyRelatedInstances = ""
    counts: dict[str, int] = {}
    try:
        for status, found in assoc.send_c_find(query, STUDY_ROOT_FIND):
            if found is not None and int(getattr(status, "Status", -1)) in (0xFF00, 0xFF01):
                counts[str(found.StudyInstanceUID)] = int(found.NumberOfStudyRelatedInstances)
    finally:
        assoc.release()
    return counts


class RecentDayWatch:
    """Polls a site's C-FIND from a thread until every instance of ``wanted`` (study UID ->
    instances) is back; ``at`` is the ``time.perf_counter()`` of the first complete answer."""

    def __init__(self, host: str, port: int, aet: str, day: str, wanted: dict[str, int]):
        self.args = (host, port, aet, day)
        self.wanted = wanted
        self.at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recent-day", daemon=True)

    def complete(self) -> bool:
        counts = study_counts(*self.args)
        return all(counts.get(uid, 0) >= n for uid, n in self.wanted.items())

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.complete():
                self.at = time.perf_counter()
                return
            self._stop.wait(POLL_INTERVAL)

    def __enter__(self) -> RecentDayWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def measure(root: Path, instances: int) -> dict[str, object]:
    files = generate_bench_instances(root / "instances", instances, seed=1)
    total = sum(f.stat().st_size for f in files)
    rounds = []
    for _ in range(BASELINE_ROUNDS):
        shutil.rmtree(root / "plain-copy", ignore_errors=True)
        rounds.append(plain_copy(files, root / "plain-copy"))
    shutil.rmtree(root / "plain-copy", ignore_errors=True)
    raw_s = statistics.median(rounds)
    rounds = []
    with RsyncOverSsh() as rsync:  # the same files: the folder holds exactly those
        for _ in range(BASELINE_ROUNDS):
            shutil.rmtree(root / "rsync-copy", ignore_errors=True)
            rounds.append(rsync.copy(root / "instances", root / "rsync-copy"))
    shutil.rmtree(root / "rsync-copy", ignore_errors=True)
    rsync_s = statistics.median(rounds)
    print(f"rsync {rsync.version} over ssh: {total / 1e6 / rsync_s:.0f} MB/s (median of "
          f"{', '.join(f'{total / 1e6 / r:.0f}' for r in rounds)})", file=sys.stderr)  # fmt: skip
    per_study: dict[str, int] = {}
    dates: dict[str, str] = {}
    for f in files:
        part = split_part10(f.read_bytes())
        attrs = extract_attributes(part.dataset, part.transfer_syntax)
        uid = str(attrs["StudyInstanceUID"])
        per_study[uid] = per_study.get(uid, 0) + 1
        dates[uid] = str(attrs.get("StudyDate", ""))
    studies = set(per_study)
    recent_day = max(dates.values())
    recent = {uid: n for uid, n in per_study.items() if dates[uid] == recent_day}
    with Testbed(root / "fed", SITES, replication=2, down_after=3.0, repair_interval=1.0) as bed:
        bed.start()
        clinic = bed["clinic-a"]
        report = store_files(clinic.host, clinic.dicom_port, clinic.aet, files)
        assert not report.failed, list(report.failed.items())[:3]
        assert wait_for(lambda: clinic.holds_whole(studies, 2), 600, 1.0)
        clinic.kill()
        clinic.wipe()
        start = time.perf_counter()  # process start included: the clock runs from here
        clinic.start()
        with RecentDayWatch(clinic.host, clinic.dicom_port, clinic.aet, recent_day, recent) as w:
            done = clinic.run_cli("recover", timeout=1800)
            recovery_s = time.perf_counter() - start
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        # recover reports done once every study is back, the most recent day's included: a
        # poll answered later (or none at all yet) says the day was back by then
        assert w.at or w.complete(), "the most recent day's studies are not back after recover"
        recent_day_s = min(w.at or math.inf, start + recovery_s) - start
        status = clinic.status()
        assert status["instances"] >= len(files), status
        bed["clinic-b"].kill()
        start = time.perf_counter()
        lab = bed["research-lab"]
        assert wait_for(lambda: lab.holds_whole(studies, 2), 600, 0.5)
        restore_r_s = time.perf_counter() - start
    mb = total / 1e6
    return {
        "instances": len(files),
        "mb": round(mb, 1),
        "recovery_s": round(recovery_s, 2),
        "mb_per_s": round(mb / recovery_s, 1),
        "raw_copy_mb_per_s": round(mb / raw_s, 1),
        "rsync_mb_s": round(mb / rsync_s, 1),
        "ratio_vs_raw": round(raw_s / recovery_s, 3),
        "ratio_vs_rsync": round(rsync_s / recovery_s, 3),
        "includes_process_start": True,
        "recent_day_s": round(recent_day_s, 2),
        "recent_day_studies": len(recent),
        "recent_day_instances": sum(recent.values()),
        "time_to_restore_R_s": round(restore_r_s, 2),
        "rsync_version": rsync.version,
        "rsync_fsync": rsync.fsync,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=400, help="~0.5 MB each (2000 = 1 GB)")
    args = parser.parse_args()
    require_tools()  # before minutes of set-up: the rsync baseline needs rsync and sshd
    root = Path(tempfile.mkdtemp(prefix="p2pacs-bench-recovery-"))
    print(f"working in {root} (kept if the run fails)", file=sys.stderr)
    result = measure(root, args.instances)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
