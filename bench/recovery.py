"""Whole-site recovery throughput, against copying the same bytes between two plain folders.

Three site processes on loopback (R=2). N generated instances (~0.5 MB each) arrive at clinic-a
over C-STORE; once every study is at two sites, clinic-a is killed, wiped and recovered from the
other two. Then clinic-b is killed and the time until every study is again held by two live
sites is measured. Baseline, same run, same bytes: copy the instance files from one plain folder
to another and fsync them (median of three rounds: this VM's disk swings 3x between identical
copies). Last line: a JSON object.

    python bench/recovery.py --instances 2000   # about 1 GB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from p2pacs.dicom.header import extract_attributes
from p2pacs.dicom.part10 import split_part10
from p2pacs.dicom.scu import store_files
from p2pacs.samples import generate_bench_instances
from p2pacs.testbed import Testbed, wait_for

SITES = ("research-lab", "clinic-a", "clinic-b")
BASELINE_ROUNDS = 3


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


def measure(root: Path, instances: int) -> dict[str, float]:
    files = generate_bench_instances(root / "instances", instances, seed=1)
    total = sum(f.stat().st_size for f in files)
    rounds = []
    for _ in range(BASELINE_ROUNDS):
        shutil.rmtree(root / "plain-copy", ignore_errors=True)
        rounds.append(plain_copy(files, root / "plain-copy"))
    shutil.rmtree(root / "plain-copy", ignore_errors=True)
    raw_s = statistics.median(rounds)
    studies = set()
    for f in files:
        part = split_part10(f.read_bytes())
        attrs = extract_attributes(part.dataset, part.transfer_syntax)
        studies.add(str(attrs["StudyInstanceUID"]))
    with Testbed(root / "fed", SITES, replication=2, down_after=3.0, repair_interval=1.0) as bed:
        bed.start()
        clinic = bed["clinic-a"]
        report = store_files(clinic.host, clinic.dicom_port, clinic.aet, files)
        assert not report.failed, list(report.failed.items())[:3]
        assert wait_for(lambda: clinic.holds_whole(studies, 2), 600, 1.0)
        clinic.kill()
        clinic.wipe()
        start = time.perf_counter()
        clinic.start()
        done = clinic.run_cli("recover", timeout=1800)
        recovery_s = time.perf_counter() - start
        assert done.returncode == 0, done.stderr.decode()[-2000:]
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
        "ratio_vs_raw": round(raw_s / recovery_s, 3),
        "time_to_restore_R_s": round(restore_r_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=400, help="~0.5 MB each (2000 = 1 GB)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="p2pacs-bench-recovery-"))
    print(f"working in {root} (kept if the run fails)", file=sys.stderr)
    result = measure(root, args.instances)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
