"""Lookup latency and hop count of the p2pacs DHT on loopback, all nodes in one process.

Builds ``--nodes`` nodes (each joins through up to three random earlier nodes), puts ``--records``
records from random nodes, then gets each from a random other node. Baseline in the same run: a
get of a key the getting node itself stores (no network). Last line: JSON
``{"nodes", "p50_ms", "p99_ms", "mean_hops", "success_rate", "rss_mb_per_node", ...}``.

    python bench/dht_lookup.py --nodes 100      # default, ~10 s
    python bench/dht_lookup.py --nodes 300
    python bench/dht_lookup.py --nodes 1000     # ~2-3 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dht import DhtNode, LookupFailedError
from dht.membership import Identity, create_federation, issue_site_certificate


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc), falling back to the peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[idx]


async def run(n: int, records: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    ca = create_federation("bench")
    rss0 = rss_mb()
    nodes: list[DhtNode] = []
    t0 = time.perf_counter()
    try:
        for i in range(n):
            key = Ed25519PrivateKey.generate()
            ident = Identity(key, issue_site_certificate(ca, key.public_key(), f"site-{i:04d}"))
            boot = [nodes[j].address for j in rng.sample(range(i), min(3, i))]
            nodes.append(await DhtNode.start(ident, ca.federation, bootstrap=boot, rpc_timeout=2.0))
        build_s = time.perf_counter() - t0
        rss_per_node = (rss_mb() - rss0) / n

        keys = [f"1.2.826.0.1.3680043.2.1125.{seed}.{i}" for i in range(records)]
        put_failures = 0
        for k in keys:
            try:
                await rng.choice(nodes).put("study", k, b"manifest:" + k.encode()[-40:], 3600)
            except LookupFailedError:
                put_failures += 1

        latencies: list[float] = []
        hops: list[int] = []
        ok = 0
        for k in keys:
            node = rng.choice(nodes)
            t = time.perf_counter()
            result = await node.get_detailed("study", k)
            latencies.append((time.perf_counter() - t) * 1000)
            if any(e.value == b"manifest:" + k.encode()[-40:] for e in result.entries):
                ok += 1
            hops.append(result.hops)
        return {
            "nodes": n,
            "records": records,
            "build_s": round(build_s, 1),
            "p50_ms": round(percentile(latencies, 0.50), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2),
            "mean_ms": round(statistics.fmean(latencies), 2),
            "mean_hops": round(statistics.fmean(hops), 2),
            "hops_target": round(math.log2(n) / 2 + 1, 2),
            "success_rate": ok / records,
            "put_failures": put_failures,
            "rss_mb_per_node": round(rss_per_node, 3),
            "mean_contacts": round(statistics.fmean(len(x.contacts()) for x in nodes), 1),
        }
    finally:
        await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.nodes, args.records, args.seed))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
