"""Peer-transfer throughput (mutual TLS 1.3 on loopback) against a raw TLS socket copy.

One site's store holds N blobs (default 1000 x 0.5 MB, ~500 MB). It is served by one
TransferServer process, then by two at once (same bytes, two processes); a fresh BlobStore
(durable: fsync on, as a site runs) fetches everything with ``PeerClient.fetch_many``.
Baseline, same run, same bytes: a server process with an ssl-wrapped socket (the same TLS
contexts) sends every blob back to back; the client reads and discards them.
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
from pathlib import Path

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


def run(mb: float, blob_kb: int, workdir: Path, sync: bool) -> dict[str, float]:
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

    raw = ServerProcess("--serve-raw", sites["holder-1"], src)
    try:
        raw_s = raw_tls_copy(sites["fetcher"], raw.port, total)
    finally:
        raw.close()
    print(f"raw TLS copy: {total / MB / raw_s:.0f} MB/s", flush=True)

    servers = [ServerProcess("--serve", sites[n], src) for n in ("holder-1", "holder-2")]
    try:
        peers = []
        for n, s in zip(("holder-1", "holder-2"), servers, strict=True):
            ident, _ = load_identity(Site.open(sites[n]))
            peers.append(Peer(ident.site_id, n, "127.0.0.1", s.port))
        one_s = asyncio.run(
            fetch_all(sites["fetcher"], workdir / "dest-1", hashes, size, peers[:1], sync=sync)
        )
        print(f"one peer: {total / MB / one_s:.0f} MB/s", flush=True)
        two_s = asyncio.run(
            fetch_all(sites["fetcher"], workdir / "dest-2", hashes, size, peers, sync=sync)
        )
        print(f"two peers: {total / MB / two_s:.0f} MB/s", flush=True)
    finally:
        for s in servers:
            s.close()
    one = total / MB / one_s
    return {
        "mb": round(total / MB, 1),
        "one_peer_mb_per_s": round(one, 1),
        "two_peers_mb_per_s": round(total / MB / two_s, 1),
        "raw_tls_mb_per_s": round(total / MB / raw_s, 1),
        "ratio_vs_raw": round(one / (total / MB / raw_s), 3),
    }


def main() -> None:
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
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="p2pacs-bench-transfer-"))
    try:
        result = run(args.mb, args.blob_kb, workdir, not args.no_sync)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
