"""What the web metrics cost: per DIMSE event on the event bus, and per /metrics scrape.

The baseline is the same bus with no observer; the ratio is the bus's cost per C-STORE event
with the site's metrics and recent-failures observers subscribed, over the bare bus. The
render time is ``SiteMetrics.render`` of a federation snapshot (what a scrape costs after the
status snapshot is taken). Prints a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pacs.events import DicomRequest, EventBus
from p2pacs.web.metrics import SiteMetrics
from p2pacs.web.recent import RecentFailures

STUDY = "1.2.826.0.1.3680043.8.498.1"


def _emit_cost(bus: EventBus, n: int) -> float:
    """Microseconds per emit of a C-STORE event."""
    event = DicomRequest(
        "C-STORE", 0, 0.004, "MOD", "10.0.0.9", study_uids=(STUDY,), bytes=524_288, completed=1
    )
    start = time.perf_counter()
    for _ in range(n):
        bus.emit(event)
    return (time.perf_counter() - start) / n * 1e6


def _snapshot(members: int) -> dict[str, object]:
    return {
        "site": "a", "ae_title": "A", "version": "0", "patients": 1000, "studies": 5000,
        "instances": 500_000, "blobs": 505_000, "bytes": 2.5e11, "hashed_bytes": 1e9,
        "uptime_s": 1000.0,
        "storage": {"map_size": 1 << 40, "used_bytes": 1 << 38, "disk_free": 1e12,
                    "disk_total": 2e12},
        "federation": {
            "sites_up": members + 1, "replication": 2, "under_replicated": 0,
            "members": [{"name": f"site-{i}", "up": True, "state": "up", "last_seen_s": 0.5,
                         "studies": 5000} for i in range(members)],
            "transfer": {"received": {f"site-{i}": 10**9 for i in range(members)},
                         "sent": {f"site-{i}": 10**9 for i in range(members)}},
            "dht": {"dropped_bad_mac": 0, "datagrams_in": 10**6},
            "recovery": {"bytes_done": 0, "bytes_total": 0}, "scrub": {"runs": 1},
        },
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    bare_bus, observed_bus = EventBus(), EventBus()
    metrics = SiteMetrics(observed_bus)
    RecentFailures(observed_bus)
    bare = min(_emit_cost(bare_bus, args.events) for _ in range(args.rounds))
    observed = min(_emit_cost(observed_bus, args.events) for _ in range(args.rounds))
    snapshot = _snapshot(args.members)
    renders = []
    for _ in range(args.rounds * 4):
        start = time.perf_counter()
        body = metrics.render(snapshot)
        renders.append(time.perf_counter() - start)
    result = {
        "emit_us_bare": round(bare, 3),
        "emit_us_with_metrics": round(observed, 3),
        "metrics_us_per_event": round(observed - bare, 3),
        "ratio_vs_bare_bus": round(observed / bare, 2),
        "render_ms": round(statistics.median(renders) * 1e3, 2),
        "render_bytes": len(body),
        "members": args.members,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
