"""C-FIND and ingest at scale: one site grown to 10 k, 100 k (and ``--max 1000000``) instances.

The site is a real ``Archive`` in a temporary folder (LMDB with fsync), fed through
``Archive.submit`` with synthetic headers written byte by byte (explicit VR little endian, 4x4
16-bit pixels): ~30 instances per study in 1-4 series, patients with 1.6 studies on average and
Zipf-like family names, unique accession numbers, study dates over ten years, a weighted mix of
modalities (one study in ten has a second modality). At each size it prints:
- ingest rate: overall, and over the last ``--window`` instances before the size (the marginal
  rate, which is what must stay flat);
- C-FIND p50/p99 per query type through the index API (``DicomIndex.find``, every result read),
  and the first-answer latency of an unconstrained STUDY-level query;
- the same queries through dcmtk's findscu against a Gateway on a free port (one process per
  query, so it includes findscu's start: see ``findscu_floor_ms``, a C-ECHO with echoscu);
- RSS (anonymous and file-backed: LMDB pages read are mapped into the process), before and
  after an unconstrained walk of every study, and index bytes per instance.
One JSON line per size; the last line is a JSON object with every size.

    python bench/scale.py                  # 10 k and 100 k
    python bench/scale.py --max 1000000    # and 1 M (about 10 minutes of ingest)
    python bench/scale.py --vs-orthanc     # C-FIND against Orthanc on the same 100 k instances
                                           # (bench/cfind_vs_orthanc.py; --orthanc-size N)
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pacs.archive import Archive, Ingested
from p2pacs.config import DicomConfig
from p2pacs.dicom.header import Level
from p2pacs.gateway import Gateway

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ROOT = "1.2.826.0.1.3680043.10.4242"  # UID root of the synthetic instances
FINDSCU = "/usr/bin/findscu"
ECHOSCU = "/usr/bin/echoscu"
IN_FLIGHT = 1024  # submitted instances not yet durable
_LONG_VRS = {"OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR"}
_MODALITIES = {"CT": 30, "MR": 20, "CR": 15, "DX": 10, "US": 10, "MG": 5, "XA": 4, "PT": 3, "NM": 3}
_SYLLABLES = "SMI TH GAR CIA MUL LER ROS SI NO VAK SIL VA KO WAL SKI DU BOIS BER MAN SON"
_GIVEN = "ANNA JEAN MARIA PIOTR LUCIA OMAR INES KARL JOHN MEI SEAN FATIMA IVAN LINA"

STUDY_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)


def _el(group: int, elem: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def _us(group: int, elem: int, n: int) -> bytes:
    return _el(group, elem, "US", struct.pack("<H", n))


_PIXELS = (
    _us(0x0028, 0x0002, 1)
    + _el(0x0028, 0x0004, "CS", b"MONOCHROME2")
    + _us(0x0028, 0x0010, 4)
    + _us(0x0028, 0x0011, 4)
    + _us(0x0028, 0x0100, 16)
    + _us(0x0028, 0x0101, 12)
    + _us(0x0028, 0x0102, 11)
    + _us(0x0028, 0x0103, 0)
    + _el(0x7FE0, 0x0010, "OW", bytes(32))
)


@dataclass(frozen=True, slots=True)
class StudyInfo:
    uid: str
    patient_id: str
    family: str
    accession: str
    date: str
    modalities: tuple[str, ...]
    first_sop: str


class Corpus:
    """Deterministic synthetic studies; ``instances()`` yields (dataset bytes, study info)."""

    def __init__(self, max_instances: int, per_study: int, seed: int = 1):
        self.rng = random.Random(seed)
        self.per_study = per_study
        self.patients = max(1, int(max_instances / per_study / 1.6))
        syllables = _SYLLABLES.split()
        families = [a + b for a in syllables for b in syllables if a != b]
        self.rng.shuffle(families)
        self.families = families
        self.weights = [1 / (r + 1) ** 0.9 for r in range(len(families))]
        self.studies: list[StudyInfo] = []

    def _patient(self, n: int) -> tuple[bytes, str, str, bytes, bytes]:
        rng = random.Random(n)
        family = rng.choices(self.families, self.weights)[0]
        name = f"{family}^{rng.choice(_GIVEN.split())}"
        birth = f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        pid = f"PID{n:08d}"
        return name.encode(), pid, family, birth.encode(), rng.choice([b"F", b"M"])

    def instances(self) -> Iterator[tuple[bytes, StudyInfo]]:
        rng = self.rng
        modalities, weights = list(_MODALITIES), list(_MODALITIES.values())
        s = 0
        while True:
            s += 1
            name, pid, family, birth, sex = self._patient(rng.randrange(self.patients))
            study_uid = f"{ROOT}.1.{s}"
            day = 18000 + rng.randrange(3650)  # days since 1970: 2019-2029
            date = time.strftime("%Y%m%d", time.gmtime(day * 86400))
            tm = f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"
            mods = [rng.choices(modalities, weights)[0]]
            if rng.random() < 0.1:
                mods.append(rng.choice([m for m in modalities if m != mods[0]]))
            n_series = rng.randint(1, 4)
            accession = f"ACC{s:09d}"
            study_head = (
                _el(0x0008, 0x0005, "CS", b"ISO_IR 100")
                + _el(0x0008, 0x0008, "CS", b"ORIGINAL\\PRIMARY\\AXIAL")
                + _el(0x0008, 0x0016, "UI", CT_STORAGE.encode())
            )
            study_mid = (
                _el(0x0008, 0x0020, "DA", date.encode())
                + _el(0x0008, 0x0030, "TM", tm.encode())
                + _el(0x0008, 0x0050, "SH", accession.encode())
            )
            study_tail = _el(0x0008, 0x0090, "PN", b"WELBY^MARCUS^^DR") + _el(
                0x0008, 0x1030, "LO", f"{mods[0]} EXAM {s % 17}".encode()
            )
            patient = (
                _el(0x0010, 0x0010, "PN", name)
                + _el(0x0010, 0x0020, "LO", pid.encode())
                + _el(0x0010, 0x0030, "DA", birth)
                + _el(0x0010, 0x0040, "CS", sex)
                + _el(0x0020, 0x000D, "UI", study_uid.encode())
            )
            info: StudyInfo | None = None
            per_series = [self.per_study // n_series] * n_series
            per_series[0] += self.per_study - sum(per_series)
            for r, count in enumerate(per_series):
                modality = mods[min(r, len(mods) - 1)]
                series_uid = f"{study_uid}.{r + 1}"
                series_a = _el(0x0008, 0x0060, "CS", modality.encode())
                series_b = _el(0x0008, 0x103E, "LO", f"{modality} SERIES {r + 1}".encode())
                series_c = (
                    _el(0x0020, 0x000E, "UI", series_uid.encode())
                    + _el(0x0020, 0x0010, "SH", str(s).encode())
                    + _el(0x0020, 0x0011, "IS", str(r + 1).encode())
                )
                for i in range(count):
                    sop = f"{series_uid}.{i + 1}"
                    if info is None:
                        info = StudyInfo(study_uid, pid, family, accession, date, tuple(mods), sop)
                        self.studies.append(info)
                    yield (
                        (
                            study_head
                            + _el(0x0008, 0x0018, "UI", sop.encode())
                            + study_mid
                            + series_a
                            + study_tail
                            + series_b
                            + patient
                            + series_c
                            + _el(0x0020, 0x0013, "IS", str(i + 1).encode())
                            + _PIXELS
                        ),
                        info,
                    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values) * 1e3, 3),
        "p99_ms": round(_pct(values, 0.99) * 1e3, 3),
    }


_TICK = os.sysconf("SC_CLK_TCK")


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user, system) of the ingest thread (parsing, hashing: this one) and of
    the LMDB writer thread (puts and commits), from /proc: what grows with the archive shows
    in one or the other."""
    out: dict[str, float] = {}
    writer = next((t for t in threading.enumerate() if t.name.startswith("lmdb-writer")), None)
    me = threading.current_thread()
    for label, thread in (("ingest", me), ("writer", writer)):
        if thread is None or thread.native_id is None:
            continue
        fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = (int(v) / _TICK for v in fields.split()[11:13])
        out[f"{label}_user"], out[f"{label}_sys"] = utime, stime
    # bytes this process caused to be written to disk (LMDB's dirty pages at each commit),
    # scaled so that the per-instance figure below reads as bytes, not microseconds
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    out["disk_write_bytes"] = int(io["write_bytes"]) / 1e6
    return out


