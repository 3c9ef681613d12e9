"""C-FIND against Orthanc on the same instances: ``python bench/scale.py --vs-orthanc``.

The synthetic corpus of ``bench/scale.py`` (default 100 k instances, ``--orthanc-size N`` for a
quicker run) is loaded, the same dataset bytes, into
(a) a p2pacs ``Archive`` (LMDB with fsync) through ``Archive.submit``, then served by a
    ``Gateway`` in a child process of its own (like Orthanc, so no client shares its GIL);
(b) Orthanc 1.10 from Debian (its default SQLite index; ``MaximumPduLength`` 131072,
    ``StorageAccessOnFind`` "Never": answers from its database only, its fastest setting; no
    storage compression), as Part-10 files (the dataset behind a file meta header) posted to
    its REST ``POST /instances`` by ``--clients`` HTTP/1.1 keep-alive connections in threads
    of this process (one loader process; Orthanc's own threads do the work). Both load times
    are reported.

Then the same queries (one seeded list per query type, each server asked the same list, the
two servers alternating query by query so the machine's other load hits both) are sent
- through dcmtk's ``findscu`` (one process per query; ``findscu_floor_ms`` is the tool's
  process start, ``findscu --version``, the same for both servers, which the ``_net`` figures
  subtract; ``echoscu`` per server is reported beside, under ``floors``);
- through a pynetdicom SCU in this process (no process start): ``scu_assoc`` opens an
  association per query (what a client that connects per query sees), ``scu_reuse`` sends
  every query of a type on one association (the query alone).
Query types: PatientID, PatientName ``FAMILY*``, AccessionNumber, 7-day StudyDate range,
ModalitiesInStudy + StudyDate, ModalitiesInStudy=NM alone, StudyInstanceUID, SeriesInstanceUID
at SERIES level, SOPInstanceUID at IMAGE level, and the first answer of an unconstrained
STUDY-level query. p50/p99 in ms per type and channel; the number of matches must agree
between the two servers (checked; a difference is reported as ``match_mismatch``).

The same query lists also go through ``DicomIndex.find`` in this process afterwards
(``p2pacs_index_api``: the index's share), and ``floors`` holds, per server, echoscu, an
association + C-ECHO and a C-ECHO on an open association through the in-process SCU.
``--baseline-src DIR`` serves the same archive with another source tree's p2pacs as well
(``p2pacs_base``, through the same client: a before/after in one run; its ratios under
``cfind_ratio_vs_orthanc_baseline``). ``--reuse DIR`` keeps both loaded servers' data in DIR and
skips loading when DIR already holds the corpus asked for.
``--context-fix`` serves the archive a second time with a proposed gateway change
(``SharedUIDContexts``, below), measured beside the gateway as shipped (``p2pacs_ctxfix``).

Last line: JSON with ``cfind_ratio_vs_orthanc`` per query type (Orthanc p50 / p2pacs p50 over
``scu_assoc``, > 1 means p2pacs is faster) and ``target_3x_met`` per type; the other channels'
ratios beside it. Run as root, everything runs in a network namespace holding only ``lo``
(Orthanc 1.10 listens on 0.0.0.0 whatever its config says).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from scale import (  # type: ignore[import-not-found,unused-ignore]
    CT_STORAGE,
    EXPLICIT_LE,
    IN_FLIGHT,
    STUDY_KEYS,
    Corpus,
    Query,
    StudyInfo,
    queries,
)

from p2pacs.archive import Archive, Ingested
from p2pacs.config import DicomConfig
from p2pacs.dicom.header import Level
from p2pacs.dicom.scu import association_handlers
from p2pacs.gateway import Gateway

from interop_peers import (  # type: ignore[import-not-found,unused-ignore]
    Orthanc,
    peer_env,
    stop_process,
    tool_path,
)

NETNS_ENV = "P2PACS_BENCH_NETNS"  # set in the child that runs inside the namespace
TOOL_TIMEOUT = 300.0  # seconds for one findscu run
IMPL_UID = b"1.2.826.0.1.3680043.10.4242.99"  # implementation class UID of the file meta
SERIES_KEYS = ("SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesNumber",
               "SeriesDescription", "NumberOfSeriesRelatedInstances")  # fmt: skip


# ---- the corpus as Part-10 files ------------------------------------------------------------


def _meta_el(elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    if vr == b"OB":
        return struct.pack("<HH2sHI", 2, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def part10(dataset: bytes) -> bytes:
    """The dataset behind a preamble and a file meta header (the dataset bytes unchanged)."""
    at = dataset.index(b"\x08\x00\x18\x00UI")  # SOPInstanceUID, written by ``Corpus``
    (length,) = struct.unpack_from("<H", dataset, at + 6)
    sop = dataset[at + 8 : at + 8 + length].rstrip(b"\x00")
    body = (
        _meta_el(0x0001, b"OB", b"\x00\x01")
        + _meta_el(0x0002, b"UI", CT_STORAGE.encode())
        + _meta_el(0x0003, b"UI", sop)
        + _meta_el(0x0010, b"UI", EXPLICIT_LE.encode())
        + _meta_el(0x0012, b"UI", IMPL_UID)
    )
    group = struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body))
    return bytes(128) + b"DICM" + group + body + dataset


# ---- the two servers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    aet: str
    port: int
    pid: int


def load_p2pacs(path: Path, corpus: Corpus, size: int) -> tuple[float, list[bytes]]:
    """Submit ``size`` instances durably; return the seconds taken and the datasets."""
    datasets: list[bytes] = []
    stream = corpus.instances()
    with Archive(path) as arc:
        pending: list[Future[Ingested]] = []
        t = time.perf_counter()
        for _ in range(size):
            data, _info = next(stream)
            datasets.append(data)
            pending.append(arc.submit(data, EXPLICIT_LE))
            if len(pending) >= IN_FLIGHT:
                for f in pending[: IN_FLIGHT // 2]:
                    f.result(600)
                del pending[: IN_FLIGHT // 2]
        for f in pending:
            f.result(600)
        return time.perf_counter() - t, datasets


@contextmanager
def p2pacs_server(
    path: Path, log_path: Path, context_fix: bool = False, baseline: Path | None = None
) -> Iterator[Server]:
    """The archive served by a Gateway in a child process (this script with ``--serve``; with
    ``baseline``, that source tree's copy of it, running that tree's p2pacs)."""
    log = log_path.open("wb")
    fix = ["--context-fix"] if context_fix else []
    script, env = Path(__file__).resolve(), None
    if baseline is not None:
        script = baseline / "bench" / Path(__file__).name
        env = {**os.environ, "PYTHONPATH": str(baseline)}
    proc = subprocess.Popen(
        [sys.executable, str(script), "--serve", str(path), *fix],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=baseline,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready "):
            raise RuntimeError(f"the p2pacs gateway did not start ({line!r}); see {log_path}")
        name = "p2pacs_base" if baseline else "p2pacs_ctxfix" if context_fix else "p2pacs"
        yield Server(name, "P2PACS", int(line.split()[1]), proc.pid)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the child stops its gateway when its stdin ends
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            stop_process(proc)
        log.close()


class SharedUIDContexts(list):  # type: ignore[type-arg]
    """The gateway's supported contexts, copied per association without copying the UIDs.

    pynetdicom deep-copies the acceptor's supported contexts for every association it accepts
    (``RequestHandler._create_association``): the gateway's 178 contexts carry 7,682 transfer
    syntax UIDs, each a ``str`` subclass that ``deepcopy`` rebuilds one by one, ~45-65 ms of CPU
    per association here. UIDs are immutable, so a copy of each context with its own syntax
    list is as independent as the deep copy for everything the negotiation and the gateway's
    ``EVT_REQUESTED`` handler change. A proposed fix for ``p2pacs/gateway/server.py``, measured
    here as the ``p2pacs_ctxfix`` server (``--context-fix``) beside the gateway as shipped.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        out = []
        for cx in self:
            twin = copy.copy(cx)
            twin._transfer_syntax = list(cx._transfer_syntax)
            out.append(twin)
        return out


