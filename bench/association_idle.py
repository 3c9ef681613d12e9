"""An association's cost at rest and per round trip: the event-driven reactors vs a baseline tree.

A gateway (``p2pacs.gateway.Gateway`` on loopback, port 0, over an empty archive) and a
pynetdicom SCU with p2pacs's association handlers run in one child process per source tree:
this checkout, and ``--baseline-src DIR`` (e.g. ``git archive main`` unpacked: pynetdicom's
polling reactors, the DUL thread at p2pacs's former 0.1 ms poll) run beside it, alternating
rounds, so the machine's other load hits both. Each child reports

- ``idle_wakeups_per_s``: voluntary context switches per second of each of the association's
  four threads (both ends' association reactor and DUL thread) while it is open and unused for
  ``--idle`` seconds (each is a sleep or a wait the thread came back from);
- ``idle_cpu_pct``: their CPU time over that interval (``schedstat``), % of one core;
- ``echo_ms``: C-ECHO round trips on the open association (p50, p90);
- ``assoc_echo_ms``: association + C-ECHO (release not timed), p50 and p90.

Last line: JSON with the figures per tree and ``ratio_*`` (baseline / this tree: > 1 means this
tree costs less). Without ``--baseline-src`` only this tree is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 300.0  # seconds for one measuring child


def _task_field(tid: int, name: str) -> int:
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def _task_cpu(tid: int) -> float:
    """Seconds thread ``tid`` has run on a CPU (schedstat: nanoseconds, not clock ticks)."""
    return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9


def _pcts(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered) * 1e3, 3),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 3),
    }


def measure(idle: float, echoes: int) -> dict[str, Any]:
    """Child: measure this interpreter's p2pacs (the tree on its PYTHONPATH)."""
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from p2pacs.archive import Archive
    from p2pacs.config import DicomConfig
    from p2pacs.dicom.scu import association_handlers
    from p2pacs.gateway import Gateway

    with (
        tempfile.TemporaryDirectory() as tmp,
        Archive(Path(tmp) / "db", map_size=1 << 28, sync=False) as arc,
    ):
        gw = Gateway(arc, DicomConfig(ae_title="P2PACS", port=0, bind="127.0.0.1", max_pdu=0))
        gw.start()
        try:
            ae = AE(ae_title="BENCHSCU")
            ae.add_requested_context(Verification)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60

            def associate() -> Any:
                host, port = gw.address
                assoc = ae.associate(
                    host, port, ae_title="P2PACS", evt_handlers=association_handlers()
                )
                if not assoc.is_established:
                    raise RuntimeError("no association with the gateway")
                return assoc

            assoc = associate()
            try:
                assoc.send_c_echo()
                threads = [
                    t
                    for t in threading.enumerate()
                    if isinstance(t, Association | DULServiceProvider)
                ]
                if len(threads) != 4:
                    raise RuntimeError(f"expected 4 association threads, found {len(threads)}")
                tids = [t.native_id for t in threads if t.native_id is not None]
                switches = [_task_field(t, "voluntary_ctxt_switches") for t in tids]
                cpu = [_task_cpu(t) for t in tids]
                start = time.perf_counter()
                time.sleep(idle)  # the interval measured
                took = time.perf_counter() - start
                wakeups = [
                    round((_task_field(t, "voluntary_ctxt_switches") - s) / took, 1)
                    for t, s in zip(tids, switches, strict=True)
                ]
                idle_cpu = sum(_task_cpu(t) - c for t, c in zip(tids, cpu, strict=True)) / took
                rtt = []
                for _ in range(echoes):
                    t0 = time.perf_counter()
                    assoc.send_c_echo()
                    rtt.append(time.perf_counter() - t0)
            finally:
                assoc.release()
            setups = []
            for _ in range(max(10, echoes // 10)):
                t0 = time.perf_counter()
                other = associate()
                other.send_c_echo()
                setups.append(time.perf_counter() - t0)
                other.release()
        finally:
            gw.stop()
    return {
        "idle_wakeups_per_s": sorted(wakeups),
        "idle_cpu_pct": round(idle_cpu * 100, 2),
        "echo_ms": _pcts(rtt),
        "assoc_echo_ms": _pcts(setups),
    }


def run_child(src: Path, idle: float, echoes: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "--idle", str(idle),
         "--echoes", str(echoes)],
        cwd=src, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"measuring {src} failed:\n{out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over rounds."""
    return {
        "idle_wakeups_per_s": runs[len(runs) // 2]["idle_wakeups_per_s"],
        "idle_cpu_pct": statistics.median(r["idle_cpu_pct"] for r in runs),
        "echo_ms_p50": statistics.median(r["echo_ms"]["p50"] for r in runs),
        "assoc_echo_ms_p50": statistics.median(r["assoc_echo_ms"]["p50"] for r in runs),
        "rounds": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--baseline-src", type=Path, default=None, help="a source tree to compare")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds the association rests")
    ap.add_argument("--echoes", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.idle, args.echoes)))
        return
    trees = {"p2pacs": ROOT}
    if args.baseline_src is not None:
        trees["baseline"] = args.baseline_src.resolve()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    report: dict[str, Any] = {"load_avg_start": os.getloadavg()}
    for _ in range(args.rounds):
        for name, src in trees.items():
            runs[name].append(run_child(src, args.idle, args.echoes))
            print(f"# {name}: {json.dumps(runs[name][-1])}", file=sys.stderr, flush=True)
    report["load_avg_end"] = os.getloadavg()
    for name, values in runs.items():
        report[name] = _best(values)
    if "baseline" in report:
        ours, base = report["p2pacs"], report["baseline"]
        for key in ("idle_cpu_pct", "echo_ms_p50", "assoc_echo_ms_p50"):
            report[f"ratio_{key}"] = round(base[key] / ours[key], 2) if ours[key] else None
    print(json.dumps(report))


if __name__ == "__main__":
    main()
