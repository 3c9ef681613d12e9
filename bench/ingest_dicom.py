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

``--associations 1,4,8`` sends the same files over K concurrent storescu processes (file i on
association i mod K) for each K, and adds ``p2pacs_w1`` (``dicom.workers = 1``, the in-process
gateway) beside ``p2pacs`` (the default: one gateway worker per core). The JSON then holds
``<receiver>_k<K>_per_s`` and ``ratio_vs_orthanc_k<K>`` for each K, and the load average, and
``<receiver>_k<K>_cpu_us``: the receiver's CPU time (user + system of its process and every
descendant, e.g. the gateway workers, from ``/proc``) over the send, per instance, least of the
rounds; ``<receiver>_k<K>_senders_cpu_us``: the same for the K storescu processes, which share
the two cores with the receiver (receiver + senders per instance, times the rate, is at most
2 cores).

``--baseline-code DIR`` (e.g. ``git archive main | tar -x -C DIR``) adds ``p2pacs_base`` and
``p2pacs_base_w1``: the same two sites run from the code in DIR, in the same run, so a change
is measured against what it replaced on the same files and load (``ratio_vs_base_k<K>``).

    python bench/ingest_dicom.py --instances 200
    python bench/ingest_dicom.py --instances 400 --associations 1,4,8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

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
    tool_path,
)

HERE = Path(__file__).resolve().parent
START_TIMEOUT = 30.0
CLOCK = os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return out
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            out += [child, *_descendants(child)]
    return out


def tree_cpu(pid: int) -> float:
    """User + system seconds of a process and its live descendants, every thread (/proc)."""
    total = 0.0
    for p in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK
    return total


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