def serve(path: Path, context_fix: bool) -> None:
    """Child process: serve the archive at ``path`` until stdin is closed."""
    with Archive(path) as arc:
        gw = Gateway(arc, DicomConfig(ae_title="P2PACS", port=0, bind="127.0.0.1", max_pdu=0))
        gw.start()
        if context_fix:
            server = gw._server
            assert server is not None
            server.contexts = SharedUIDContexts(server.contexts)
        try:
            print(f"ready {gw.address[1]}", flush=True)
            sys.stdin.read()
        finally:
            gw.stop()


@contextmanager
def orthanc_server(work: Path) -> Iterator[tuple[Server, str, subprocess.Popen[Any]]]:
    work.mkdir(parents=True, exist_ok=True)  # an existing one: ``--reuse``
    settings = {
        "Name": "bench",
        "StorageAccessOnFind": "Never",
        "KeepAlive": True,
        "SaveJobs": False,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "DicomAlwaysAllowFind": True,
    }
    with Orthanc(work, extra=settings) as orthanc:
        assert orthanc.proc is not None
        host_port = orthanc.url.removeprefix("http://")
        yield Server("orthanc", "ORTHANC", orthanc.port, orthanc.proc.pid), host_port, orthanc.proc


def load_orthanc(hostport: str, datasets: list[bytes], clients: int) -> float:
    """POST every instance to Orthanc over ``clients`` keep-alive connections; seconds taken."""
    host, port = hostport.rsplit(":", 1)
    errors: list[str] = []
    lock = threading.Lock()
    todo = iter(range(len(datasets)))

    def worker() -> None:
        conn = HTTPConnection(host, int(port), timeout=120)
        try:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None or errors:
                    return
                conn.request("POST", "/instances", body=part10(datasets[i]))
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    errors.append(f"instance {i}: HTTP {resp.status} {body[:200]!r}")
        finally:
            conn.close()

    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError("Orthanc refused instances: " + "; ".join(errors[:3]))
    return time.perf_counter() - t


