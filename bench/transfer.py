"""Peer-transfer throughput (mutual TLS 1.3 on loopback) against a raw TLS socket copy.

One site's store holds N blobs (default 1000 x 0.5 MB, ~500 MB). It is served by one
TransferServer process, then by two at once (same bytes, two processes); a fresh BlobStore
(durable: fsync on, as a site runs) fetches everything with ``PeerClient.fetch_many``.
Baseline, same run, same bytes: a server process with an ssl-wrapped socket (the same TLS
contexts) sends every blob back to back; the client reads and discards them.
For reference, ``store_only`` writes the same blobs into a fresh durable store with no network.
What a user would pick instead, same run, same bytes: the blobs as files in a folder (one per
blob), copied with ``rsync -a --whole-file --fsync`` over ``ssh`` (AES-128-GCM) into a fresh
folder through a throwaway sshd on loopback that the benchmark starts (``bench/rsync_baseline.py``;
needs Debian's rsync and openssh-server); ``ratio_vs_rsync`` is one peer's rate over rsync's.
Each figure is the best of ``--runs`` rounds (default 3): on a VM that hands freed memory back
to its host, the first touch of new page-cache pages varies run to run by up to 3x.
The JSON also gives CPU seconds per GiB of the fetcher and the server(s) in the fastest round,
raw and p2pacs: on two shared cores their totals, not the network, bound the ratio.
Last line: a JSON object; MB means MiB (2**20 bytes) throughout.

    python bench/transfer.py            # ~500 MB
    python bench/transfer.py --mb 100   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rsync_baseline import RsyncOverSsh, require_tools

from p2pacs.allocator import tune_allocator
from p2pacs.federation.identity import create_federation_dir, enroll_site, load_identity
from p2pacs.site import Site
from p2pacs.store import BlobStore
from p2pacs.store.db import SiteDB
from p2pacs.transfer import Peer, PeerClient, TransferServer
from p2pacs.transfer.tls import client_context, server_context

READY = "ready"
MB = 1 << 20  # bytes; rates are MiB/s


# --- server processes ---------------------------------------------------------------------------


async def _serve_http(site_dir: Path, db_dir: Path) -> None:
    identity, federation = load_identity(Site.open(site_dir))
    db = SiteDB(db_dir, sync=False)
    server = TransferServer(BlobStore(db), identity, federation)
    await server.start()
    print(READY, server.address[1], flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    await server.stop()
    db.close()


def _serve_raw(site_dir: Path, db_dir: Path) -> None:
    """Accept one TLS connection and send every stored blob, chunk by chunk, then close."""
    identity, federation = load_identity(Site.open(site_dir))
    db = SiteDB(db_dir, sync=False)
    blobs = BlobStore(db)
    ctx = server_context(identity, federation)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(READY, listener.getsockname()[1], flush=True)
        raw, _ = listener.accept()
        with ctx.wrap_socket(raw, server_side=True) as tls:
            for h in blobs.hashes():
                for piece in blobs.read_range(h):
                    tls.sendall(piece)
            tls.shutdown(socket.SHUT_RDWR)
    db.close()


class ServerProcess:
    def __init__(self, mode: str, site_dir: Path, db_dir: Path):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, mode, str(site_dir), str(db_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != READY:
            self.close()
            raise RuntimeError(f"{mode} server did not start")
        self.port = int(line[1])

    def close(self) -> None:
        try:
            self.proc.communicate(input="", timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --- measurements -------------------------------------------------------------------------------


async def fetch_all(
    site_dir: Path, dest: Path, hashes: list[str], size: int, peers: list[Peer], *, sync: bool
) -> float:
    identity, federation = load_identity(Site.open(site_dir))
    db = SiteDB(dest, sync=sync)
    blobs = BlobStore(db)
    try:
        async with PeerClient(identity, federation) as client:
            start = time.perf_counter()
            report = await client.fetch_many([(h, size, peers) for h in hashes], blobs)
            elapsed = time.perf_counter() - start
        if report.failed or report.fetched != len(hashes):
            raise RuntimeError(f"fetch failed: {list(report.failed.values())[:3]}")
        return elapsed
    finally:
        db.close()


def raw_tls_copy(site_dir: Path, port: int, total: int) -> float:
    identity, federation = load_identity(Site.open(site_dir))
    ctx: ssl.SSLContext = client_context(identity, federation)
    buf = bytearray(1 << 20)
    got = 0
    start = time.perf_counter()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        while got < total:
            n = tls.recv_into(buf)
            if n == 0:
                break
            got += n
    elapsed = time.perf_counter() - start
    if got != total:
        raise RuntimeError(f"raw TLS copy got {got} of {total} bytes")
    return elapsed


def populate(db_dir: Path, count: int, size: int) -> list[str]:
    db = SiteDB(db_dir, sync=False)
    blobs = BlobStore(db)
    hashes = []
    try:
        batch = 64
        for first in range(0, count, batch):
            datas = [os.urandom(size) for _ in range(min(batch, count - first))]
            hashes += [blobs.put(d) for d in datas]
    finally:
        db.close()
    return hashes


def store_only(dest: Path, src: Path, hashes: list[str]) -> float:
    """Seconds to write the blobs (already in memory) into a fresh durable store."""
    source = SiteDB(src, sync=False)
    datas = [BlobStore(source).get(h) for h in hashes]
    source.close()
    db = SiteDB(dest, sync=True)
    blobs = BlobStore(db)
    try:
        start = time.perf_counter()
        futures = [blobs.submit(d, hashed=h) for h, d in zip(hashes, datas, strict=True)]
        for f in futures:
            f.result()
        return time.perf_counter() - start
    finally:
        db.close()


def write_files(src: Path, hashes: list[str], folder: Path) -> None:
    """The blobs of the store at ``src`` as files in ``folder``, one per blob (rsync's input)."""
    folder.mkdir()
    db = SiteDB(src, sync=False)
    try:
        blobs = BlobStore(db)
        for h in hashes:
            (folder / h).write_bytes(blobs.get(h))
    finally:
        db.close()


def best(runs: int, measure: Callable[[int], float]) -> float:
    """Fewest seconds over ``runs`` rounds; ``measure(i)`` runs round i."""
    return min(measure(i) for i in range(runs))


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds per GiB moved, this process (the fetcher) and the serving processes apart,
    from the fastest round: on two shared cores the ratio of these totals bounds the ratio of
    the throughputs."""

    def __init__(self, total: int):
        self.total = total
        self.best: tuple[float, float, float] | None = None  # seconds, fetcher, servers

    def measure(self, servers: list[ServerProcess], round_: Callable[[], float]) -> float:
        mine, theirs = time.process_time(), sum(process_cpu(s.proc.pid) for s in servers)
        seconds = round_()
        mine = time.process_time() - mine
        theirs = sum(process_cpu(s.proc.pid) for s in servers) - theirs
        if self.best is None or seconds < self.best[0]:
            self.best = (seconds, mine, theirs)
        return seconds

    def per_gib(self) -> dict[str, float]:
        assert self.best is not None
        scale = (1 << 30) / self.total
        _, mine, theirs = self.best
        return {"fetcher": round(mine * scale, 2), "server": round(theirs * scale, 2)}


def run(mb: float, blob_kb: int, workdir: Path, sync: bool, runs: int) -> dict[str, object]:
    size = blob_kb * 1024
    count = max(1, round(mb * (1 << 20) / size))  # MB here = MiB, so the default is 1000 blobs
    total = count * size
    fed = create_federation_dir(workdir / "fed", "bench")
    sites = {n: enroll_site(fed, n, workdir / n).path for n in ("holder-1", "holder-2", "fetcher")}
    src = workdir / "source-db"
    t = time.perf_counter()
    hashes = populate(src, count, size)
    print(f"{count} blobs x {blob_kb} KiB ({total / MB:.0f} MB) stored in "
          f"{time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip

    def fresh(name: str) -> Path:
        shutil.rmtree(workdir / name, ignore_errors=True)
        return workdir / name

    raw_cpu, one_cpu = CpuMeter(total), CpuMeter(total)

    def raw_round(_: int) -> float:
        raw = ServerProcess("--serve-raw", sites["holder-1"], src)
        try:
            return raw_cpu.measure([raw], lambda: raw_tls_copy(sites["fetcher"], raw.port, total))
        finally:
            raw.close()

    def rate(seconds: float) -> float:
        return total / MB / seconds

    raw_s = best(runs, raw_round)
    print(f"raw TLS copy: {rate(raw_s):.0f} MB/s", flush=True)
    store_s = best(runs, lambda _: store_only(fresh("dest"), src, hashes))
    print(f"store only (no network): {rate(store_s):.0f} MB/s", flush=True)

    write_files(src, hashes, workdir / "source-files")
    with RsyncOverSsh() as rsync:
        rsync_s = best(runs, lambda _: rsync.copy(workdir / "source-files", fresh("rsync-dest")))
    shutil.rmtree(workdir / "rsync-dest", ignore_errors=True)
    fsync = "--fsync" if rsync.fsync else "no --fsync"
    print(f"rsync {rsync.version} over ssh ({fsync}): {rate(rsync_s):.0f} MB/s", flush=True)

    servers = [ServerProcess("--serve", sites[n], src) for n in ("holder-1", "holder-2")]
    try:
        peers = []
        for n, s in zip(("holder-1", "holder-2"), servers, strict=True):
            ident, _ = load_identity(Site.open(sites[n]))
            peers.append(Peer(ident.site_id, n, "127.0.0.1", s.port))

        def fetch_round(k: int) -> float:
            return asyncio.run(
                fetch_all(sites["fetcher"], fresh("dest"), hashes, size, peers[:k], sync=sync)
            )

        one_s = best(runs, lambda _: one_cpu.measure(servers[:1], lambda: fetch_round(1)))
        print(f"one peer: {rate(one_s):.0f} MB/s", flush=True)
        two_s = best(runs, lambda _: fetch_round(2))
        print(f"two peers: {rate(two_s):.0f} MB/s", flush=True)
    finally:
        for s in servers:
            s.close()
    return {
        "mb": round(total / MB, 1),
        "runs": runs,
        "one_peer_mb_per_s": round(rate(one_s), 1),
        "two_peers_mb_per_s": round(rate(two_s), 1),
        "raw_tls_mb_per_s": round(rate(raw_s), 1),
        "store_only_mb_per_s": round(rate(store_s), 1),
        "rsync_mib_s": round(rate(rsync_s), 1),
        "ratio_vs_raw": round(raw_s / one_s, 3),
        "ratio_vs_rsync": round(rsync_s / one_s, 3),
        "rsync_version": rsync.version,
        "rsync_fsync": rsync.fsync,
        "raw_cpu_s_per_gib": raw_cpu.per_gib(),
        "one_peer_cpu_s_per_gib": one_cpu.per_gib(),
    }


def main() -> None:
    tune_allocator()  # as every p2pacs process does (cli), here for the raw baseline as well
    if len(sys.argv) == 4 and sys.argv[1] in ("--serve", "--serve-raw"):
        site_dir, db_dir = Path(sys.argv[2]), Path(sys.argv[3])
        if sys.argv[1] == "--serve":
            asyncio.run(_serve_http(site_dir, db_dir))
        else:
            _serve_raw(site_dir, db_dir)
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=500.0, help="MB of blobs (default 500)")
    parser.add_argument("--blob-kb", type=int, default=512, help="KiB per blob (default 512)")
    parser.add_argument(
        "--no-sync", action="store_true", help="fetching store without fsync (not how sites run)"
    )
    parser.add_argument("--runs", type=int, default=3, help="rounds per figure, best kept")
    args = parser.parse_args()
    require_tools()  # before minutes of set-up: the rsync baseline needs rsync and sshd
    workdir = Path(tempfile.mkdtemp(prefix="p2pacs-bench-transfer-"))
    try:
        result = run(args.mb, args.blob_kb, workdir, not args.no_sync, max(1, args.runs))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
