"""The audit trail's cost on DICOM ingest: ``p2pacs serve`` with the audit trail off, on (local
log only) and on with a TLS repository (Debian's rsyslog), same files, same run.

N generated CT instances (~0.5 MB each) are sent by dcmtk ``storescu`` (TCP_NODELAY=1, 128 KiB
PDUs, one association) to a fresh site per round; the variants take turns each round and each
keeps its best rate. After each send the audit records are counted: one DICOM Instances
Transferred per C-STORE in the local log and, for the TLS variant, at rsyslog. Last line: a
JSON object with the rates and their ratios to the audit-off baseline.

    python bench/audit.py --instances 200
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "audit"))

from _common import bench_files

from p2pacs.audit.log import AuditLog, Cursor
from p2pacs.site import Site

from audit_helpers import Rsyslog  # type: ignore[import-not-found,unused-ignore]
from interop_peers import P2pacsServe, run_dcmtk  # type: ignore[import-not-found,unused-ignore]

VARIANTS = ("off", "local", "tls")
DELIVERY_TIMEOUT = 120.0  # seconds for rsyslog to have every record after the send


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def logged(site_dir: Path) -> int:
    log = AuditLog(site_dir / "audit", max_bytes=1 << 30)
    try:
        return sum(1 for _ in log.read_from(Cursor(1, 0), 10**9))
    finally:
        log.close()


def one_round(variant: str, files: list[Path], work: Path, rs: Rsyslog | None) -> float:
    site_dir = work / variant / "site"
    site = Site.open(site_dir, create=True)
    site.config.audit.enabled = variant != "off"
    if variant == "tls":
        assert rs is not None
        site.config.audit.repositories = [f"tls://127.0.0.1:{rs.tls_port}"]
        site.config.audit.ca_file = str(rs.ca)
    site.save_config()
    before = len(rs.received()) if rs is not None else 0
    serve = P2pacsServe(site_dir, "P2PACS")
    serve.start()
    try:
        start = time.perf_counter()
        run_dcmtk("storescu", "-aet", "BENCH", "-aec", "P2PACS", "--max-send-pdu", "131072",
                  "127.0.0.1", serve.port, *files, timeout=600)  # fmt: skip
        seconds = time.perf_counter() - start
    finally:
        serve.stop()
    if variant != "off":  # start, one per C-STORE, stop
        count = logged(site_dir)
        if count != len(files) + 2:
            raise RuntimeError(f"{variant}: {count} audit records for {len(files)} C-STOREs")
    if variant == "tls":
        assert rs is not None
        got = rs.wait_for(lambda g: len(g) - before >= len(files) + 2, DELIVERY_TIMEOUT)
        if len(got) - before != len(files) + 2:
            raise RuntimeError(f"rsyslog holds {len(got) - before} of {len(files) + 2}")
    shutil.rmtree(work / variant, ignore_errors=True)
    return len(files) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="p2pacs-bench-audit-", dir=args.dir))
    rs = Rsyslog(work / "rsyslog", free_port(), free_port(socket.SOCK_DGRAM))
    best = dict.fromkeys(VARIANTS, 0.0)
    try:
        files = bench_files(work / "src", args.instances)
        rs.start()
        for r in range(args.rounds):
            for variant in VARIANTS:
                rate = one_round(variant, files, work, rs)
                print(f"{variant} round {r + 1}: {rate:.0f} instances/s", file=sys.stderr)
                best[variant] = max(best[variant], rate)
    finally:
        rs.stop()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "instances": args.instances,
        **{f"audit_{k}_per_s": round(v, 1) for k, v in best.items()},
        "ratio_local_vs_off": round(best["local"] / best["off"], 3),
        "ratio_tls_vs_off": round(best["tls"] / best["off"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
