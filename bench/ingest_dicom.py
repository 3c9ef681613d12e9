"""DICOM ingest over the network: dcmtk storescu into four receivers, same files, same run.

N generated CT instances (~0.5 MB each) are sent by ``storescu`` (TCP_NODELAY=1, 128 KiB
PDUs, one association) to, in turn:
(a) dcmtk ``storescp +B -pdu 131072`` writing to a folder,
(b) Orthanc (``MaximumPduLength`` 131072, no storage compression),
(c) a bare pynetdicom SCP (``maximum_pdu_size`` 0) whose handler only writes
    ``event.encoded_dataset()`` to a file,
(d) ``p2pacs serve`` (durable: LMDB commit with fsync before the C-STORE response).
Each receiver gets ``--rounds`` sends (fresh receiver each time) and keeps its best. Last line:
a JSON object. The peers come from tests/interop/interop_peers.py.

One association, so every C-STORE waits for its own commit: with ``[store] sync = false``
p2pacs matched the bare pynetdicom SCP here, i.e. the gap to it is the fsync. Orthanc 1.10
fsyncs too (``SyncStorageArea`` defaults to true); the bare pynetdicom SCP and storescp do not.

    python bench/ingest_dicom.py --instances 200
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))

from _common import bench_files

from interop_peers import (  # type: ignore[import-not-found,unused-ignore]
    Orthanc,
    P2pacsServe,
    StoreSCP,
    free_tcp_port,
    peer_env,
    run_dcmtk,
)

HERE = Path(__file__).resolve().parent
START_TIMEOUT = 30.0


class PynetdicomSCP:
    """bench/_pynetdicom_scp.py as a child process."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.port, self.aet = out_dir, free_tcp_port(), "PYNETDICOM"
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> PynetdicomSCP:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_pynetdicom_scp.py"), str(self.out_dir), str(self.port)],
            stdout=subprocess.PIPE,
            text=True,
            env=peer_env(),
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        line = self.proc.stdout.readline()  # "ready", or "" if it died
        if line.strip() != "ready" or time.monotonic() > deadline:
            raise RuntimeError(f"pynetdicom SCP did not start: {line!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def send(aet: str, port: int, files: list[Path]) -> float:
    """Seconds for storescu to send every file on one association (raises on any failure)."""
    start = time.perf_counter()
    run_dcmtk(
        "storescu",
        "-aet",
        "BENCH",
        "-aec",
        aet,
        "--max-send-pdu",
        "131072",
        "127.0.0.1",
        port,
        *files,
        timeout=600,
    )
    return time.perf_counter() - start


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def measure(
    name: str,
    *,
    make: Callable[[Path], AbstractContextManager[Any]],
    files: list[Path],
    work: Path,
    rounds: int,
    check: Callable[[Any, Path], int],
) -> float:
    """Best instances/s over ``rounds`` sends, each into a fresh receiver."""
    best = 0.0
    for r in range(rounds):
        folder = work / f"{name}{r}"
        folder.mkdir()
        with make(folder) as peer:
            seconds = send(peer.aet, peer.port, files)
            received = check(peer, folder)
        shutil.rmtree(folder, ignore_errors=True)
        if received != len(files):
            raise RuntimeError(f"{name} holds {received} of {len(files)} instances")
        rate = len(files) / seconds
        print(f"{name} round {r + 1}: {rate:.0f} instances/s", file=sys.stderr)
        best = max(best, rate)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="p2pacs-bench-", dir=args.dir))
    try:
        files = bench_files(work / "src", args.instances)

        def p2pacs_count(peer: P2pacsServe, folder: Path) -> int:
            # the site's LMDB belongs to the server while it runs: count what it answers to C-FIND
            out = folder / "find"
            out.mkdir()
            run_dcmtk(
                "findscu",
                "-S",
                "-aec",
                peer.aet,
                "-X",
                "-od",
                out,
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                "StudyInstanceUID",
                "-k",
                "NumberOfStudyRelatedInstances",
                "127.0.0.1",
                peer.port,
            )
            import pydicom

            return sum(int(pydicom.dcmread(p).NumberOfStudyRelatedInstances) for p in out.iterdir())

        def orthanc_count(peer: Orthanc, _folder: Path) -> int:
            return int(peer.get("/statistics")["CountInstances"])

        def dir_count(peer: Any, folder: Path) -> int:
            return count_files(folder)

        common = {"files": files, "work": work, "rounds": args.rounds}
        rates = {
            "storescp": measure(
                "storescp", make=StoreSCP, check=lambda _p, d: count_files(d), **common
            ),
            "orthanc": measure(
                "orthanc", make=lambda d: Orthanc(d, "ORTHANC"), check=orthanc_count, **common
            ),
            "pynetdicom": measure("pynetdicom", make=PynetdicomSCP, check=dir_count, **common),
            "p2pacs": measure(
                "p2pacs",
                make=lambda d: P2pacsServe(d / "site", "P2PACS"),
                check=p2pacs_count,
                **common,
            ),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p2 = rates["p2pacs"]
    result = {
        "instances": len(files),
        **{f"{k}_per_s": round(v, 1) for k, v in rates.items()},
        "ratio_vs_storescp": round(p2 / rates["storescp"], 3),
        "ratio_vs_orthanc": round(p2 / rates["orthanc"], 3),
        "ratio_vs_pynetdicom": round(p2 / rates["pynetdicom"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