def _commits(arc: Archive) -> tuple[int, int]:
    """LMDB transactions committed and write jobs in them: instances per group commit."""
    stat = arc.db.stat()
    return stat["commits"], stat["jobs_committed"]


def _memory() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


Query = dict[str, str | list[str] | None]


def queries(corpus: Corpus, rng: random.Random) -> dict[str, Callable[[], tuple[Level, Query]]]:
    """Query makers per type, each drawing its key from a random stored study."""
    st = corpus.studies
    blank: Query = dict.fromkeys(STUDY_KEYS, "")

    def pick() -> StudyInfo:
        return st[rng.randrange(len(st))]

    def week(info: StudyInfo) -> str:
        t = time.mktime(time.strptime(info.date, "%Y%m%d")) + 6 * 86400 + 7200
        return f"{info.date}-{time.strftime('%Y%m%d', time.localtime(t))}"

    return {
        "patient_id": lambda: (Level.STUDY, {**blank, "PatientID": pick().patient_id}),
        "patient_name_prefix": lambda: (Level.STUDY, {**blank, "PatientName": pick().family + "*"}),
        "accession": lambda: (Level.STUDY, {**blank, "AccessionNumber": pick().accession}),
        "study_date_range_7d": lambda: (Level.STUDY, {**blank, "StudyDate": week(pick())}),
        "modality_and_date": lambda: (
            Level.STUDY,
            {**blank, "ModalitiesInStudy": (i := pick()).modalities[0], "StudyDate": i.date},
        ),
        "modality_rare": lambda: (Level.STUDY, {**blank, "ModalitiesInStudy": "NM"}),
        "sop_image_level": lambda: (
            Level.IMAGE,
            {"SOPInstanceUID": pick().first_sop, "SOPClassUID": "", "InstanceNumber": ""},
        ),
    }


