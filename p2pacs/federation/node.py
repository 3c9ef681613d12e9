"""A site's membership in the federation: DHT, peer transfer, discovery, members, retrieval.

``FederationNode`` is the asyncio side of a site. It owns the DHT node, the mutual-TLS transfer
server and client, mDNS discovery, the member table with heartbeats, the publisher, and the
healing loops; its tasks live in one TaskGroup that ``stop`` cancels. DICOM handler threads reach
it only through ``ensure_local``/``commitment``/``repair_blob``, which bridge onto the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiohttp import web

from dht import DhtError, DhtNode, Entry, RecordError
from dht.const import REPLAY_WINDOW, REPUBLISH_INTERVAL
from p2pacs import failpoints
from p2pacs.archive import Archive
from p2pacs.config import parse_hostport
from p2pacs.dicom.header import AttrValue
from p2pacs.errors import FederationError, P2PacsError, PeerUnavailableError
from p2pacs.events import PeerTransfer, bad_mac_alerts
from p2pacs.federation import cattree
from p2pacs.federation.catalogue import (
    SITE_NAMESPACE,
    CatalogueEntry,
    SiteRecord,
    StudyHolding,
)
from p2pacs.federation.catstore import CatalogueStore, Committed
from p2pacs.federation.catsync import CatalogueCopier
from p2pacs.federation.identity import load_identity
from p2pacs.federation.manifest import Manifest, ManifestEntry
from p2pacs.federation.members import (
    ClockVerdict,
    Member,
    MemberTable,
    clock_verdict,
    heartbeat_interval,
)
from p2pacs.federation.publisher import Publisher
from p2pacs.federation.routes import install_peer_routes
from p2pacs.index import Version
from p2pacs.site import Site
from p2pacs.transfer.client import Peer, PeerClient, StoreFn
from p2pacs.transfer.server import TransferServer

__all__ = ["FederationNode", "Holder", "StudyFetch"]

log = logging.getLogger(__name__)
T = TypeVar("T")

BRIDGE_TIMEOUT = 600.0  # seconds a DICOM thread waits for a read-through fetch
CATALOGUE_PUSH_TIMEOUT = 10.0  # seconds a member gets to copy a new catalogue
SWEEP_INTERVAL = 60.0  # seconds between collections of superseded metadata
DECODED_CACHE = 4096  # decoded manifests (and, apart, catalogues) kept by hash
CORRUPT_QUEUE = 1024  # blobs found corrupt while serving, waiting for repair (more are dropped:
# the peer's fetch or the next scrub finds them again)


V = TypeVar("V")


class LruCache(Generic[V]):
    """Decoded immutable values by content hash, the least recently used dropped first.
    Thread-safe: recovery planning reads it from a worker thread."""

    def __init__(self, size: int):
        self._size = size
        self._items: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Holder:
    """A site that published a manifest of a study."""

    site_id: bytes
    name: str
    holding: StudyHolding
    peer: Peer | None  # None when its transfer address is not known yet
    up: bool


@dataclass(slots=True)
class StudyFetch:
    """Outcome of pulling one study from peers."""

    study_uid: str
    instances: int = 0  # versions newly indexed here
    blobs: int = 0
    bytes: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.failed


ProgressFn = Callable[[int], None]  # bytes just received


class FederationNode:
    def __init__(self, site: Site, archive: Archive, *, dicom_address: tuple[str, int]):
        self.site = site
        self.archive = archive
        self.config = site.config.federation
        self.identity, self.federation = load_identity(site)
        self.site_id: bytes = self.identity.site_id
        self.site_hex = self.site_id.hex()
        self.name = self.identity.name
        self.dicom_address = dicom_address
        self.started_at = time.time()
        self.members = MemberTable(archive.db, self.site_id)
        self.catalogues = CatalogueStore(archive.db, archive.blobs, self.site_id)
        self.copier = CatalogueCopier(self.catalogues, lambda: self.client)
        self._copy_wake = asyncio.Event()
        self.metadata_collected = 0  # superseded catalogue nodes and manifests deleted
        self.dht: DhtNode | None = None
        self.server: TransferServer | None = None
        self.client: PeerClient | None = None
        self.discovery: Any = None
        self.publisher = Publisher(
            archive,
            self.site_hex,
            self._dht_put,
            self.site_record,
            self.catalogues,
            record_ttl=self.config.record_ttl,
        )
        self.publisher.on_catalogue = self.push_catalogue
        self.publisher.on_site_record = self.push_site_record
        self.publisher.has_members = self.has_members
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task[None] | None = None
        self._study_locks: dict[str, asyncio.Lock] = {}
        self._partial: set[str] = set()  # studies whose last fetch here did not complete
        self._extra_tasks: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.on_fetched: list[Callable[[str], None]] = []  # study UIDs completed by a fetch
        # the recovery queue's entry of a study not back yet (set by the site's recovery)
        self.queued: Callable[[str], CatalogueEntry | None] = lambda _uid: None
        self.instance_blobs_fetched = 0  # by study fetches since start (status, resume tests)
        self._manifests: LruCache[Manifest] = LruCache(DECODED_CACHE)
        self.clock_offsets: dict[bytes, float] = {}  # member -> seconds its clock is ahead
        # a blob found corrupt while serving it to a peer is repaired by ``repair`` (set by the
        # site: healing's repair_blob), one at a time, each hash queued once
        self.repair: Callable[[str], Coroutine[Any, Any, bool]] | None = None
        self._corrupt: asyncio.Queue[str] = asyncio.Queue(CORRUPT_QUEUE)
        self._corrupt_queued: set[str] = set()
        self.corrupt_repaired = 0
        self._clock_was_off = False
        self._member_states: dict[bytes, str] = {}
        self.on_members_changed: list[Callable[[], None]] = []  # a member went down or came back
        self.ready = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------------

    def add_task(self, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``factory()`` in the node's TaskGroup (healing loops register here)."""
        self._extra_tasks.append(factory)

    async def start(self, install_routes: Callable[[web.Application], None] | None = None) -> None:
        """Join the DHT, serve the transfer API (our peer routes plus ``install_routes``: the
        site's control plane) and start the node's tasks."""
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        bootstrap = self._bootstrap_addresses()
        self.dht = await DhtNode.start(
            self.identity,
            self.federation,
            host=cfg.bind,
            port=cfg.dht_port,
            storage_path=self.site.dht_path,
            capacity=cfg.dht_capacity,
            bootstrap=bootstrap,
            # own records are re-signed well before they lapse, even with a short TTL
            republish_interval=min(REPUBLISH_INTERVAL, cfg.record_ttl / 4),
        )
        self.dht.on_drop(bad_mac_alerts(self.archive.events))
        self.client = PeerClient(self.identity, self.federation, events=self.archive.events)
        await self.client.__aenter__()
        self.server = TransferServer(
            self.archive.blobs,
            self.identity,
            self.federation,
            host=cfg.bind,
            port=cfg.transfer_port,
            extra_routes=lambda app: self._routes(app, install_routes),
            on_corrupt=self._corrupt_served,
            events=self.archive.events,
        )
        await self.server.start()
        if cfg.discovery:
            await self._start_discovery()
        self.archive.on_ingest(self._on_ingest_thread)
        self._runner = asyncio.create_task(self._run(), name=f"federation-{self.name}")
        log.info(
            "site %s (%s) in federation: dht %s transfer %s",
            self.name,
            self.site_hex[:12],
            self.dht.address,
            self.server.address,
        )

    async def _start_discovery(self) -> None:
        from p2pacs.discovery import Discovery

        assert self.server is not None and self.dht is not None
        try:
            self.discovery = Discovery(
                self.identity,
                self.federation,
                host=self.config.host,
                dht_port=self.dht.address[1],
                transfer_port=self.server.address[1],
                dicom_port=self.dicom_address[1],
                ae_title=self.site.config.dicom.ae_title,
            )
            await self.discovery.start()
        except Exception as exc:  # discovery is a convenience; static bootstrap still works
            log.warning("mDNS discovery unavailable (%s); using static bootstrap only", exc)
            self.discovery = None

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.publisher.catch_up(), name="catch-up")
            tg.create_task(self.publisher.run(), name="publish")
            tg.create_task(self._heartbeat_loop(), name="heartbeat")
            tg.create_task(self._repair_served_loop(), name="repair-served")
            tg.create_task(self._copy_loop(), name="catalogue-copies")
            tg.create_task(self._sweep_loop(), name="metadata-sweep")
            for factory in self._extra_tasks:
                tg.create_task(factory())

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
            self._runner = None
        if self.discovery is not None:
            try:
                await self.discovery.stop()
            except Exception:
                log.debug("discovery stop failed", exc_info=True)
            self.discovery = None
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.client is not None:
            await self.client.__aexit__(None, None, None)
            self.client = None
        if self.dht is not None:
            await self.dht.stop()
            self.dht = None

    def snapshot(self) -> dict[str, Any]:
        """The federation part of ``status``: members, clock, repair of served blobs, DHT."""
        now = time.time()
        held = self.catalogues.roots()  # a read of one small table
        members: list[dict[str, Any]] = [
            {
                "name": m.name,
                "site_id": m.site_id.hex(),
                "up": m.is_up(self.config.down_after, now),
                "state": m.state(self.config.down_after, now),
                "last_seen_s": round(now - m.last_seen, 1) if m.last_seen else None,
                "address": f"{m.record.host}:{m.record.transfer_port}",
                "studies": m.record.studies,
                # this site holds the member's latest catalogue (what it needs after a wipe)
                "catalogue_held": held.get(m.site_id, "") == m.record.catalogue_hash,
                "clock_offset_s": (
                    round(self.clock_offsets[m.site_id], 1)
                    if m.site_id in self.clock_offsets
                    else None
                ),
            }
            for m in sorted(self.members, key=lambda m: m.name)
        ]
        clock = self.clock()
        return {
            "site_id": self.site_hex,
            "replication": self.config.replication,
            "sites_up": 1 + sum(m["up"] for m in members),
            "sites_down": sum(not m["up"] for m in members),
            "members": members,
            "corrupt_served": self.server.stats["corrupt"] if self.server is not None else 0,
            "corrupt_repaired": self.corrupt_repaired,
            "catalogue": self.publisher.catalogue_hash,
            "catalogue_studies": self.publisher.catalogue_studies,
            "metadata": {
                "catalogue_copies": self.copier.stats.copies,
                "catalogue_nodes_fetched": self.copier.stats.nodes_fetched,
                "catalogue_bytes_fetched": self.copier.stats.bytes_fetched,
                "catalogue_copies_failed": self.copier.stats.failed,
                "garbage": self.catalogues.garbage(),
                "collected": self.metadata_collected,
            },
            # its site record went out (after a member copied the catalogue it names)
            "site_record": self.dht is not None and self.signed_site_record() is not None,
            "studies_published": self.publisher.studies_published,
            "clock": {
                "offset_s": None if clock.offset is None else round(clock.offset, 1),
                "members": clock.members,
                "off": clock.off,
            },
            "dht": dict(self.dht.stats) if self.dht is not None else {},
            "instance_blobs_fetched": self.instance_blobs_fetched,
            "transfer": self.transfer_bytes(),
        }

    def transfer_bytes(self) -> dict[str, dict[str, int]]:
        """Blob bytes fetched from (``received``) and served to (``sent``) each member, by site
        name since this process started (a caller not in the member table yet: its id)."""
        received = dict(self.client.received) if self.client is not None else {}
        sent: dict[str, int] = {}
        for site_id, n in (self.server.sent if self.server is not None else {}).items():
            member = self.members.get(site_id)
            name = member.name if member is not None else site_id.hex()[:16]
            sent[name] = sent.get(name, 0) + n
        return {"received": received, "sent": sent}

    def _routes(self, app: web.Application, more: Callable[[web.Application], None] | None) -> None:
        install_peer_routes(self, app)
        if more is not None:
            more(app)

    def _corrupt_served(self, h: str) -> None:
        """The transfer server found blob ``h`` rotten on its way out: queue its repair."""
        if h in self._corrupt_queued or self._corrupt.full():
            return
        self._corrupt_queued.add(h)
        self._corrupt.put_nowait(h)

    async def _repair_served_loop(self) -> None:
        while True:
            h = await self._corrupt.get()
            try:
                if self.repair is not None and await self.repair(h):
                    self.corrupt_repaired += 1
            except Exception:
                log.exception("repair of served blob %s failed", h[:16])
            finally:
                self._corrupt_queued.discard(h)

    # --- records ----------------------------------------------------------------------------------

    def site_record(self) -> SiteRecord:
        assert self.server is not None and self.dht is not None
        return SiteRecord(
            name=self.name,
            host=self.config.host,
            transfer_port=self.server.address[1],
            dht_port=self.dht.address[1],
            catalogue_hash=self.publisher.catalogue_hash,
            studies=len(self.publisher.entries),
            started=self.started_at,
        )

    async def _dht_put(self, namespace: str, key: str, value: bytes, ttl: float) -> int:
        assert self.dht is not None
        await failpoints.async_hit("dht.put", FederationError)
        return await self.dht.put(namespace, key, value, ttl)

    def _on_ingest_thread(self, ingested: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.publisher.mark, [ingested.study_uid])

    # --- members ----------------------------------------------------------------------------------

    def peer_of(self, member: Member) -> Peer:
        r = member.record
        return Peer(member.site_id, r.name, r.host, r.transfer_port)

    def live_members(self) -> list[Member]:
        return self.members.up(self.config.down_after)

    def live_site_ids(self) -> set[bytes]:
        return {self.site_id} | {m.site_id for m in self.live_members()}

    async def _heartbeat_loop(self) -> None:
        interval = heartbeat_interval(self.config.down_after)
        while True:
            try:
                await self.heartbeat()
            except Exception:
                log.exception("heartbeat round failed")
            await asyncio.sleep(interval)

    async def heartbeat(self) -> None:
        """Learn new members (DHT contacts, mDNS) and check that every known one answers."""
        assert self.dht is not None and self.client is not None
        if not self.dht.contacts():  # alone (first start, or every peer was down): rejoin
            await self._bootstrap(self._bootstrap_addresses())
        known = {m.site_id for m in self.members}
        candidates: set[bytes] = {c.site_id for c in self.dht.contacts()}
        if self.discovery is not None:
            found = self.discovery.found()
            await self._bootstrap_from(found)
            candidates |= {d.site_id for d in found}
        for site_id in candidates - known - {self.site_id}:
            await self.refresh_member(site_id)
        await asyncio.gather(*(self._ping(m) for m in self.members), return_exceptions=True)
        self._copy_wake.set()  # copy the trees of members whose root moved
        self._log_member_changes()
        self._check_clock()

    def _log_member_changes(self) -> None:
        """One log line per change of a member's state (down, back, suspected)."""
        now = time.time()
        for m in self.members:
            state = m.state(self.config.down_after, now)
            before = self._member_states.get(m.site_id)
            self._member_states[m.site_id] = state
            if before is None or before == state:
                continue
            silent = now - m.last_seen if m.last_seen else 0.0
            if (state == "down") != (before == "down"):  # the live set changed: replan now
                for listener in self.on_members_changed:
                    listener()
            if state == "down":
                log.warning("member %s is down: no answer for %.0f s", m.name, silent)
            elif state == "suspect":
                log.info("member %s is suspected: no answer for %.1f s", m.name, silent)
            elif before == "down":
                log.warning("member %s is back", m.name)

    def clock(self) -> ClockVerdict:
        live = {m.site_id for m in self.live_members()}
        offsets = [o for site_id, o in self.clock_offsets.items() if site_id in live]
        return clock_verdict(offsets, REPLAY_WINDOW)

    def _check_clock(self) -> None:
        """Say so, once per change, when this clock and the members' disagree beyond the DHT's
        replay window: every DHT datagram between them is then dropped as stale, so nothing
        this site publishes reaches them."""
        verdict = self.clock()
        if verdict.off and not self._clock_was_off:
            log.error(
                "this site's clock differs from %d member(s) by %+.0f s (their clocks minus "
                "ours), beyond the DHT's %.0f s window: DHT records cannot be published or "
                "read; check NTP on this machine (and on the members if they disagree)",
                verdict.members, verdict.offset or 0.0, REPLAY_WINDOW,
            )  # fmt: skip
        elif self._clock_was_off and not verdict.off and verdict.members:
            log.warning("this site's clock agrees with the members again")
        self._clock_was_off = verdict.off

    async def _bootstrap_from(self, found: list[Any]) -> None:
        assert self.dht is not None
        contacts = {c.site_id for c in self.dht.contacts()}
        fresh = [(d.host, d.dht_port) for d in found if d.site_id not in contacts]
        if fresh:
            await self._bootstrap(fresh)

    def bootstrap_addresses(self) -> list[tuple[str, int]]:
        """Where this site looks for the federation: ``[federation] bootstrap``, then the
        members it knows (``recover`` names them when nobody answers)."""
        return self._bootstrap_addresses()

    def _bootstrap_addresses(self) -> list[tuple[str, int]]:
        addrs = [parse_hostport(b, self.config.dht_port) for b in self.config.bootstrap]
        return addrs + [(m.record.host, m.record.dht_port) for m in self.members]

    async def _bootstrap(self, addrs: list[tuple[str, int]]) -> None:
        assert self.dht is not None
        if not addrs:
            return
        try:
            await self.dht.bootstrap(addrs)
        except DhtError as exc:  # mDNS may list sites that are gone; static peers may be down
            log.debug("DHT bootstrap via %s failed: %s", addrs, exc)

    async def refresh_member(self, site_id: bytes) -> Member | None:
        """Look up a site's own ``site/<id>`` record on the DHT."""
        assert self.dht is not None
        for entry in await self.dht.get(SITE_NAMESPACE, site_id.hex()):
            if entry.publisher == site_id:
                try:
                    return self.members.upsert(site_id, SiteRecord.decode(entry.value), seen=False)
                except (P2PacsError, ValueError):
                    log.warning("ignoring a malformed site record of %s", site_id.hex()[:12])
        return None

    async def _ping(self, member: Member) -> None:
        assert self.client is not None
        try:
            sent = time.time()
            raw = await asyncio.wait_for(
                self.client.request_json(self.peer_of(member), "GET", "/v1/site"), 3.0
            )
            answered = time.time()
            record = SiteRecord(**{k: raw[k] for k in SiteRecord.__slots__})
            signed = bytes.fromhex(raw.get("signed") or "")
            their_time = float(raw.get("time") or 0.0)
        except (P2PacsError, OSError, TimeoutError, KeyError, TypeError, ValueError):
            return
        self.members.upsert(member.site_id, record, seen=True)
        if their_time:  # NTP's estimate: their clock against the middle of our round trip
            self.clock_offsets[member.site_id] = their_time - (sent + answered) / 2
        if signed:
            self.keep_signed(member.site_id, signed)

    # --- signed site records: every member keeps every other member's latest -------------------

    def signed_site_record(self) -> bytes | None:
        """This site's latest signed ``site/<id>`` record (None before the first publication)."""
        assert self.dht is not None
        return self.dht.own_record(SITE_NAMESPACE, self.site_hex)

    def open_site_record(self, site_id: bytes, raw: bytes, *, allow_expired: bool) -> Entry:
        """Verify a signed ``site/<id>`` record of ``site_id``; ``DhtError`` if it is not one."""
        assert self.dht is not None
        entry = self.dht.open_record(
            SITE_NAMESPACE, site_id.hex(), raw, allow_expired=allow_expired
        )
        if entry.publisher != site_id:
            raise RecordError("site record signed by another site")
        return entry

    def keep_signed(self, site_id: bytes, raw: bytes) -> bool:
        """Keep a member's signed site record if it verifies and is newer; True if kept."""
        if site_id == self.site_id or self.members.is_kept(site_id, raw):
            return False
        try:
            entry = self.open_site_record(site_id, raw, allow_expired=False)
        except DhtError as exc:
            log.info("ignoring a site record of %s: %s", site_id.hex()[:12], exc)
            return False
        return self.members.keep_signed(site_id, entry.seq, raw)

    async def push_site_record(self) -> None:
        """Hand our newly signed site record to every live member (heartbeats are the backstop
        for members that are down now)."""
        assert self.client is not None
        raw = self.signed_site_record()
        if raw is None:
            return
        client, body = self.client, {"record": raw.hex()}

        async def one(peer: Peer) -> None:
            path = f"/v1/sites/{self.site_hex}/record"
            try:
                await asyncio.wait_for(
                    client.request_json(peer, "POST", path, body), CATALOGUE_PUSH_TIMEOUT
                )
            except (P2PacsError, OSError, TimeoutError) as exc:
                log.info("%s did not take our site record: %s", peer.name, exc)

        await asyncio.gather(*(one(p) for p in self.live_peers()))

    async def own_site_records(self) -> list[Entry]:
        """Every copy of this site's own signed site record we can find now: on the DHT and at
        each live member (those outlive the DHT's TTL). Expired copies count: the signature
        proves this site wrote them, ``seq`` orders them."""
        assert self.dht is not None and self.client is not None
        on_dht = await self.dht.get(SITE_NAMESPACE, self.site_hex)
        found = [e for e in on_dht if e.publisher == self.site_id]
        client = self.client

        async def one(peer: Peer) -> Entry | None:
            try:
                raw = await asyncio.wait_for(
                    client.request_json(peer, "GET", f"/v1/sites/{self.site_hex}/record"),
                    CATALOGUE_PUSH_TIMEOUT,
                )
                record = bytes.fromhex(str(raw["record"])) if raw.get("record") else b""
            except (P2PacsError, OSError, TimeoutError, KeyError, TypeError, ValueError) as exc:
                log.info("%s did not answer with our site record: %s", peer.name, exc)
                return None
            if not record:
                return None
            try:
                return self.open_site_record(self.site_id, record, allow_expired=True)
            except DhtError as exc:
                log.warning("%s answered with a bad copy of our site record: %s", peer.name, exc)
                return None

        copies = await asyncio.gather(*(one(p) for p in self.live_peers()))
        return found + [e for e in copies if e is not None]

    async def push_catalogue(self, h: str) -> int:
        """Have every live member copy this site's new catalogue now (not at its next pass);
        return how many took it. The site record may name it only once one has: a record
        naming a catalogue that only this site holds is useless to it after a wipe."""
        assert self.client is not None and self.server is not None
        client, body = self.client, {"hash": h, "port": self.server.address[1]}

        async def one(peer: Peer) -> bool:
            try:
                await asyncio.wait_for(
                    client.request_json(peer, "POST", "/v1/catalogue", body),
                    CATALOGUE_PUSH_TIMEOUT,
                )
                return True
            except (P2PacsError, OSError, TimeoutError) as exc:
                log.info("%s did not take our catalogue: %s", peer.name, exc)
                return False

        return sum(await asyncio.gather(*(one(p) for p in self.live_peers())))

    def has_members(self) -> bool:
        """Whether any other site is known (member table or DHT contacts): then the site
        record must wait until one of them holds the catalogue it names."""
        known = next(iter(self.members), None) is not None
        return known or bool(self.dht is not None and self.dht.contacts())

    # --- holders and fetching -------------------------------------------------------------------

    async def holders(self, study_uid: str, *, fresh: bool = True) -> list[Holder]:
        """Every other site whose catalogue lists ``study_uid`` (from the copies of the members'
        trees held here: a local read), live ones first.

        A study no copy lists may be newer than the copies (sent to a member a moment ago, or
        asked for by a site that was wiped and has not copied its members' trees yet): then, with
        ``fresh``, the live members are asked for their current roots, what moved is copied, and
        the copies are read again. A study nobody holds costs that one round per lookup."""
        found = await asyncio.to_thread(self.catalogues.holders, [study_uid])
        if fresh and not set(found.get(study_uid, {})) - {self.site_id}:
            await asyncio.gather(*(self._ping(m) for m in self.live_members()))
            await self.copy_member_catalogues()
            found = await asyncio.to_thread(self.catalogues.holders, [study_uid])
        out = []
        for site_id, holding in found.get(study_uid, {}).items():
            if site_id == self.site_id:
                continue
            member = self.members.get(site_id) or await self.refresh_member(site_id)
            peer = self.peer_of(member) if member else None
            up = bool(member and member.is_up(self.config.down_after))
            name = member.name if member else site_id.hex()[:12]
            out.append(Holder(site_id, name, holding, peer, up))
        out.sort(key=lambda h: (not h.up, h.site_id))
        return out

    def _lock(self, study_uid: str) -> asyncio.Lock:
        return self._study_locks.setdefault(study_uid, asyncio.Lock())

    def study_lock(self, study_uid: str) -> asyncio.Lock:
        """Held while a fetch of the study runs; dropping a surplus copy takes it too."""
        return self._lock(study_uid)

    async def fetch_blob(self, h: str, size: int | None, peers: list[Peer]) -> None:
        """Fetch one blob (manifest, catalogue, instance) from the first holder that has it."""
        assert self.client is not None
        if self.archive.blobs.has(h):
            return
        if not peers:
            raise PeerUnavailableError(f"no reachable site holds blob {h[:16]}")
        await self.client.fetch_into(peers, h, size, self.archive.blobs)

    async def fetch_manifest(self, h: str, peers: list[Peer]) -> Manifest:
        """A manifest by hash: decoded once, then from the cache (anti-entropy asks for the
        same ones every pass); its bytes are hashed once, when fetched or read."""
        cached = self._manifests.get(h)
        if cached is None:
            cached = Manifest.decode(await self._small_blob(h, peers))
            self._manifests.put(h, cached)
        return cached

    def local_manifest(self, h: str) -> Manifest | None:
        """A manifest held here (decoded once, then cached); None if not held. Any thread."""
        cached = self._manifests.get(h)
        if cached is None and self.archive.blobs.has(h):
            cached = Manifest.decode(self.archive.blobs.get(h))
            self._manifests.put(h, cached)
        return cached

    async def _small_blob(self, h: str, peers: list[Peer]) -> bytes:
        """A small blob's verified bytes: read here (hash-checked) or fetched (hash-checked on
        arrival, stored, returned without reading it back)."""
        assert self.client is not None
        if self.archive.blobs.has(h):
            return await asyncio.to_thread(self.archive.blobs.get, h)
        if not peers:
            raise PeerUnavailableError(f"no reachable site holds blob {h[:16]}")
        data = await self.client.fetch_verified(peers, h, self.archive.blobs)
        # a manifest fetched to compare: kept while a catalogue held here names it, else
        # collected after the grace period
        await asyncio.to_thread(self.catalogues.mark_unreferenced, [h])
        return data

    def live_peers(self) -> list[Peer]:
        return [self.peer_of(m) for m in self.live_members()]

    async def fetch_study(
        self,
        study_uid: str,
        *,
        extra_manifests: tuple[str, ...] = (),
        progress: ProgressFn | None = None,
    ) -> StudyFetch:
        """Pull every version of a study that other sites hold and this one lacks.

        Until a fetch of it completes, the study counts as partial here (``held`` is False), so
        a C-MOVE/C-GET meanwhile reads through instead of serving what has arrived so far."""
        async with self._lock(study_uid):
            self._partial.add(study_uid)
            result = await self._fetch_study(study_uid, extra_manifests, progress)
            if result.complete:
                self._partial.discard(study_uid)
            return result

    async def _fetch_study(
        self, study_uid: str, extra_manifests: tuple[str, ...], progress: ProgressFn | None
    ) -> StudyFetch:
        assert self.client is not None
        result = StudyFetch(study_uid)
        holders = [h for h in await self.holders(study_uid) if h.peer is not None]
        peers = [h.peer for h in holders if h.peer is not None]
        live = [h.peer for h in holders if h.up and h.peer is not None] or peers
        wanted: dict[str, list[Peer]] = {}
        for h in holders:
            assert h.peer is not None
            wanted.setdefault(h.holding.manifest_hash, []).append(h.peer)
        for mh in extra_manifests:
            wanted.setdefault(mh, []).extend(self.live_peers())
        if not wanted:
            raise PeerUnavailableError(f"no other site holds study {study_uid}")
        entries: dict[tuple[str, str], ManifestEntry] = {}
        for mh, mpeers in wanted.items():
            try:
                manifest = await self.fetch_manifest(mh, mpeers)
            except P2PacsError as exc:
                result.failed[f"manifest:{mh}"] = str(exc)
                continue
            for e in manifest.entries:
                entries[(e.sop_uid, e.hash)] = e
        todo = [
            e for e in sorted(entries.values(), key=lambda e: e.received) if not self._indexed(e)
        ]
        missing = self.archive.blobs.missing({e.hash for e in todo})
        sizes = {e.hash: e.size for e in todo}
        checked: dict[str, dict[str, AttrValue]] = {}  # versions stored bare, index attributes
        if missing:
            report = await self.client.fetch_many(
                [(h, sizes[h], live) for h in missing],
                self.archive.blobs,
                progress=(lambda done, _total: progress(done)) if progress else None,
                store=self._store_and_index(todo, checked),
            )
            result.blobs += report.fetched
            self.instance_blobs_fetched += report.fetched
            result.bytes += report.bytes
            result.failed.update(report.failed)
        for e in todo:
            if e.hash in result.failed:
                continue
            try:
                if not self._indexed(e):
                    attrs = checked.get(e.hash)
                    if attrs is not None:  # checked on arrival: index it, read nothing back
                        version = Version(e.hash, e.size, e.transfer_syntax, e.prefix, e.received)
                        await asyncio.wrap_future(self.archive.index_stored(attrs, version))
                    else:  # streamed (over SMALL_BLOB) or stored by an earlier fetch
                        await asyncio.to_thread(self._index_fetched, e)
                result.instances += 1
            except P2PacsError as exc:
                result.failed[e.hash] = str(exc)
        if result.blobs:  # the audit trail: instances transferred in (PS3.15 A.5.3.5)
            names = ",".join(dict.fromkeys(p.name for p in live))
            self.archive.events.emit(PeerTransfer("in", names, result.bytes, "fetch", study_uid))
        if result.instances:
            self.publisher.mark([study_uid])
        if result.complete:
            for listener in self.on_fetched:
                listener(study_uid)
        return result

    def _store_and_index(
        self, todo: list[ManifestEntry], checked: dict[str, dict[str, AttrValue]]
    ) -> StoreFn:
        """Write a fetched instance and its index entry in one transaction, as it arrives (on
        the transfer client's worker thread, which has just hashed the bytes: checking and
        parsing the header happen there too, never on the event loop).

        Versions of one instance must be indexed oldest first (the newest received is current):
        those are checked and parsed on arrival, written bare, and their attributes kept in
        ``checked`` for the ordered pass after the fetch."""
        versions = Counter(e.sop_uid for e in todo)
        by_hash = {e.hash: e for e in todo}

        def store(h: str, data: bytes) -> Future[Any]:
            e = by_hash.get(h)
            if e is None:
                return self.archive.blobs.submit(data, hashed=h)
            if versions[e.sop_uid] > 1:
                checked[h] = self.archive.check(data, e.transfer_syntax)
                return self.archive.blobs.submit(data, hashed=h)
            return self.archive.submit(
                data, e.transfer_syntax, e.prefix, received=e.received, hashed=h
            )

        return store

    def _indexed(self, e: ManifestEntry) -> bool:
        rec = self.archive.index.instance(e.sop_uid)
        return rec is not None and any(v.hash == e.hash for v in rec.versions)

    def _index_fetched(self, e: ManifestEntry) -> None:
        """Index a stored blob the fetch could not check on arrival (streamed in chunks, or
        stored by an earlier fetch): read back once to check its structure, not hashed again
        (it was verified when it was written)."""
        data = self.archive.blobs.get(e.hash, verify=False)
        self.archive.submit(
            data, e.transfer_syntax, e.prefix, received=e.received, hashed=e.hash
        ).result(BRIDGE_TIMEOUT)

    # --- bridges for DICOM threads --------------------------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = BRIDGE_TIMEOUT) -> T:
        """Run ``coro`` on the node's loop from another thread and wait for its result."""
        if self._loop is None:
            coro.close()
            raise FederationError("the federation node is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def held(self, study_uid: str) -> bool:
        """Held whole here: indexed, not queued for recovery, no fetch of it unfinished."""
        return (
            study_uid not in self._partial
            and self.queued(study_uid) is None
            and self.archive.index.study(study_uid) is not None
        )

    def ensure_local(self, study_uids: list[str]) -> None:
        """Read-through for C-MOVE/C-GET: fetch studies this site does not hold (yet)."""
        for uid in study_uids:
            if self.held(uid):
                continue
            pending = self.queued(uid)
            extra = (pending.manifest_hash,) if pending else ()
            log.info("read-through: fetching study %s from peers", uid)
            fetched = self.call(self.fetch_study(uid, extra_manifests=extra))
            log.info(
                "read-through of %s: %d instances, %d bytes%s",
                uid,
                fetched.instances,
                fetched.bytes,
                f", {len(fetched.failed)} failed" if fetched.failed else "",
            )

    # --- members' catalogue trees -----------------------------------------------------------------

    async def copy_catalogue(self, site_id: bytes, root: str, peers: list[Peer]) -> Committed:
        """Hold ``root`` as ``site_id``'s catalogue tree, fetching only the nodes not held."""
        return await self.copier.copy(site_id, root, peers)

    async def _copy_loop(self) -> None:
        """Copy each live member's tree when its site record names a new root (heartbeats
        wake this; a member's own push usually got here first)."""
        while True:
            await self._copy_wake.wait()
            self._copy_wake.clear()
            await self.copy_member_catalogues()

    async def copy_member_catalogues(
        self, *, first: Sequence[bytes] = (), at_once: int | None = None
    ) -> int:
        """Copy the latest tree of every live member not held yet; returns how many failed
        (a wiped site needs them all to know who holds its studies). ``first``: members to
        start with (in that order); ``at_once``: copies running together (default: all), so
        the first ones are not slowed by the rest."""
        held = await asyncio.to_thread(self.catalogues.roots)
        stale = [
            m
            for m in self.live_members()
            if m.record.catalogue_hash != held.get(m.site_id, cattree.EMPTY)
        ]
        rank = {site: i for i, site in enumerate(first)}
        stale.sort(key=lambda m: rank.get(m.site_id, len(rank)))  # stable: the rest as listed
        slots = asyncio.Semaphore(at_once or max(1, len(stale)))  # FIFO: in that order

        async def one(m: Member) -> bool:
            peers = [self.peer_of(m), *self.live_peers()]
            try:
                async with slots:
                    await self.copy_catalogue(m.site_id, m.record.catalogue_hash, peers)
                return True
            except (P2PacsError, OSError) as exc:
                log.info("could not copy the catalogue of %s: %s", m.name, exc)
                return False

        return sum(not ok for ok in await asyncio.gather(*(one(m) for m in stale)))

    async def _sweep_loop(self) -> None:
        """Collect superseded catalogue nodes and manifests, a bounded batch at a time."""
        grace = self.config.metadata_grace
        while True:
            await asyncio.sleep(min(SWEEP_INTERVAL, max(1.0, grace)))
            try:
                gone = await asyncio.to_thread(self.catalogues.sweep, grace)
            except P2PacsError as exc:
                log.warning("metadata sweep failed: %s", exc)
                continue
            self.metadata_collected += gone
            if gone:
                log.info("collected %d superseded catalogue nodes and manifests", gone)
