"""CPU per instance of the single-association C-STORE path, receiver side.

The p2pacs gateway runs in this process (an ``Archive`` and a ``Gateway``, as a worker does);
dcmtk ``storescu`` (TCP_NODELAY=1, 128 KiB PDUs, one association) sends N generated CT instances
(~0.5 MB). The process's own CPU time (user + system, every thread: PDU reassembly, validation,
hashing, the LMDB writer) over the send, divided by N, is the cost the gateway pays per instance;
a bare pynetdicom SCP child (``_pynetdicom_scp.py``: writes ``encoded_dataset()`` to a file) is
measured the same way beside it, from ``/proc``. The gateway is measured twice per round on the
same files: as it runs (``gateway/rawrecv.py`` reads C-STORE data sets off the socket and
answers them) and with that fast path left out (pynetdicom's own receive path, as before it):
``ratio_cpu_fast_vs_pynetdicom_recv`` is their ratio. Last line: JSON.

    python bench/store_cpu.py --instances 200 [--profile out.txt]

``--profile``: also sample the receiving process with py-spy (``record -f raw``, all threads)
and write the top functions by own samples.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))

from _common import bench_files
from ingest_dicom import PynetdicomSCP, send

from p2pacs.archive import Archive
from p2pacs.config import DicomConfig
from p2pacs.gateway import Gateway
from p2pacs.gateway.rawrecv import fast_receive

CLOCK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """User + system seconds of a process (every thread), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def measure_p2pacs(
    files: list[Path], work: Path, sync: bool, fast: bool = True
) -> tuple[float, float]:
    """(CPU µs per instance, instances/s) of the in-process gateway; ``fast``: with the
    receive fast path (``gateway/rawrecv.py``), else with pynetdicom's receive path."""
    archive = Archive(work / f"db-{sync}-{fast}", map_size=1 << 34, sync=sync)
    gw = Gateway(archive, DicomConfig(ae_title="P2PACS", port=0, bind="127.0.0.1", max_pdu=0))
    if not fast:
        gw.handlers = [h for h in gw.handlers if h[1] is not fast_receive]
    gw.start()
    try:
        before = self_cpu()
        seconds = send("P2PACS", gw.address[1], files)
        used = self_cpu() - before
        assert archive.index.counts()[2] == len(files)
    finally:
        gw.stop()
        archive.close()
    return used / len(files) * 1e6, len(files) / seconds


def measure_pynetdicom(files: list[Path], work: Path) -> tuple[float, float]:
    out = work / "pynetdicom"
    out.mkdir()
    with PynetdicomSCP(out) as scp:
        assert scp.proc is not None
        before = cpu_of(scp.proc.pid)
        seconds = send(scp.aet, scp.port, files)
        used = cpu_of(scp.proc.pid) - before
    return used / len(files) * 1e6, len(files) / seconds


def profile(files: list[Path], work: Path, out: Path) -> None:
    """py-spy over the in-process gateway while it receives ``files``."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    raw = work / "spy.txt"
    rec = subprocess.Popen(
        [spy, "record", "-r", "250", "-f", "raw", "-o", str(raw), "-p", str(os.getpid()),
         "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.0)  # py-spy attaches
    try:
        measure_p2pacs(files, work, sync=True)
    finally:
        rec.send_signal(2)
        rec.wait(30)
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.split(";")[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    top = sorted(own.items(), key=lambda kv: -kv[1])[:40]
    out.write_text("\n".join(f"{n / total:6.1%}  {name}" for name, n in top) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="p2pacs-cpu-"))
    try:
        files = bench_files(work / "src", args.instances)
        load = os.getloadavg()
        p2, slow, bare = [], [], []
        for r in range(args.rounds):
            (work / f"r{r}").mkdir(parents=True)
            p2.append(measure_p2pacs(files, work / f"r{r}", sync=True))
            slow.append(measure_p2pacs(files, work / f"r{r}", sync=True, fast=False))
            bare.append(measure_pynetdicom(files, work / f"r{r}"))
            print(f"round {r + 1}: p2pacs {p2[-1][0]:.0f} µs, with pynetdicom's receive path "
                  f"{slow[-1][0]:.0f} µs, pynetdicom {bare[-1][0]:.0f} µs",
                  file=sys.stderr)  # fmt: skip
        if args.profile is not None:
            profile(files, work / "prof", args.profile)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best_p2, best_slow, best_bare = min(p2), min(slow), min(bare)
    print(
        json.dumps(
            {
                "instances": args.instances,
                "loadavg": [round(x, 2) for x in load],
                "p2pacs_cpu_us_per_instance": round(best_p2[0]),
                "p2pacs_per_s": round(best_p2[1], 1),
                "p2pacs_pynetdicom_recv_cpu_us_per_instance": round(best_slow[0]),
                "p2pacs_pynetdicom_recv_per_s": round(best_slow[1], 1),
                "pynetdicom_cpu_us_per_instance": round(best_bare[0]),
                "pynetdicom_per_s": round(best_bare[1], 1),
                "ratio_cpu_vs_pynetdicom": round(best_p2[0] / best_bare[0], 3),
                "ratio_cpu_fast_vs_pynetdicom_recv": round(best_p2[0] / best_slow[0], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