def bench_index(arc: Archive, makers: dict[str, Any], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, make in makers.items():
        times, results = [], []
        for _ in range(n if name != "modality_rare" else max(5, n // 10)):
            level, query = make()
            t = time.perf_counter()
            rows = sum(1 for _ in arc.index.find(level, query))
            times.append(time.perf_counter() - t)
            results.append(rows)
        out[name] = {**_ms(times), "results_avg": round(statistics.mean(results), 1)}
    firsts = []
    for _ in range(n):
        t = time.perf_counter()
        gen = arc.index.find(Level.STUDY, dict.fromkeys(STUDY_KEYS, ""))
        next(gen)
        firsts.append(time.perf_counter() - t)
        gen.close()
    out["unconstrained_first"] = _ms(firsts)
    return out


def _findscu_args(port: int, level: Level, query: Query) -> list[str]:
    args = [FINDSCU, "-S", "-aec", "P2PACS", "-k", f"QueryRetrieveLevel={level.value}"]
    for key, value in query.items():
        args += ["-k", key if value == "" else f"{key}={value}"]
    return [*args, "127.0.0.1", str(port)]


def bench_findscu(port: int, makers: dict[str, Any], n: int) -> dict[str, Any]:
    env = {**os.environ, "TCP_NODELAY": "1"}
    out: dict[str, Any] = {}
    floor = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([ECHOSCU, "-aec", "P2PACS", "127.0.0.1", str(port)], env=env, check=True)
        floor.append(time.perf_counter() - t)
    out["findscu_floor_ms"] = _ms(floor)["p50_ms"]
    for name, make in makers.items():
        times = []
        for _ in range(n if name != "modality_rare" else max(3, n // 5)):
            level, query = make()
            t = time.perf_counter()
            subprocess.run(
                _findscu_args(port, level, query), env=env, check=True, capture_output=True
            )
            times.append(time.perf_counter() - t)
        out[name] = _ms(times)
    # first answer of an unconstrained query: findscu -v logs each response as it arrives
    firsts = []
    for _ in range(max(3, n // 4)):
        args = _findscu_args(port, Level.STUDY, dict.fromkeys(STUDY_KEYS, ""))
        t = time.perf_counter()
        proc = subprocess.Popen(
            [args[0], "-v", *args[1:]], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        assert proc.stderr is not None
        for line in proc.stderr:
            if b"Find Response: 1 " in line:
                firsts.append(time.perf_counter() - t)
                break
        proc.kill()
        proc.wait()
    out["unconstrained_first"] = _ms(firsts)
    t = time.perf_counter()
    args = _findscu_args(port, Level.STUDY, dict.fromkeys(STUDY_KEYS, ""))
    subprocess.run(args, env=env, check=True, capture_output=True)
    out["unconstrained_full_s"] = round(time.perf_counter() - t, 3)
    return out


def index_bytes(arc: Archive) -> dict[str, int]:
    names = ["ix_patient", "ix_study", "ix_series", "ix_instance", "ix_sop"]
    secondary = [
        "ix_by_patient_id", "ix_by_patient_name", "ix_by_accession", "ix_by_study_date",
        "ix_by_study_time", "ix_by_modality", "ix_patient_by", "ix_series_uid", "ix_meta",
    ]  # fmt: skip
    out = {"records": 0, "secondary": 0}
    with arc.db.read() as txn:
        for group, dbs in (("records", names), ("secondary", secondary)):
            for name in dbs:
                s = txn.stat(arc.db.db(name, dupsort=name in secondary and name != "ix_meta"))
                pages = s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
                out[group] += pages * s["psize"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max", type=int, default=100_000, help="largest size (default 100000)")
    ap.add_argument("--per-study", type=int, default=30)
    ap.add_argument("--queries", type=int, default=200, help="index API queries per type")
    ap.add_argument("--findscu", type=int, default=20, help="findscu runs per type (0: none)")
    ap.add_argument("--window", type=int, default=5000, help="instances of the marginal rate")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument(
        "--vs-orthanc",
        action="store_true",
        help="instead: C-FIND against Orthanc on the same instances (bench/cfind_vs_orthanc.py)",
    )
    ap.add_argument("--orthanc-size", type=int, default=100_000, help="with --vs-orthanc")
    args, rest = ap.parse_known_args()
    if args.vs_orthanc:  # the other options of cfind_vs_orthanc.py (--context-fix...) pass on
        other = Path(__file__).resolve().with_name("cfind_vs_orthanc.py")
        argv = [sys.executable, str(other), "--orthanc-size", str(args.orthanc_size)]
        argv += ["--per-study", str(args.per_study)]
        argv += ["--dir", str(args.dir)] if args.dir else []
        os.execv(sys.executable, argv + rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    sizes = [s for s in (10_000, 100_000, 1_000_000) if s < args.max] + [args.max]

    work = Path(tempfile.mkdtemp(prefix="p2pacs-scale-", dir=args.dir))
    corpus = Corpus(args.max, args.per_study)
    rng = random.Random(7)
    makers = queries(corpus, rng)
    report: dict[str, Any] = {"sizes": []}
    try:
        with Archive(work / "site.lmdb") as arc:
            cfg = DicomConfig(ae_title="P2PACS", port=0, bind="127.0.0.1", max_pdu=0)
            gw = Gateway(arc, cfg)
            gw.start()
            try:
                stream = corpus.instances()
                pending: list[Future[Ingested]] = []
                done = 0
                started = time.perf_counter()
                marks: list[tuple[int, float, float]] = [(0, started, time.process_time())]
                threads: dict[int, dict[str, float]] = {0: _thread_cpu()}
                commits: dict[int, tuple[int, int]] = {0: _commits(arc)}
                for size in sizes:
                    while done < size:
                        data, _ = next(stream)
                        pending.append(arc.submit(data, EXPLICIT_LE))
                        done += 1
                        if len(pending) >= IN_FLIGHT:
                            for f in pending[: IN_FLIGHT // 2]:
                                f.result(600)
                            del pending[: IN_FLIGHT // 2]
                        if done % args.window == 0 or done == size:
                            marks.append((done, time.perf_counter(), time.process_time()))
                            threads[done] = _thread_cpu()
                            commits[done] = _commits(arc)
                    for f in pending:
                        f.result(600)
                    pending.clear()
                    now, cpu = time.perf_counter(), time.process_time()
                    back = next(m for m in reversed(marks) if m[0] <= size - args.window)
                    row: dict[str, Any] = {
                        "instances": size,
                        "studies": len(corpus.studies),
                        "ingest_inst_per_s": round(size / (now - started), 1),
                        "ingest_marginal_inst_per_s": round((size - back[0]) / (now - back[1]), 1),
                        # CPU seconds of every thread of this process: what the machine's other
                        # load does not change, unlike the wall-clock rates
                        "ingest_marginal_cpu_us_per_inst": round(
                            (cpu - back[2]) / (size - back[0]) * 1e6, 1
                        ),
                        "load_avg_1m": round(os.getloadavg()[0], 2),
                    }
                    # the same, per thread and user/system (the writer's system time is
                    # LMDB's page writes and fsyncs): microseconds per instance; and
                    # disk_write_bytes: bytes written to disk per instance
                    was, now_t = threads.get(back[0], {}), _thread_cpu()
                    row["ingest_marginal_thread_cpu_us_per_inst"] = {
                        k: round((v - was.get(k, 0.0)) / (size - back[0]) * 1e6, 1)
                        for k, v in now_t.items()
                    }
                    (c0, j0), (c1, j1) = commits.get(back[0], (0, 0)), _commits(arc)
                    row["ingest_marginal_jobs_per_commit"] = round((j1 - j0) / max(c1 - c0, 1), 2)
                    mem_before = _memory()
                    row["index_api"] = bench_index(arc, makers, args.queries)
                    t = time.perf_counter()
                    walked = sum(
                        1 for _ in arc.index.find(Level.STUDY, dict.fromkeys(STUDY_KEYS, ""))
                    )
                    row["unconstrained_full_s"] = round(time.perf_counter() - t, 3)
                    assert walked == len(corpus.studies)
                    row["rss_mb_before_queries"] = mem_before
                    row["rss_mb_after_queries"] = _memory()
                    if args.findscu:
                        row["findscu"] = bench_findscu(gw.address[1], makers, args.findscu)
                        row["rss_mb_after_findscu"] = _memory()
                    sizes_b = index_bytes(arc)
                    row["index_bytes_per_instance"] = round(sizes_b["records"] / size, 1)
                    row["secondary_bytes_per_instance"] = round(sizes_b["secondary"] / size, 1)
                    print(json.dumps(row), flush=True)
                    report["sizes"].append(row)
                    started_q = time.perf_counter()  # queries are not ingest time
                    started += started_q - now
                    spent = time.process_time() - cpu
                    marks = [(m[0], m[1] + started_q - now, m[2] + spent) for m in marks]
            finally:
                gw.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first, last = report["sizes"][0], report["sizes"][-1]
    report["ingest_ratio_last_vs_first"] = round(
        last["ingest_marginal_inst_per_s"] / first["ingest_marginal_inst_per_s"], 3
    )
    report["ingest_cpu_ratio_first_vs_last"] = round(
        first["ingest_marginal_cpu_us_per_inst"] / last["ingest_marginal_cpu_us_per_inst"], 3
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
