"""Federation metadata at scale: S sites holding N studies between them (R = 2), metadata only.

Everything a site does with the federation's metadata runs here with the real code on real
LMDB: each site's catalogue tree (``cattree``), one observing site's ``CatalogueStore`` (its own
tree, a copy of every member's, ``fed_holders``, reference counts, collection), the copy walk of
``catsync`` (nodes moved in memory instead of over HTTPS: the bytes counted are the node bytes
that would cross the wire) and the anti-entropy plan (``plan_repairs``). The other S - 1 sites
are their trees in memory: every site does what the observer does, so its costs are a site's.
The DHT part starts S real DHT nodes on loopback, each putting its ``site/<id>`` record, the
only record a site keeps on the DHT.

For each S and N it measures:
- ``metadata_bytes_per_study``: bytes this site writes (its own commits) and fetches (copies of
  the members' changed trees) per study ingested anywhere in the federation, over ``--changes``
  new studies after the federation holds N; must stay flat as N grows;
- ``idle_round``: bytes and CPU of an anti-entropy round between two sites with nothing new
  (the heartbeat that carries the site record, a root compared, no study looked at);
- ``member_down``: time for a survivor to list a dead member's studies, look up their holders
  and plan the copies (first batch planned = restoring R starts; all planned);
- ``wiped``: time for a wiped site to copy its own tree from a member, list it and write its
  recovery queue; until the holders of the first studies it fetches are known (the members'
  trees copied in ``Recovery``'s order: those placement puts beside the newest studies first);
  and until every member's tree is copied (who holds what);
- ``metadata_storage_pct``: the observer's LMDB bytes against the image bytes it holds
  (30 instances of 0.5 MiB per study);
- ``dht``: records and bytes each DHT node stores;
- peak RSS and the worst event-loop lag while the member-down and wiped steps run off the loop,
  with what explains it: the longest garbage collection meanwhile, what the worker threads
  were running while the loop was late (``--stacks``), and the worst lateness
  of an idle ticking process beside this one over the same steps (the machine's own
  scheduling delay: the 2 cores here are shared with other work).
Last line: JSON with every point and the targets.

    python bench/federation_scale.py                        # S = 10, 100; N = 10 k, 100 k
    python bench/federation_scale.py --max 1000000          # and N = 1 M (~15 min)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import faulthandler
import gc
import json
import linecache
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blake3 import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dht import DhtNode
from dht.membership import Identity, create_federation, issue_site_certificate
from dht.records import derive_dht_key, encode_record
from p2pacs.archive import Archive
from p2pacs.federation import cattree
from p2pacs.federation.catalogue import CatalogueEntry, SiteRecord, newest_first
from p2pacs.federation.catstore import CatalogueStore, EntryChange
from p2pacs.federation.entry_table import EntryTable
from p2pacs.healing.placement import likely_holders_first, placement, plan_repairs
from p2pacs.healing.recovery import HOLDERS_FIRST, STUDIES_AT_ONCE
from p2pacs.looplag import bulk

ROOT = "1.2.826.0.1.3680043.10.4243"
R = 2
INSTANCES = 30
INSTANCE_BYTES = 512 * 1024
BATCH = 5_000  # studies per step of an anti-entropy pass (as healing/repair.py)


class Nodes(dict[str, bytes]):
    """A member's node store, in memory."""

    def node(self, h: str) -> bytes:
        return self[h]


def site_ids(count: int) -> list[bytes]:
    return [blake3(f"bench-site-{i}".encode()).digest()[:20] for i in range(count)]


def entry(i: int, version: int = 0) -> CatalogueEntry:
    uid = f"{ROOT}.{i}"
    year = 2016 + i % 11
    return CatalogueEntry(
        uid, blake3(f"{uid}/{version}".encode()).hexdigest(), f"{year}{1 + i % 12:02d}15",
        INSTANCES, INSTANCES * INSTANCE_BYTES, float(version),
    )  # fmt: skip


def copy_tree(store: CatalogueStore, site: bytes, root: str, source: Nodes) -> int:
    """``catsync``'s walk: nodes not named by a tree held whole here, then one commit."""
    if store.root(site) == root:
        return 0
    fetched: dict[str, bytes] = {}
    level = [] if root == cattree.EMPTY or store.referenced(root) else [root]
    while level:
        below: list[str] = []
        for h in level:
            data = source[h]
            if not store.blobs.has(h):
                fetched[h] = data
            below.extend(c for c, _ in cattree.missing_below(data, store.referenced))
        level = below
    if fetched:
        store.store_nodes(fetched)
    store.advance(site, root)
    return sum(map(len, fetched.values()))