def send(aet: str, port: int, files: list[Path], associations: int = 1) -> float:
    """Seconds for ``associations`` concurrent storescu processes to send every file (file i
    on association i mod K; raises on any failure)."""
    if associations == 1:
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
    base = [tool_path("storescu"), "-aet", "BENCH", "-aec", aet, "--max-send-pdu", "131072"]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*base, "127.0.0.1", str(port), *map(str, files[i::associations])],
            env=peer_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(associations)
    ]
    errors = [(p.wait(600), p.stderr.read() if p.stderr else "") for p in procs]
    seconds = time.perf_counter() - start
    failed = [err for code, err in errors if code != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {associations} storescu failed: {failed[0][-500:]}")
    return seconds


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


class Measured(NamedTuple):
    rate: float  # best instances/s over the rounds
    cpu_us: float  # least receiver CPU per instance (all its processes)
    senders_cpu_us: float  # least CPU of the storescu processes per instance, same two cores


def _children_cpu() -> float:
    """CPU seconds of this process's ended and waited-for children (the senders)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(
    name: str,
    *,
    make: Callable[[Path], AbstractContextManager[Any]],
    files: list[Path],
    work: Path,
    rounds: int,
    check: Callable[[Any, Path], int],
    associations: int = 1,
) -> Measured:
    """Best rate and least CPU per instance over ``rounds`` sends, each into a fresh
    receiver."""
    best, least_cpu, least_senders = 0.0, float("inf"), float("inf")
    for r in range(rounds):
        folder = work / f"{name}-k{associations}-{r}"
        folder.mkdir()
        with make(folder) as peer:
            pid = peer.proc.pid
            before, senders_before = tree_cpu(pid), _children_cpu()
            seconds = send(peer.aet, peer.port, files, associations)
            # only the senders ended meanwhile: the receiver is still running
            senders = _children_cpu() - senders_before
            cpu = tree_cpu(pid) - before
            received = check(peer, folder)
        shutil.rmtree(folder, ignore_errors=True)
        if received != len(files):
            raise RuntimeError(f"{name} holds {received} of {len(files)} instances")
        rate = len(files) / seconds
        cpu_us, senders_us = cpu / len(files) * 1e6, senders / len(files) * 1e6
        print(f"{name} K={associations} round {r + 1}: {rate:.0f} instances/s, "
              f"{cpu_us:.0f} µs CPU per instance (senders {senders_us:.0f})",
              file=sys.stderr)  # fmt: skip
        best, least_cpu = max(best, rate), min(least_cpu, cpu_us)
        least_senders = min(least_senders, senders_us)
    return Measured(best, least_cpu, least_senders)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument(
        "--associations",
        default="",
        help="comma-separated K values: K concurrent storescu associations each (e.g. 1,4,8)",
    )
    ap.add_argument(
        "--baseline-code",
        type=Path,
        default=None,
        help="with --associations: also run p2pacs from the code in this folder (same run)",
    )
    args = ap.parse_args()
    if args.associations:
        concurrent(args)
        return

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
        measured = {
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
        rates = {name: m.rate for name, m in measured.items()}
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


def p2pacs_site(folder: Path, workers: int) -> P2pacsServe:
    """``p2pacs serve`` with ``dicom.workers`` set (0: one per core) before it starts."""
    from p2pacs.site import Site

    site = Site.init(folder / "site")
    site.config.dicom.workers = workers
    site.save_config()
    return P2pacsServe(folder / "site", "P2PACS")


class BaselineServe(P2pacsServe):  # type: ignore[misc]
    """``p2pacs serve`` run from another copy of the code (``--baseline-code``): its processes
    start in that folder with it on PYTHONPATH (``python -m`` puts the working folder first on
    ``sys.path``, so both are needed)."""

    code: Path = Path()

    def start(self) -> None:
        before, cwd = os.environ.get("PYTHONPATH"), Path.cwd()
        os.environ["PYTHONPATH"] = str(self.code)  # what init, serve and its workers import
        os.chdir(self.code)
        try:
            super().start()
        finally:
            os.chdir(cwd)
            if before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = before


def baseline_site(code: Path, folder: Path, workers: int) -> P2pacsServe:
    from p2pacs.site import Site

    site = Site.init(folder / "site")
    site.config.dicom.workers = workers
    site.save_config()
    serve = BaselineServe(folder / "site", "P2PACS")
    serve.code = code
    return serve


def p2pacs_count(peer: P2pacsServe, folder: Path) -> int:
    """What the running site answers to C-FIND (its LMDB belongs to the server while it runs)."""
    import pydicom

    out = folder / "find"
    out.mkdir()
    run_dcmtk(
        "findscu", "-S", "-aec", peer.aet, "-X", "-od", out,
        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
        "-k", "NumberOfStudyRelatedInstances", "127.0.0.1", peer.port,
    )  # fmt: skip
    return sum(int(pydicom.dcmread(p).NumberOfStudyRelatedInstances) for p in out.iterdir())


def concurrent(args: argparse.Namespace) -> None:
    """``--associations``: every receiver at every K, same files, same run."""
    ks = [int(k) for k in args.associations.split(",") if k.strip()]
    work = Path(tempfile.mkdtemp(prefix="p2pacs-bench-", dir=args.dir))
    load_before = os.getloadavg()
    rates: dict[str, float] = {}
    cpus: dict[str, float] = {}
    try:
        files = bench_files(work / "src", args.instances)
        receivers: dict[str, tuple[Callable[[Path], Any], Callable[[Any, Path], int]]] = {
            "storescp": (StoreSCP, lambda _p, d: count_files(d)),
            "orthanc": (
                lambda d: Orthanc(d, "ORTHANC"),
                lambda p, _d: int(p.get("/statistics")["CountInstances"]),
            ),
            "pynetdicom": (PynetdicomSCP, lambda _p, d: count_files(d)),
            "p2pacs": (lambda d: p2pacs_site(d, 0), p2pacs_count),
            "p2pacs_w1": (lambda d: p2pacs_site(d, 1), p2pacs_count),
        }
        code = args.baseline_code
        if code is not None:
            receivers["p2pacs_base"] = (lambda d: baseline_site(code, d, 0), p2pacs_count)
            receivers["p2pacs_base_w1"] = (lambda d: baseline_site(code, d, 1), p2pacs_count)
        for k in ks:
            for name, (make, check) in receivers.items():
                m = measure(
                    name, make=make, check=check, files=files, work=work,
                    rounds=args.rounds, associations=k,
                )  # fmt: skip
                rates[f"{name}_k{k}_per_s"] = m.rate
                cpus[f"{name}_k{k}_cpu_us"] = m.cpu_us
                cpus[f"{name}_k{k}_senders_cpu_us"] = m.senders_cpu_us
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "instances": len(files),
        "cores": os.cpu_count(),
        "workers_default": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        **{k: round(v, 1) for k, v in rates.items()},
        **{k: round(v) for k, v in cpus.items()},
    }
    for k in ks:
        result[f"ratio_vs_orthanc_k{k}"] = round(
            rates[f"p2pacs_k{k}_per_s"] / rates[f"orthanc_k{k}_per_s"], 3
        )
        result[f"ratio_w1_vs_orthanc_k{k}"] = round(
            rates[f"p2pacs_w1_k{k}_per_s"] / rates[f"orthanc_k{k}_per_s"], 3
        )
        result[f"ratio_workers_vs_w1_k{k}"] = round(
            rates[f"p2pacs_k{k}_per_s"] / rates[f"p2pacs_w1_k{k}_per_s"], 3
        )
        if args.baseline_code is not None:
            result[f"ratio_vs_base_k{k}"] = round(
                rates[f"p2pacs_k{k}_per_s"] / rates[f"p2pacs_base_k{k}_per_s"], 3
            )
            result[f"ratio_w1_vs_base_w1_k{k}"] = round(
                rates[f"p2pacs_w1_k{k}_per_s"] / rates[f"p2pacs_base_w1_k{k}_per_s"], 3
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