def orthanc_count(hostport: str) -> int:
    with urllib.request.urlopen(f"http://{hostport}/statistics", timeout=60) as r:
        return int(json.loads(r.read())["CountInstances"])


# ---- the queries -----------------------------------------------------------------------------


def query_lists(corpus: Corpus, n: int, seed: int) -> dict[str, list[tuple[Level, Query]]]:
    """``n`` queries per type (fewer for the large ones), drawn once, sent to both servers."""
    rng = random.Random(seed)
    makers: dict[str, Callable[[], tuple[Level, Query]]] = dict(queries(corpus, rng))
    st = corpus.studies
    blank: Query = dict.fromkeys(STUDY_KEYS, "")

    def pick() -> StudyInfo:
        return st[rng.randrange(len(st))]

    makers["study_uid"] = lambda: (Level.STUDY, {**blank, "StudyInstanceUID": pick().uid})
    makers["series_uid_series_level"] = lambda: (
        Level.SERIES,
        {**dict.fromkeys(SERIES_KEYS, ""), "SeriesInstanceUID": pick().uid + ".1"},
    )
    out: dict[str, list[tuple[Level, Query]]] = {}
    for name, make in makers.items():
        out[name] = [make() for _ in range(n if name != "modality_rare" else max(5, n // 5))]
    return out


def identifier(level: Level, query: Query) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level.value
    for key, value in query.items():
        setattr(ds, key, value)
    return ds


def findscu_args(server: Server, level: Level, query: Query) -> list[str]:
    args = [
        tool_path("findscu"),
        "-S",
        "-aec",
        server.aet,
        "-k",
        f"QueryRetrieveLevel={level.value}",
    ]
    for key, value in query.items():
        args += ["-k", key if value == "" else f"{key}={value}"]
    return [*args, "127.0.0.1", str(server.port)]


def run_findscu(server: Server, level: Level, query: Query) -> tuple[float, int]:
    """Seconds from process start to exit, and the number of matches (``-v`` logs each)."""
    args = findscu_args(server, level, query)
    t = time.perf_counter()
    proc = subprocess.run(
        [args[0], "-v", *args[1:]],
        env=peer_env(),
        capture_output=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"findscu against {server.name} failed: {proc.stderr[-2000:]!r}")
    return dt, proc.stderr.count(b"(Pending)")  # -v logs each pending response, not the final


def findscu_first(server: Server) -> float:
    """Seconds from findscu's start to the first answer of an unconstrained STUDY query."""
    args = findscu_args(server, Level.STUDY, dict.fromkeys(STUDY_KEYS, ""))
    t = time.perf_counter()
    proc = subprocess.Popen(
        [args[0], "-v", *args[1:]], env=peer_env(), stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if b"Find Response: 1 " in line:
                return time.perf_counter() - t
        raise RuntimeError(f"no answer from {server.name}")
    finally:
        proc.kill()
        proc.wait()


def process_start() -> float:
    """Seconds for ``findscu --version``: loading the tool, no network."""
    t = time.perf_counter()
    subprocess.run(
        [tool_path("findscu"), "--version"], env=peer_env(), check=True, capture_output=True
    )
    return time.perf_counter() - t


def echoscu(server: Server) -> float:
    t = time.perf_counter()
    subprocess.run(
        [tool_path("echoscu"), "-aec", server.aet, "127.0.0.1", str(server.port)],
        env=peer_env(), check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return time.perf_counter() - t


class Scu:
    """A pynetdicom Study Root C-FIND SCU in this process, with p2pacs's own association
    handlers (TCP_NODELAY, a shorter DUL poll): without them every query waits ~40 ms on
    Nagle's algorithm whichever server answers."""

    def __init__(self) -> None:
        self.ae = AE(ae_title="BENCHSCU")
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_requested_context(Verification)
        self.ae.maximum_pdu_size = 0
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 120

    def associate(self, server: Server) -> Any:
        assoc = self.ae.associate(
            "127.0.0.1", server.port, ae_title=server.aet, evt_handlers=association_handlers()
        )
        if not assoc.is_established:
            raise RuntimeError(f"no association with {server.name}")
        return assoc

    @staticmethod
    def find(assoc: Any, level: Level, query: Query, first_only: bool = False) -> int:
        """The number of matches (or 1 at the first one if ``first_only``)."""
        n = 0
        responses = assoc.send_c_find(
            identifier(level, query), StudyRootQueryRetrieveInformationModelFind
        )
        for status, _ds in responses:
            if not status or status.Status not in (0xFF00, 0xFF01, 0x0000):
                raise RuntimeError(f"C-FIND failed: {status}")
            if status.Status in (0xFF00, 0xFF01):
                n += 1
                if first_only:
                    return n
        return n

    def one_shot(self, server: Server, level: Level, query: Query) -> tuple[float, int]:
        """Association + query to the final status; the release is not timed."""
        t = time.perf_counter()
        assoc = self.associate(server)
        try:
            n = self.find(assoc, level, query)
            return time.perf_counter() - t, n
        finally:
            assoc.release()

    def echo(self, server: Server) -> float:
        """Association + C-ECHO; the release is not timed."""
        t = time.perf_counter()
        assoc = self.associate(server)
        try:
            assoc.send_c_echo()
            return time.perf_counter() - t
        finally:
            assoc.release()

    def first(self, server: Server) -> float:
        t = time.perf_counter()
        assoc = self.associate(server)
        try:
            self.find(assoc, Level.STUDY, dict.fromkeys(STUDY_KEYS, ""), first_only=True)
            return time.perf_counter() - t
        finally:
            assoc.abort()  # stops the rest of the answers


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values) * 1e3, 3),
        "p99_ms": round(_pct(values, 0.99) * 1e3, 3),
    }


def measure(
    servers: list[Server], lists: dict[str, list[tuple[Level, Query]]], firsts: int
) -> dict[str, Any]:
    """Every channel, servers alternating query by query; per server, per type: p50/p99."""
    scu = Scu()
    out: dict[str, Any] = {
        s.name: {"findscu": {}, "scu_assoc": {}, "scu_reuse": {}} for s in servers
    }
    mismatch: dict[str, list[Any]] = {}
    # the floors, sampled between the queries so the machine's load weighs on them alike:
    # findscu's process start (``findscu --version``: the same for every server, what the
    # ``_net`` figures subtract); echoscu (process start + association + C-ECHO); with the
    # in-process SCU an association + C-ECHO, and a C-ECHO on an open association
    floors: dict[tuple[str, str], list[float]] = {("", "process"): []}
    for name, items in lists.items():
        times: dict[tuple[str, str], list[float]] = {}
        counts: dict[str, list[int]] = {s.name: [] for s in servers}
        for level, query in items:
            floors[("", "process")].append(process_start())
            for s in servers:
                dt, n = run_findscu(s, level, query)
                times.setdefault((s.name, "findscu"), []).append(dt)
                dt, n2 = scu.one_shot(s, level, query)
                times.setdefault((s.name, "scu_assoc"), []).append(dt)
                floors.setdefault((s.name, "echoscu"), []).append(echoscu(s))
                floors.setdefault((s.name, "scu_echo_assoc"), []).append(scu.echo(s))
                counts[s.name].append(n2)
                if n != n2:
                    raise RuntimeError(f"{s.name} {name}: findscu saw {n}, pynetdicom {n2}")
        for s in servers:
            assoc = scu.associate(s)
            try:
                for level, query in items:
                    t = time.perf_counter()
                    Scu.find(assoc, level, query)
                    times.setdefault((s.name, "scu_reuse"), []).append(time.perf_counter() - t)
                    t = time.perf_counter()
                    assoc.send_c_echo()
                    floors.setdefault((s.name, "scu_echo_reuse"), []).append(
                        time.perf_counter() - t
                    )
            finally:
                assoc.release()
            floor = _ms(floors[("", "process")])["p50_ms"]
            for channel in ("findscu", "scu_assoc", "scu_reuse"):
                row = _ms(times[(s.name, channel)])
                if channel == "findscu":
                    row["p50_net_ms"] = round(row["p50_ms"] - floor, 3)
                out[s.name][channel][name] = row
            out[s.name]["scu_assoc"][name]["results_avg"] = round(
                statistics.mean(counts[s.name]), 1
            )
        first = counts[servers[0].name]
        bad = [
            (i, {s.name: counts[s.name][i] for s in servers})
            for i in range(len(first))
            if len({counts[s.name][i] for s in servers}) > 1
        ]
        if bad:
            mismatch[name] = bad[:5]
        print(f"# {name}: " + ", ".join(
            f"{s.name} {out[s.name]['scu_assoc'][name]['p50_ms']} ms" for s in servers
        ), file=sys.stderr, flush=True)  # fmt: skip
    name = "unconstrained_first"
    ft: dict[tuple[str, str], list[float]] = {}
    for _ in range(firsts):
        for s in servers:
            ft.setdefault((s.name, "findscu"), []).append(findscu_first(s))
            ft.setdefault((s.name, "scu_assoc"), []).append(scu.first(s))
    for s in servers:
        out[s.name]["findscu_floor_ms"] = floor = _ms(floors[("", "process")])["p50_ms"]
        out[s.name]["floors"] = {k: _ms(v) for (n, k), v in floors.items() if n == s.name}
        for channel in ("findscu", "scu_assoc"):
            row = _ms(ft[(s.name, channel)])
            if channel == "findscu":
                row["p50_net_ms"] = round(row["p50_ms"] - floor, 3)
            out[s.name][channel][name] = row
        t = time.perf_counter()
        assoc = scu.associate(s)
        try:
            n = Scu.find(assoc, Level.STUDY, dict.fromkeys(STUDY_KEYS, ""))
        finally:
            assoc.release()
        out[s.name]["unconstrained_full"] = {"s": round(time.perf_counter() - t, 3), "results": n}
    out["match_mismatch"] = mismatch
    return out


def index_api(path: Path, lists: dict[str, list[tuple[Level, Query]]]) -> dict[str, Any]:
    """The same queries through ``DicomIndex.find`` in this process (every match read): the
    index's share of the gateway's time."""
    out: dict[str, Any] = {}
    with Archive(path) as arc:
        for name, items in lists.items():
            times = []
            for level, query in items:
                t = time.perf_counter()
                sum(1 for _ in arc.index.find(level, query))
                times.append(time.perf_counter() - t)
            out[name] = _ms(times)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            gen = arc.index.find(Level.STUDY, dict.fromkeys(STUDY_KEYS, ""))
            next(gen)
            times.append(time.perf_counter() - t)
            gen.close()
        out["unconstrained_first"] = _ms(times)
    return out


def ratios(res: dict[str, Any], names: list[str], ours_name: str = "p2pacs") -> dict[str, Any]:
    """Orthanc p50 / p2pacs p50 per channel and type (> 1: p2pacs faster)."""
    ours, theirs = res[ours_name], res["orthanc"]
    out: dict[str, dict[str, float | None]] = {}
    for channel, key in (("scu_assoc", "p50_ms"), ("scu_reuse", "p50_ms"),
                         ("findscu", "p50_ms"), ("findscu", "p50_net_ms")):  # fmt: skip
        label = channel if key == "p50_ms" else channel + "_net"
        out[label] = {}
        for name in names:
            if name in ours[channel] and name in theirs[channel]:
                a, b = ours[channel][name][key], theirs[channel][name][key]
                out[label][name] = round(b / a, 2) if a > 0 else None  # net of a floor: can be <= 0
    return out


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = args.orthanc_size
    corpus = Corpus(size, args.per_study)
    report: dict[str, Any] = {"instances": size, "load_avg_start": os.getloadavg()}
    marker = work / "loaded.json"  # ``--reuse``: both servers already hold this corpus
    loaded = {"instances": size, "per_study": args.per_study}
    reuse = marker.exists() and json.loads(marker.read_text()) == loaded
    if reuse:
        stream = corpus.instances()  # the same corpus again, for the query lists
        for _ in range(size):
            next(stream)
        datasets: list[bytes] = []
        report["p2pacs_load"] = report["orthanc_load"] = {"reused": str(work)}
    else:
        p2_secs, datasets = load_p2pacs(work / "site.lmdb", corpus, size)
        report["p2pacs_load"] = {
            "s": round(p2_secs, 1),
            "inst_per_s": round(size / p2_secs, 1),
            "how": "Archive.submit in this process, 1,024 in flight",
        }
        print(f"# p2pacs loaded in {p2_secs:.1f} s", file=sys.stderr, flush=True)
    report["studies"] = len(corpus.studies)
    with orthanc_server(work / "orthanc") as (orthanc, http, _proc):
        if not reuse:
            secs = load_orthanc(http, datasets, args.clients)
            report["orthanc_load"] = {
                "s": round(secs, 1), "inst_per_s": round(size / secs, 1),
                "how": f"REST POST /instances, {args.clients} keep-alive HTTP clients (threads)",
            }  # fmt: skip
            print(f"# Orthanc loaded in {secs:.1f} s", file=sys.stderr, flush=True)
        held = orthanc_count(http)
        if held != size:
            raise RuntimeError(f"Orthanc holds {held} instances, not {size}")
        if not reuse:
            marker.write_text(json.dumps(loaded))
        del datasets
        lists = query_lists(corpus, args.queries, args.seed)
        with ExitStack() as stack:
            servers = [stack.enter_context(p2pacs_server(work / "site.lmdb", work / "gw.log"))]
            if args.context_fix:
                servers.append(
                    stack.enter_context(
                        p2pacs_server(work / "site.lmdb", work / "gw-fix.log", context_fix=True)
                    )
                )
            if args.baseline_src is not None:
                base = args.baseline_src.resolve()
                servers.append(
                    stack.enter_context(
                        p2pacs_server(work / "site.lmdb", work / "gw-base.log", baseline=base)
                    )
                )
            report["load_avg_queries_start"] = os.getloadavg()
            res = measure([*servers, orthanc], lists, args.firsts)
            report["load_avg_queries_end"] = os.getloadavg()
    res["p2pacs_index_api"] = index_api(work / "site.lmdb", lists)
    report["results"] = res
    names = [*lists, "unconstrained_first"]
    r = ratios(res, names)
    report["cfind_ratio_vs_orthanc"] = r["scu_assoc"]
    report["target_3x_met"] = {k: v is not None and v >= 3.0 for k, v in r["scu_assoc"].items()}
    report["cfind_ratio_vs_orthanc_other_channels"] = {
        k: v for k, v in r.items() if k != "scu_assoc"
    }
    if args.context_fix:
        fixed = ratios(res, names, "p2pacs_ctxfix")
        report["cfind_ratio_vs_orthanc_with_context_fix"] = fixed
        report["target_3x_met_with_context_fix"] = {
            k: v is not None and v >= 3.0 for k, v in fixed["scu_assoc"].items()
        }
    if args.baseline_src is not None:
        report["baseline_src"] = str(args.baseline_src)
        report["cfind_ratio_vs_orthanc_baseline"] = ratios(res, names, "p2pacs_base")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orthanc-size", type=int, default=100_000, help="instances (100000)")
    ap.add_argument("--per-study", type=int, default=30)
    ap.add_argument("--queries", type=int, default=30, help="queries per type and channel")
    ap.add_argument("--firsts", type=int, default=10, help="unconstrained first-answer runs")
    ap.add_argument("--clients", type=int, default=4, help="HTTP clients loading Orthanc")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="keep both loaded servers' data in this folder and load them only if it does not "
        "hold this corpus yet (a second run skips the loading)",
    )
    ap.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also serve the archive with this source tree's p2pacs (e.g. `git archive main` "
        "unpacked), measured beside as p2pacs_base: a before/after in one run",
    )
    ap.add_argument("--no-netns", action="store_true", help="stay in this network namespace")
    ap.add_argument(
        "--context-fix",
        action="store_true",
        help="also serve p2pacs with SharedUIDContexts (a proposed gateway fix), measured beside",
    )
    ap.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.serve, args.context_fix)
        return
    if os.geteuid() == 0 and not args.no_netns and NETNS_ENV not in os.environ:
        # rerun inside a namespace holding only lo, so Orthanc's 0.0.0.0 listeners stay private
        ns = f"p2pacs-bench-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
            rc = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve()),
                 *sys.argv[1:]],
                env={**os.environ, NETNS_ENV: ns}, check=False,
            ).returncode  # fmt: skip
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        sys.exit(rc)
    if args.reuse is not None:
        args.reuse.mkdir(parents=True, exist_ok=True)
        report = bench(args, args.reuse.resolve())
    else:
        work = Path(tempfile.mkdtemp(prefix="p2pacs-cfind-", dir=args.dir))
        try:
            report = bench(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
