"""Durable ingest through the Archive, against the ceiling of a plain hash+write+fsync.

N generated CT instances (~0.5 MB each) are read into memory, then, in the same run:
- ceiling: BLAKE3-hash each dataset, write it to a plain folder, fsync each file and the folder,
  from the same number of threads;
- p2pacs: ``Archive.submit`` from the same threads (as the DICOM gateway's handlers do), waiting
  for every durable commit (LMDB with fsync; header parse + hash + blob + index entry).
Each measurement is repeated ``--rounds`` times on fresh folders, alternating which goes first,
and the median kept: this machine's disk swings 3x between identical runs (fresh vs reused blocks),
and a best-of-N would compare one lucky ceiling round with the archive. Last line: a JSON object.

    python bench/ingest_store.py --instances 400
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Timer, bench_files, fsync_path, write_durably

from p2pacs import const
from p2pacs.archive import Archive, Ingested
from p2pacs.dicom import split_part10
from p2pacs.store import hash_bytes


def ceiling(parts: list[tuple[memoryview, str]], dest: Path, threads: int) -> float:
    """Seconds to hash and durably write every dataset as a plain file."""
    dest.mkdir()

    def one(i: int) -> str:
        data = parts[i][0]
        h = hash_bytes(data)
        write_durably(dest / f"{h}.bin", data)
        return h

    with Timer() as t, ThreadPoolExecutor(threads) as pool:
        hashes = list(pool.map(one, range(len(parts))))
        fsync_path(dest)
    assert len(set(hashes)) == len(parts)
    return t.seconds


def archive_ingest(parts: list[tuple[memoryview, str]], dest: Path, threads: int) -> float:
    """Seconds to archive every dataset durably through ``Archive.submit`` from ``threads``."""
    size = sum(len(d) for d, _ in parts)
    with Archive(dest / "site.lmdb", map_size=max(1 << 30, 3 * size)) as arc:

        def one(i: int) -> Ingested:
            data, ts = parts[i]
            fut: Future[Ingested] = arc.submit(data, ts)
            return fut.result(const.WRITE_TIMEOUT)

        with Timer() as t, ThreadPoolExecutor(threads) as pool:
            done = list(pool.map(one, range(len(parts))))
        assert all(d.new_instance for d in done)
        assert arc.index.counts()[2] == len(parts)
    return t.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=400)
    ap.add_argument("--threads", type=int, default=4, help="submitting threads (default 4)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="p2pacs-bench-", dir=args.dir))
    try:
        files = bench_files(work / "src", args.instances)
        parts: list[tuple[memoryview, str]] = []
        for f in files:
            p = split_part10(f.read_bytes())
            parts.append((p.dataset, p.transfer_syntax))
        total_mb = sum(len(d) for d, _ in parts) / 1e6
        ceilings: list[float] = []
        archives: list[float] = []
        for r in range(args.rounds):
            for which in ("ceiling", "archive") if r % 2 == 0 else ("archive", "ceiling"):
                if which == "ceiling":
                    ceilings.append(ceiling(parts, work / f"plain{r}", args.threads))
                else:
                    archives.append(archive_ingest(parts, work / f"arc{r}", args.threads))
            shutil.rmtree(work / f"plain{r}")
            shutil.rmtree(work / f"arc{r}")
            c, a = ceilings[-1], archives[-1]
            print(
                f"round {r + 1}: ceiling {total_mb / c:.0f} MB/s, archive {total_mb / a:.0f} MB/s "
                f"({len(parts) / a:.0f} instances/s)",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    c, a = statistics.median(ceilings), statistics.median(archives)
    result = {
        "instances": len(parts),
        "instances_per_s": round(len(parts) / a, 1),
        "mb_per_s": round(total_mb / a, 1),
        "ceiling_mb_per_s": round(total_mb / c, 1),
        "ratio_vs_ceiling": round(c / a, 3),
        "rounds": args.rounds,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
