"""DICOM retrieval: dcmtk getscu (C-GET) and movescu (C-MOVE) of one study, p2pacs vs Orthanc.

One study of N generated CT instances (~0.5 MB each, Explicit VR Little Endian) is stored in
(a) ``p2pacs serve`` on a standalone site (``p2pacs init`` + ``import``, its own process) and
(b) Orthanc 1.10 (``MaximumPduLength`` 131072, no storage compression; uploaded over REST).
Each is then asked for the whole study by
- ``getscu -S -pdu 131072 +B`` (C-GET; files written as received into a temp folder), and
- ``movescu -S`` (C-MOVE) to a dcmtk ``storescp +B -pdu 131072`` (one per concurrent move),
with 1 and ``--concurrency`` (default 4) retrievals at once. Every dcmtk tool and Orthanc run
with TCP_NODELAY=1. Rounds alternate between the two servers so noise hits both; each figure is
the best of ``--rounds``. Run as root, everything runs in a network namespace holding only
``lo`` (Orthanc listens on 0.0.0.0 whatever its config says). Last line: a JSON object.

CPU per instance is the user+system time (``/proc/PID/stat``) of the server process and its
child processes (p2pacs's gateway workers) over the retrieval, divided by the instances sent: it
shows where a two-core machine runs out.

    python bench/retrieve.py --instances 400 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))

from p2pacs.samples import generate_instances

from interop_peers import (  # type: ignore[import-not-found,unused-ignore]
    Orthanc,
    StoreSCP,
    free_tcp_port,
    peer_env,
    stop_process,
    tool_path,
)

TOOL_TIMEOUT = 600.0  # seconds for one retrieval
TICK = os.sysconf("SC_CLK_TCK")  # /proc/PID/stat counts CPU time in these
NETNS_ENV = "P2PACS_BENCH_NETNS"  # set in the child that runs inside the namespace


def _own_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads) so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (every thread's ``children`` list)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a server process and its running descendants
    (p2pacs's gateway workers do the sending; a worker that ends mid-measurement would be
    missed, which the bench does not do)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += _own_cpu(p)
        todo += _children(p)
    return total


@contextmanager
def p2pacs_server(
    site: Path,
    files_dir: Path,
    destinations: dict[str, str],
    name: str = "p2pacs",
    source: Path | None = None,
) -> Iterator[Any]:
    """A standalone site holding the files, served by ``p2pacs serve`` in its own process
    (``source``: another checkout's folder holding ``p2pacs/``, e.g. the previous release)."""
    base = [sys.executable, "-m", "p2pacs", "--site", str(site)]
    env = peer_env()
    cwd = site.parent  # not this checkout: ``-m`` puts the working folder first on sys.path
    if source is not None:
        env["PYTHONPATH"] = str(source)
    init = [*base, "-q", "init"]
    subprocess.run(init, check=True, capture_output=True, timeout=60, env=env, cwd=cwd)
    from p2pacs.site import Site

    s = Site.open(site)
    s.config.dicom.destinations.update(destinations)
    s.save_config()
    load = [*base, "-q", "import", str(files_dir)]
    subprocess.run(load, check=True, timeout=600, env=env, cwd=cwd)
    port = free_tcp_port()
    log = (site.parent / "serve.log").open("wb")
    proc = subprocess.Popen(
        [*base, "serve", "--port", str(port), "--aet", "P2PACS", "--bind", "127.0.0.1"],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ready AET host:port", or "" if it died
        if not line.startswith("ready "):
            raise RuntimeError(f"p2pacs serve did not start ({line!r}); see {log.name}")
        yield type("Server", (), {"name": name, "aet": "P2PACS", "port": port, "pid": proc.pid})
    finally:
        stop_process(proc)
        log.close()


@contextmanager
def orthanc_server(work: Path, files: list[Path], destinations: dict[str, str]) -> Iterator[Any]:
    """Orthanc as a plain process, at its best settings, holding the files (REST upload)."""
    work.mkdir(parents=True)
    settings = {
        "Name": "bench",
        "DicomScuTimeout": 60,
        "DicomAlwaysAllowGet": True,
        "DicomModalities": {
            aet: [aet, *hostport.rsplit(":", 1)] for aet, hostport in destinations.items()
        },
    }
    with Orthanc(work, extra=settings) as orthanc:
        assert orthanc.proc is not None
        for path in files:
            orthanc.upload(path.read_bytes())
        yield type(
            "Server",
            (),
            {"name": "orthanc", "aet": "ORTHANC", "port": orthanc.port, "pid": orthanc.proc.pid},
        )


def _run(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, env=peer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait(procs: list[subprocess.Popen[str]]) -> None:
    """Wait for every tool; raise with its output if one failed (the others are stopped)."""
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TOOL_TIMEOUT)
            if p.returncode != 0:
                raise RuntimeError(f"{p.args!r} exited with {p.returncode}:\n{out[-3000:]}")
    finally:
        for p in procs:
            stop_process(p)


def _interrupt(proc: subprocess.Popen[Any]) -> None:
    """Stop py-spy with SIGINT, so it writes its profile."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        stop_process(proc)


def keys(study: str) -> list[str]:
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]


def get_cmd(server: Any, study: str, i: int, out: Path) -> list[str]:
    aet = f"GETSCU{i}"
    opts = ["-S", "-aet", aet, "-aec", server.aet, "-pdu", "131072", "+B", "-od", str(out)]
    return [tool_path("getscu"), *opts, *keys(study), "127.0.0.1", str(server.port)]


def move_cmd(server: Any, study: str, i: int, dest: StoreSCP) -> list[str]:
    opts = ["-S", "-aet", f"MOVESCU{i}", "-aec", server.aet, "-aem", dest.aet]
    return [tool_path("movescu"), *opts, *keys(study), "127.0.0.1", str(server.port)]


def cget(server: Any, study: str, outs: list[Path]) -> float:
    """Seconds for len(outs) concurrent getscu runs to each receive the whole study."""
    start = time.perf_counter()
    _wait([_run(get_cmd(server, study, i, out)) for i, out in enumerate(outs)])
    return time.perf_counter() - start


def cmove(server: Any, study: str, dests: list[StoreSCP]) -> float:
    """Seconds for len(dests) concurrent movescu runs, each to its own storescp."""
    start = time.perf_counter()
    _wait([_run(move_cmd(server, study, i, d)) for i, d in enumerate(dests)])
    return time.perf_counter() - start


def count_and_clear(folders: list[Path]) -> int:
    """Files received in each folder (the smallest count); the folders are emptied."""
    counts = []
    for f in folders:
        counts.append(sum(1 for p in f.iterdir() if p.is_file()))
        for p in f.iterdir():
            p.unlink()
    return min(counts)


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n = args.instances
    paths = generate_instances(
        work / "src",
        studies=1,
        series_per_study=2,
        instances_per_series=(n + 1) // 2,
        implicit_vr_every=0,
    )
    for extra in paths[n:]:
        extra.unlink()
    files = paths[:n]
    import pydicom

    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    k = args.concurrency
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with ExitStack() as stack:
        scps = [stack.enter_context(StoreSCP(work / f"scp{i}", f"STORESCP{i}")) for i in range(k)]
        destinations = {s.aet: f"127.0.0.1:{s.port}" for s in scps}
        servers = []
        if "p2pacs" in args.servers:
            servers.append(
                stack.enter_context(p2pacs_server(work / "site", work / "src", destinations))
            )
        if args.baseline_src is not None:
            servers.append(
                stack.enter_context(
                    p2pacs_server(
                        work / "site-base", work / "src", destinations, "p2pacs_base",
                        args.baseline_src.resolve(),
                    )
                )
            )  # fmt: skip
        if "orthanc" in args.servers:
            servers.append(
                stack.enter_context(orthanc_server(work / "orthanc", files, destinations))
            )
        gets = [work / f"get{i}" for i in range(k)]
        for g in gets:
            g.mkdir()
        modes: list[tuple[str, int, Callable[[Any], float], list[Path]]] = [
            ("cget", 1, lambda s: cget(s, study, gets[:1]), gets[:1]),
            ("cmove", 1, lambda s: cmove(s, study, scps[:1]), [d.out_dir for d in scps[:1]]),
        ]
        if k > 1:
            modes += [
                (f"cget_{k}", k, lambda s: cget(s, study, gets), gets),
                (f"cmove_{k}", k, lambda s: cmove(s, study, scps), [d.out_dir for d in scps]),
            ]
        for s in servers:  # warm-up: page cache, LMDB map, Orthanc's index
            modes[0][2](s)
            count_and_clear(modes[0][3])
        if args.py_spy is not None:  # sample the p2pacs process during the measured rounds
            spy = subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw",
                 "--rate", "250", "--gil", "--threads", "--subprocesses", "-o", str(args.py_spy),
                 "--pid", str(servers[0].pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            stack.callback(_interrupt, spy)
        for r in range(args.rounds):
            for mode, m, run, folders in modes:
                if args.modes and mode.split("_")[0] not in args.modes:
                    continue
                for s in servers:
                    c0 = cpu_seconds(s.pid)
                    seconds = run(s)
                    used = cpu_seconds(s.pid) - c0
                    got = count_and_clear(folders)
                    if got != n:
                        raise RuntimeError(f"{s.name} {mode}: {got} of {n} instances arrived")
                    rate = m * n / seconds
                    key = f"{s.name}_{mode}"
                    rates.setdefault(key, []).append(rate)
                    cpu.setdefault(key, []).append(used / (m * n) * 1e6)
                    print(
                        f"round {r + 1} {key}: {rate:.0f} instances/s, "
                        f"{used / (m * n) * 1e6:.0f} CPU us/instance",
                        file=sys.stderr,
                        flush=True,
                    )
    result: dict[str, Any] = {"instances": n, "rounds": args.rounds, "concurrency": k}
    for key, vals in sorted(rates.items()):
        result[f"{key}_per_s"] = round(max(vals), 1)
        result[f"{key}_spread"] = [round(min(vals)), round(max(vals))]
    for mode in ("cget", "cmove", f"cget_{k}", f"cmove_{k}"):
        p, o = rates.get(f"p2pacs_{mode}"), rates.get(f"orthanc_{mode}")
        b = rates.get(f"p2pacs_base_{mode}")
        kind, _, many = mode.partition("_")
        tail = f"_{many}" if many else ""
        if p and o:
            result[f"ratio_{kind}_vs_orthanc{tail}"] = round(max(p) / max(o), 3)
        if b and o:
            result[f"base_ratio_{kind}_vs_orthanc{tail}"] = round(max(b) / max(o), 3)
    for key, vals in sorted(cpu.items()):
        result.setdefault("cpu_us_per_instance", {})[key] = round(min(vals))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--instances", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--servers", nargs="+", default=["p2pacs", "orthanc"])
    ap.add_argument("--modes", nargs="*", default=[], help="cget and/or cmove (default: both)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also serve from this source tree (e.g. `git archive HEAD` unpacked): before/after",
    )
    ap.add_argument("--py-spy", type=Path, default=None, help="profile p2pacs into this file")
    ap.add_argument("--no-netns", action="store_true", help="stay in this network namespace")
    args = ap.parse_args()

    if os.geteuid() == 0 and not args.no_netns and NETNS_ENV not in os.environ:
        # rerun inside a namespace holding only lo, so Orthanc's 0.0.0.0 listeners stay private
        ns = f"p2pacs-bench-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
            rc = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, *sys.argv],
                env={**os.environ, NETNS_ENV: ns},
                check=False,
            ).returncode
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        sys.exit(rc)

    work = Path(tempfile.mkdtemp(prefix="p2pacs-retrieve-", dir=args.dir))
    try:
        result = bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