_IDLE_TICKER = """
import json, sys, threading, time
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), done.set()), daemon=True).start()
late = []
while not done.is_set():
    due = time.monotonic() + 0.01
    time.sleep(0.01)
    now = time.monotonic()
    if now - due > 0.005:
        late.append((due, now))
print(json.dumps(late), flush=True)
"""
LATE = 0.05  # seconds: a loop this late has every thread's stack dumped (faulthandler)
_IDLE_FRAMES = ("threading.py", "selectors.py", "queue.py", "thread.py")  # threads waiting


class LagProbe:
    """Ticks on the event loop; the worst overshoot is the longest the loop was blocked.

    Also, to explain it: the longest garbage collection meanwhile (``gc.callbacks``); where the
    other threads were while the loop was late (each tick re-arms ``faulthandler``'s watchdog,
    a C thread that needs no GIL, so a loop that does not tick for ``LATE`` seconds gets every
    thread's stack dumped while it is stuck); and the worst lateness of an idle process
    ticking beside this one (what the machine's scheduler alone costs: the 2 cores here are
    shared with other work)."""

    stacks = False  # ``--stacks``: faulthandler reads other threads' frames without the GIL,
    # which can crash the process (it did once here, at S = 10, N = 1 M): off by default

    def __init__(self, work: Path, period: float = 0.01):
        self.period = period
        self.worst = 0.0
        self.gc_worst = 0.0
        self.gc_worst_cpu = 0.0
        self.idle_worst = 0.0
        self.unexplained = 0.0
        self._late: list[tuple[float, float]] = []  # (due, ran) of this loop's late ticks
        self._idle_late: list[tuple[float, float]] = []  # the same for the idle process
        self._gc_cpu = 0.0
        self.late_stacks: collections.Counter[str] = collections.Counter()
        self._task: asyncio.Task[None] | None = None
        self._gc_start = 0.0
        self._dumps = work / "late-stacks.txt"
        self._dump_file: Any = None
        self._idle: subprocess.Popen[str] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.stacks:
                faulthandler.dump_traceback_later(LATE, file=self._dump_file)
            due = loop.time() + self.period  # time.monotonic: one clock for both processes
            await asyncio.sleep(self.period)
            ran = loop.time()
            self.worst = max(self.worst, ran - due)
            if ran - due > 0.005:
                self._late.append((due, ran))

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start, self._gc_cpu = time.perf_counter(), time.thread_time()
        elif self._gc_start:  # wall clock, and CPU of the collecting thread (no preemption)
            self.gc_worst = max(self.gc_worst, time.perf_counter() - self._gc_start)
            self.gc_worst_cpu = max(self.gc_worst_cpu, time.thread_time() - self._gc_cpu)

    def __enter__(self) -> LagProbe:
        self._idle = subprocess.Popen(
            [sys.executable, "-c", _IDLE_TICKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self._dump_file = self._dumps.open("w+")
        self._task = asyncio.get_running_loop().create_task(self._run())
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.stacks:
            faulthandler.cancel_dump_traceback_later()
        gc.callbacks.remove(self._on_gc)
        self._dump_file.close()
        self._count_dumps(self._dumps.read_text())
        if self._idle is not None:
            out, _ = self._idle.communicate("stop\n", timeout=30)
            self._idle_late = [(a, b) for a, b in json.loads(out or "[]")]
            self.idle_worst = max((b - a for a, b in self._idle_late), default=0.0)
        self.unexplained = max((self._own_part(a, b) for a, b in self._late), default=0.0)

    def _own_part(self, due: float, ran: float) -> float:
        """How much of one late tick of this loop the idle process was not late for too (the
        part the machine's scheduler does not explain)."""
        shared = sum(max(0.0, min(ran, b) - max(due, a)) for a, b in self._idle_late)
        return max(0.0, ran - due - shared)

    def _count_dumps(self, text: str) -> None:
        """The innermost frames of each busy thread in each dump (the loop's own thread shows
        where it was too: a long call on the loop would be seen there)."""
        for block in text.split("\nThread ")[1:] + text.split("Current thread ")[1:]:
            frames = [ln.strip() for ln in block.splitlines()[1:] if ln.strip().startswith("File")]
            if not frames or any(name in frames[0] for name in _IDLE_FRAMES):
                continue
            path, _, rest = frames[0].removeprefix('File "').partition('", line ')
            source = linecache.getline(path, int(rest.split()[0]))
            if ".get(" in source or "wait(" in source:  # a thread waiting for work
                continue
            where = [f.split("/")[-1].replace('", line ', ":") for f in frames[:3]]
            self.late_stacks[" < ".join(where)] += 1

    def report(self) -> dict[str, Any]:
        return {
            "loop_lag_ms": round(1000 * self.worst, 1),
            "gc_worst_ms": round(1000 * self.gc_worst, 1),
            "gc_worst_cpu_ms": round(1000 * self.gc_worst_cpu, 1),
            "idle_process_lag_ms": round(1000 * self.idle_worst, 1),
            # the worst late tick less the part of it an idle process was also late for
            "loop_lag_unexplained_by_machine_ms": round(1000 * self.unexplained, 1),
            "late_stacks": dict(self.late_stacks.most_common(4)),
        }


def lmdb_bytes(arc: Archive) -> int:
    info, stat = arc.db.env.info(), arc.db.env.stat()
    return int((info["last_pgno"] + 1) * stat["psize"])


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def build_federation(sites: list[bytes], n: int) -> tuple[dict[bytes, Nodes], dict[bytes, str]]:
    """Each site's tree over the studies placed on it."""
    held: dict[bytes, list[CatalogueEntry]] = {s: [] for s in sites}
    for i in range(n):
        e = entry(i)
        for s in placement(e.study_uid, sites, R):
            held[s].append(e)
    nodes: dict[bytes, Nodes] = {}
    roots: dict[bytes, str] = {}
    for s, entries in held.items():
        update = cattree.build(entries)
        nodes[s] = Nodes(update.new)
        roots[s] = update.root
    return nodes, roots


async def measure(s_count: int, n: int, changes: int, work: Path) -> dict[str, Any]:
    sites = site_ids(s_count)
    me = sites[0]
    out: dict[str, Any] = {"sites": s_count, "studies": n}
    (nodes, roots), build_s, _ = timed(lambda: build_federation(sites, n))
    out["build_trees_s"] = round(build_s, 1)
    # the other sites' trees live in this process only to emulate them: keep the garbage
    # collector off them, as a site's own long-lived entries are (Publisher.catch_up)
    gc.freeze()
    folder = work / f"s{s_count}-n{n}"
    arc = Archive(folder / "observer", map_size=64 << 30, sync=True)
    try:
        store = CatalogueStore(arc.db, arc.blobs, me)
        # this site's own tree, then a copy of every member's (what a long-running site holds)
        store.store_nodes(nodes[me])
        store.advance(me, roots[me])
        _, copy_all_s, _ = timed(
            lambda: sum(copy_tree(store, s, roots[s], nodes[s]) for s in sites[1:])
        )
        out["copy_every_tree_s"] = round(copy_all_s, 1)
        held_studies = cattree.count(store.nodes, roots[me])
        image_bytes = held_studies * INSTANCES * INSTANCE_BYTES
        out["metadata_storage_pct"] = round(100 * lmdb_bytes(arc) / image_bytes, 4)

        # --- new studies arrive anywhere: what this site writes and fetches per study
        written = fetched = 0
        cpu = 0.0
        for k in range(changes):
            e = entry(n + k)
            for s in placement(e.study_uid, sites, R):
                update = cattree.apply(nodes[s], roots[s], {e.study_uid: e})
                nodes[s].update(update.new)
                roots[s] = update.root
                t = time.process_time()
                if s == me:
                    root = store.root(me)
                    change: list[EntryChange] = [(e.study_uid, None, e)]
                    mine = cattree.apply(store.nodes, root, {e.study_uid: e})
                    store.commit_own(mine, root, change, {})
                    written += sum(map(len, mine.new.values()))
                else:
                    fetched += copy_tree(store, s, update.root, nodes[s])
                cpu += time.process_time() - t
        out["metadata_bytes_per_study"] = round((written + fetched) / changes)
        out["metadata_cpu_ms_per_study"] = round(1000 * cpu / changes, 2)

        # --- an idle round with one member: its record over the heartbeat, a root compared
        record = SiteRecord("site-1", "10.0.0.1", 11113, 11112, roots[sites[1]], n, 0.0)
        heartbeat = json.dumps(
            {**{k: getattr(record, k) for k in SiteRecord.__slots__},
             "signed": "00" * 1400, "time": time.time()}  # a signed site record: ~1.4 KB
        )  # fmt: skip
        _, _, idle_cpu = timed(lambda: copy_tree(store, sites[1], roots[sites[1]], nodes[sites[1]]))
        out["idle_round"] = {"bytes": len(heartbeat), "cpu_ms": round(1000 * idle_cpu, 3)}

        # --- a member dies: the survivors look at its studies and plan copies
        dead = sites[1]
        live = set(sites) - {dead}

        def first_and_all() -> tuple[float, float, int]:
            t0 = time.perf_counter()
            uids = [e.study_uid for e in store.entries(dead)]
            first = 0.0
            under = 0
            for i in range(0, len(uids), BATCH):
                chunk = uids[i : i + BATCH]
                holders = store.holders(chunk)
                complete = {u: set(h) for u, h in holders.items()}
                plan = plan_repairs(complete, live, me, R)
                under += len(plan.under_replicated)
                first = first or time.perf_counter() - t0
            return first, time.perf_counter() - t0, under

        with LagProbe(folder) as probe:
            first, whole, under = await asyncio.to_thread(first_and_all)
        out["member_down"] = {
            "studies": under, "first_batch_planned_s": round(first, 3),
            "all_planned_s": round(whole, 2), **probe.report(),
        }  # fmt: skip

        # --- this site is wiped: its tree from a member's copy, its queue, then who holds what
        wiped = Archive(folder / "wiped", map_size=64 << 30, sync=True)
        try:
            fresh = CatalogueStore(wiped.db, wiped.blobs, me)
            queue = EntryTable(wiped.db, "fed_pending")

            def rebuild_list() -> list[CatalogueEntry]:
                copy_tree(fresh, me, roots[me], nodes[me])
                with bulk():  # as Recovery._enqueue_missing lists and writes the queue
                    todo = list(cattree.entries(fresh.nodes, roots[me]))
                    queue.put(todo).result(600)
                gc.freeze()  # as Recovery._enqueue_missing: the queue lives for the recovery
                return todo

            def who_holds(todo: list[CatalogueEntry], t0: float) -> float:
                """Recovery._copy_member_trees's order, one tree at a time (the commits are
                one writer's anyway); returns when the first studies' holders were known."""
                first = [e.study_uid for e in newest_first(todo)[:HOLDERS_FIRST]]
                fetched_first = first[:STUDIES_AT_ONCE]
                known = 0.0
                for s in likely_holders_first(first, sites, me, R):
                    copy_tree(fresh, s, roots[s], nodes[s])
                    if not known:
                        found = fresh.holders(fetched_first)
                        if all(set(found.get(u, {})) - {me} for u in fetched_first):
                            known = time.perf_counter() - t0
                return known

            with LagProbe(folder) as probe:
                t0 = time.perf_counter()
                todo = await asyncio.to_thread(rebuild_list)
                listed = time.perf_counter() - t0
                first_known = await asyncio.to_thread(who_holds, todo, t0)
                holders_s = time.perf_counter() - t0
            out["wiped"] = {
                "studies": len(todo), "list_and_queue_s": round(listed, 2),
                "first_holders_known_s": round(first_known, 2),
                "with_holders_s": round(holders_s, 2), **probe.report(),
            }  # fmt: skip
        finally:
            wiped.close()
    finally:
        arc.close()
        shutil.rmtree(folder, ignore_errors=True)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


async def dht_records(s_count: int) -> dict[str, Any]:
    """S real DHT nodes on loopback, each putting its site record: what each one stores."""
    ca = create_federation("bench")
    nodes: list[DhtNode] = []
    rng = random.Random(3)
    try:
        for i in range(s_count):
            key = Ed25519PrivateKey.generate()
            ident = Identity(key, issue_site_certificate(ca, key.public_key(), f"site-{i:03d}"))
            boot = [nodes[j].address for j in rng.sample(range(i), min(3, i))]
            nodes.append(await DhtNode.start(ident, ca.federation, bootstrap=boot, rpc_timeout=2))
        for i, node in enumerate(nodes):
            record = SiteRecord(f"site-{i:03d}", "10.0.0.1", 11113, 11112, "ab" * 32, 10**6, 0.0)
            await node.put("site", node.site_id.hex(), record.encode(), 3600)
        counts = [len(n.storage) for n in nodes]
        keys = [derive_dht_key(ca.federation.key_hash_key, "site", n.site_id.hex()) for n in nodes]
        now = time.time()
        sizes = [
            sum(len(encode_record(r)) for k in keys for r in n.storage.records(k, now))
            for n in nodes
        ]
        return {
            "records_per_site": round(sum(counts) / s_count, 1),
            "bytes_per_site": round(sum(sizes) / s_count),
            "max_records_per_site": max(counts),
        }
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


def sizes_up_to(largest: int, only: list[int] | None = None) -> Iterator[int]:
    if only:
        yield from only
        return
    yield from (s for s in (10_000, 100_000, 1_000_000) if s < largest)
    yield largest


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="p2pacs-fedscale-", dir=args.dir))
    report: dict[str, Any] = {"points": [], "dht": {}}
    try:
        for s_count in args.sites:
            report["dht"][str(s_count)] = await dht_records(s_count)
            print(json.dumps({"sites": s_count, "dht": report["dht"][str(s_count)]}), flush=True)
            for n in sizes_up_to(args.max, args.sizes):
                point = await measure(s_count, n, args.changes, work)
                report["points"].append(point)
                print(json.dumps(point), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["targets"] = targets(report)
    return report


def targets(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    by_s: dict[int, list[dict[str, Any]]] = {}
    for p in report["points"]:
        by_s.setdefault(p["sites"], []).append(p)
    for s, points in by_s.items():
        small, large = points[0], points[-1]
        out[f"s{s}_bytes_per_study_ratio"] = round(
            large["metadata_bytes_per_study"] / small["metadata_bytes_per_study"], 2
        )
    pts = report["points"]
    out["max_idle_round_bytes"] = max(p["idle_round"]["bytes"] for p in pts)
    out["max_idle_round_cpu_ms"] = max(p["idle_round"]["cpu_ms"] for p in pts)
    out["max_loop_lag_ms"] = max(
        max(p["member_down"]["loop_lag_ms"], p["wiped"]["loop_lag_ms"]) for p in pts
    )
    out["max_loop_lag_unexplained_by_machine_ms"] = max(
        max(
            p["member_down"]["loop_lag_unexplained_by_machine_ms"],
            p["wiped"]["loop_lag_unexplained_by_machine_ms"],
        )
        for p in pts
    )
    out["max_idle_process_lag_ms"] = max(
        max(p["member_down"]["idle_process_lag_ms"], p["wiped"]["idle_process_lag_ms"]) for p in pts
    )
    out["max_wiped_list_and_queue_s"] = max(p["wiped"]["list_and_queue_s"] for p in pts)
    out["max_wiped_first_holders_known_s"] = max(p["wiped"]["first_holders_known_s"] for p in pts)
    out["max_metadata_storage_pct"] = max(p["metadata_storage_pct"] for p in pts)
    out["met"] = {
        "bytes_per_study_flat": all(v <= 1.2 for k, v in out.items() if k.endswith("_ratio")),
        "idle_round": out["max_idle_round_bytes"] < 64 * 1024 and out["max_idle_round_cpu_ms"] < 50,
        "loop_lag": out["max_loop_lag_ms"] < 100,
        "loop_lag_not_the_machine": out["max_loop_lag_unexplained_by_machine_ms"] < 100,
        "wiped_queue_under_60s": out["max_wiped_list_and_queue_s"] < 60,
        "metadata_storage": out["max_metadata_storage_pct"] <= 1.0,
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sites", type=lambda t: [int(x) for x in t.split(",")], default=[10, 100])
    ap.add_argument("--max", type=int, default=100_000, help="largest N (default 100000)")
    ap.add_argument(
        "--sizes", type=lambda t: [int(x) for x in t.split(",")], default=None,
        help="these N only (e.g. 1000000), instead of 10 k, 100 k ... --max",
    )  # fmt: skip
    ap.add_argument("--changes", type=int, default=200, help="new studies measured per point")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument(
        "--stacks", action="store_true",
        help="dump every thread's stack when the loop is late (faulthandler; can crash)",
    )  # fmt: skip
    args = ap.parse_args()
    LagProbe.stacks = args.stacks
    report = asyncio.run(run(args))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
