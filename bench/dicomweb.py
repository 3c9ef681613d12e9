"""DICOMweb: p2pacs's service (``p2pacs.dicomweb``) against Orthanc + orthanc-dicomweb.

The same files go into both: one study of N generated 512 x 512 CT instances (~0.5 MB each,
one series) plus ``--small`` one-instance studies (so a search has others to skip). p2pacs:
``p2pacs import`` into a standalone site, then ``dicomweb_app`` on a plain aiohttp runner in its
own process (``--serve``, loopback HTTP; the site's real web server adds TLS and access
control in front of the same app). Orthanc 1.10 with Debian's DICOMweb plugin 1.7, files
uploaded over REST, storage compression off. One client (``requests``, one connection) asks
both, alternating, best of ``--rounds``:

- WADO-RS study retrieve, ``transfer-syntax=*`` (as stored): MB/s of the multipart body, read
  by ``curl`` into /dev/null (a Python client tops out near the servers' own speed), best of
  the rounds and the first (cold) retrieve apart: p2pacs hash-checks every blob the first time
  and not again within ``stream.VERIFIED_TTL``; and each server's CPU time (user + system, from
  /proc) per retrieve, median of the rounds, which varies far less than wall-clock time on a
  machine shared with other work;
- WADO-RS series ``/metadata``: latency (each server's first, cold answer is reported too;
  p2pacs ingests with its metadata warmer running, as a site serving DICOMweb does, and is
  then served by a fresh process, so its first answer is read from LMDB, not from memory);
- QIDO-RS ``/studies?PatientID=…`` for the big study's patient: latency (median of 20).

Both are plain HTTP on loopback: like with like (a site serves the same app over HTTPS).

Last line: JSON with ``ratio_wado_vs_orthanc`` (ours MB/s / Orthanc's; ``_first``: the first
retrieve; ``ratio_wado_cpu_vs_orthanc``: Orthanc's CPU per retrieve / ours),
``ratio_metadata_vs_orthanc`` and ``ratio_qido_vs_orthanc`` (Orthanc's time / ours).

    python bench/dicomweb.py --instances 300 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))

from p2pacs.samples import generate_instances

from interop_peers import (  # type: ignore[import-not-found,unused-ignore]
    Orthanc,
    free_tcp_port,
    wait_for_port,
)

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CURL = shutil.which("curl") or "curl"
TIMEOUT = 600.0  # seconds for one request
QIDO_REPEAT = 20  # searches per round (median)


def serve(db: Path, port: int) -> None:
    """Child process: serve the archive's DICOMweb app on 127.0.0.1:port until killed."""
    from aiohttp import web

    from p2pacs.archive import Archive
    from p2pacs.dicomweb import dicomweb_app

    archive = Archive(db, map_size=1 << 34, sync=False)
    app = web.Application()
    app.add_subapp("/dicomweb", dicomweb_app(archive))
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _files(root: Path, n: int, small: int) -> tuple[list[Path], pydicom.Dataset]:
    big = generate_instances(
        root / "big", studies=1, series_per_study=1, instances_per_series=n, seed=21,
        implicit_vr_every=0,
    )  # fmt: skip
    rest = generate_instances(
        root / "small", studies=small, series_per_study=1, instances_per_series=1, rows=64,
        columns=64, seed=22, implicit_vr_every=0,
    )  # fmt: skip
    return big + rest, pydicom.dcmread(big[0], stop_before_pixels=True)


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used: on a machine shared with other work,
    a server's CPU per retrieve varies far less than its wall-clock time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wado(base: str, study: str, pid: int) -> tuple[float, int, float]:
    """(seconds, bytes, server CPU seconds) of one study retrieve by curl into /dev/null: a C
    client, so the servers, not a Python client's reading, set the pace."""
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    cpu = _cpu(pid)
    out = subprocess.run(
        [CURL, "-sS", "--fail", "-o", "/dev/null", "-H", f"Accept: {accept}",
         "-w", "%{time_total} %{size_download}", f"{base}/studies/{study}"],
        check=True, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    seconds, size = out.stdout.split()
    return float(seconds), int(size), _cpu(pid) - cpu


def _metadata(session: requests.Session, base: str, study: str, series: str, n: int) -> float:
    t0 = time.perf_counter()
    r = session.get(
        f"{base}/studies/{study}/series/{series}/metadata",
        headers={"Accept": "application/dicom+json"},
        timeout=TIMEOUT,
    )
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    if len(r.json()) != n:
        raise RuntimeError(f"{base}: metadata of {len(r.json())} instances, not {n}")
    return seconds


def _qido(session: requests.Session, base: str, patient: str) -> float:
    times = []
    for _ in range(QIDO_REPEAT):
        t0 = time.perf_counter()
        r = session.get(
            f"{base}/studies",
            params={"PatientID": patient},
            headers={"Accept": "application/dicom+json"},
            timeout=TIMEOUT,
        )
        times.append(time.perf_counter() - t0)
        r.raise_for_status()
        if len(r.json()) != 1:
            raise RuntimeError(f"{base}: {len(r.json())} studies for {patient}")
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("DB", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]))
        return
    n = args.instances
    result: dict[str, Any] = {"instances": n, "small_studies": args.small, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="bench-dicomweb-") as tmp:
        root = Path(tmp)
        files, head = _files(root, n, args.small)
        study, series, patient = (
            str(head.StudyInstanceUID), str(head.SeriesInstanceUID), str(head.PatientID)
        )  # fmt: skip
        from p2pacs.archive import Archive
        from p2pacs.dicomweb.metastore import MetadataStore, MetadataWarmer

        # ingested as a running site does it: each instance's /metadata built in the
        # background (the warmer), as Orthanc builds its JSON at ingest; then served by a new
        # process, so the first /metadata reads what was kept on disk, not a memory cache
        archive = Archive(root / "db", map_size=1 << 34, sync=False)
        warmer = MetadataWarmer(MetadataStore(archive))
        archive.on_ingest(warmer.offer)
        warmer.start()
        t0 = time.perf_counter()
        for path in files:
            archive.import_file(path)
        imported = time.perf_counter() - t0
        deadline = time.monotonic() + TIMEOUT
        while not warmer.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        result["p2pacs_import_s"] = round(imported, 2)
        result["p2pacs_metadata_built_s"] = round(time.perf_counter() - t0, 2)
        warmer.stop()
        archive.close()
        port = free_tcp_port()
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(root / "db"), str(port)],
            stdout=subprocess.DEVNULL,
        )
        extra = {"Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        try:
            wait_for_port(port, child)
            with Orthanc(root / "orthanc", "ORTHANC", extra=extra) as orthanc:
                for path in files:
                    orthanc.upload(path.read_bytes())
                bases = {
                    "p2pacs": f"http://127.0.0.1:{port}/dicomweb",
                    "orthanc": f"{orthanc.url}/dicom-web",
                }
                pids = {"p2pacs": child.pid, "orthanc": orthanc.proc.pid}
                best: dict[str, dict[str, float]] = {k: {} for k in bases}
                cpus: dict[str, list[float]] = {k: [] for k in bases}
                with requests.Session() as session:
                    for r in range(args.rounds):
                        for name, base in bases.items():
                            meta = _metadata(session, base, study, series, n)
                            if r == 0:
                                best[name]["metadata_cold"] = meta
                            seconds, size, cpu = _wado(base, study, pids[name])
                            qido = _qido(session, base, patient)
                            b = best[name]
                            if r == 0:
                                b["wado_first"] = seconds
                            b["wado"] = min(b.get("wado", 1e9), seconds)
                            cpus[name].append(cpu)
                            b["metadata"] = min(b.get("metadata", 1e9), meta)
                            b["qido"] = min(b.get("qido", 1e9), qido)
                            b["bytes"] = size
        finally:
            child.terminate()
            child.wait(30)
    for name, b in best.items():
        result[f"{name}_wado_mb_per_s"] = round(b["bytes"] / b["wado"] / 1e6, 1)
        result[f"{name}_metadata_ms"] = round(b["metadata"] * 1000, 1)
        result[f"{name}_metadata_cold_ms"] = round(b["metadata_cold"] * 1000, 1)
        result[f"{name}_qido_ms"] = round(b["qido"] * 1000, 2)
        result[f"{name}_wado_first_mb_per_s"] = round(b["bytes"] / b["wado_first"] / 1e6, 1)
        result[f"{name}_wado_cpu_ms"] = round(statistics.median(cpus[name]) * 1000, 1)
    p, o = best["p2pacs"], best["orthanc"]
    result["ratio_wado_vs_orthanc"] = round((p["bytes"] / p["wado"]) / (o["bytes"] / o["wado"]), 3)
    result["ratio_wado_first_vs_orthanc"] = round(o["wado_first"] / p["wado_first"], 3)
    result["ratio_wado_cpu_vs_orthanc"] = round(
        statistics.median(cpus["orthanc"]) / statistics.median(cpus["p2pacs"]), 3
    )
    result["ratio_metadata_vs_orthanc"] = round(o["metadata"] / p["metadata"], 3)
    result["ratio_metadata_cold_vs_orthanc"] = round(o["metadata_cold"] / p["metadata_cold"], 3)
    result["ratio_qido_vs_orthanc"] = round(o["qido"] / p["qido"], 3)
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
