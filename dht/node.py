"""``DhtNode``: a federation member on the DHT (kademlia's ``Server``, extended through its seams).

Owns the UDP endpoint (``DhtProtocol``), the record store, and one ``asyncio.TaskGroup`` that runs
identity checks of new contacts and the maintenance loop (republish own records before they
expire, cull expired ones, refresh lonely buckets, save contacts). ``put`` signs and seals a
record and stores it on the k closest nodes; ``get`` asks the k closest nodes that answer and
returns the verified, merged set, one entry per publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from socket import SOCK_DGRAM
from types import TracebackType
from typing import Any, Self

import msgpack
from kademlia.network import Server
from kademlia.node import Node

from dht.const import (
    ALPHA,
    BURST_PER_PEER,
    ID_SIZE,
    MAX_TTL,
    RATE_PER_PEER,
    REPUBLISH_INTERVAL,
    K,
)
from dht.errors import LocalProtocolError, LookupFailedError, RecordError, StoreFullError
from dht.lookup import Answer, LookupResult, iterative_lookup
from dht.membership import Federation, Identity, verify_member_certificate
from dht.protocol import DhtProtocol
from dht.records import (
    FLAG_TOMBSTONE,
    CertVerifier,
    Record,
    decode_record,
    derive_dht_key,
    encode_record,
    merge_records,
    seal_value,
    sign_record,
    unseal_value,
    verify_record,
)
from dht.storage import MAP_SIZE, LmdbRecordStore, MemoryRecordStore, OwnEntry, RecordStore

__all__ = ["DROP_REASONS", "Contact", "DhtNode", "Entry", "GetResult"]

DROP_REASONS = (  # why a datagram was dropped before parsing (dht/wire.py, dht/protocol.py)
    "dropped_oversized",
    "dropped_malformed",
    "dropped_bad_mac",
    "dropped_stale",
    "dropped_replay",
    "dropped_rate_limited",
)

log = logging.getLogger(__name__)
Addr = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Entry:
    """One publisher's verified, decrypted entry under a key."""

    publisher: bytes
    publisher_name: str
    seq: int
    expires_at: float
    value: bytes


@dataclass(frozen=True, slots=True)
class Contact:
    """A proven member in the routing table."""

    site_id: bytes
    host: str
    port: int
    name: str


@dataclass(frozen=True, slots=True)
class GetResult:
    """``get`` with the lookup's cost, for benchmarks and diagnostics."""

    entries: list[Entry]
    hops: int
    queried: int
    found_remote: bool


class DhtNode(Server):  # type: ignore[misc]  # kademlia is untyped
    """A DHT node; create it with ``await DhtNode.start(...)`` and close it with ``stop()``."""

    protocol_class = DhtProtocol

    def __init__(
        self,
        identity: Identity,
        federation: Federation,
        store: RecordStore,
        *,
        rpc_timeout: float,
        republish_interval: float,
        rate: tuple[float, float],
    ) -> None:
        super().__init__(ksize=K, alpha=ALPHA, node_id=identity.site_id, storage=store)
        self.storage: RecordStore = store
        self._identity = identity
        self._federation = federation
        self._verifier = CertVerifier(federation.ca_cert)
        self._stats: Counter[str] = Counter()
        self._rpc_timeout = rpc_timeout
        self._republish_interval = republish_interval
        self._rate = rate
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.protocol: DhtProtocol | None = None
        self._last_seq = int.from_bytes(store.get_meta("seq") or b"\0", "big")

    # ---- lifecycle --------------------------------------------------------------------------
    @classmethod
    async def start(
        cls,
        identity: Identity,
        federation: Federation,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_path: Path | None = None,
        capacity: int = MAP_SIZE,
        bootstrap: Sequence[Addr] = (),
        republish_interval: float = REPUBLISH_INTERVAL,
        rpc_timeout: float = 1.0,
        rate: tuple[float, float] = (RATE_PER_PEER, BURST_PER_PEER),
    ) -> DhtNode:
        """Listen on ``host:port`` (0 = any free port), then join via ``bootstrap`` and the
        contacts saved at the last stop. ``rate`` = (datagrams/s, burst) allowed per peer;
        ``capacity``: bytes the LMDB record store may use (full: stores are refused, counted as
        ``store_full``, and answered at once, never left to time out)."""
        try:
            own_id = verify_member_certificate(identity.certificate, federation.ca_cert)
        except RecordError as exc:
            raise LocalProtocolError(f"this site is not a member of the federation: {exc}") from exc
        if own_id != identity.site_id:
            raise LocalProtocolError("the site certificate does not match the site's private key")
        store: RecordStore = (
            MemoryRecordStore()
            if storage_path is None
            else LmdbRecordStore(Path(storage_path), capacity)
        )
        node = cls(
            identity,
            federation,
            store,
            rpc_timeout=rpc_timeout,
            republish_interval=republish_interval,
            rate=rate,
        )
        try:
            loop = asyncio.get_running_loop()
            try:
                node.transport, node.protocol = await loop.create_datagram_endpoint(
                    node._create_protocol, local_addr=(host, port)
                )
            except OSError as exc:
                raise LocalProtocolError(
                    f"cannot listen on UDP {host}:{port}: {exc}; pick another port or host"
                ) from exc
            node._runner = asyncio.create_task(node._run(), name=f"dht-{identity.name}")
            await asyncio.wait_for(node._started.wait(), 5.0)
            saved = node._saved_contacts()
            addrs = list(dict.fromkeys([(str(h), int(p)) for h, p in bootstrap] + saved))
            if addrs:
                await node._join(addrs)
        except BaseException:
            await node.stop()
            raise
        return node

    def _create_protocol(self) -> DhtProtocol:
        return DhtProtocol(
            self.node,
            self.storage,
            self.ksize,
            identity=self._identity,
            federation=self._federation,
            verifier=self._verifier,
            stats=self._stats,
            spawn=self._spawn,
            rpc_timeout=self._rpc_timeout,
            rate=self._rate,
        )

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._maint_task = self._spawn(self._maintenance())
            self._started.set()
            await self._stopping.wait()
            for task in list(self._tasks):
                task.cancel()
        self._tg = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Run ``coro`` in the node's task group; it is cancelled at ``stop``."""
        if self._tg is None or self._stopping.is_set():
            coro.close()
            return None
        task = self._tg.create_task(self._guarded(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            self._stats["task_errors"] += 1
            log.exception("DHT background task failed")

    async def stop(self) -> None:
        """Stop background work, save contacts, close the socket and the store."""
        if self._stopping.is_set() and self._runner is None:
            return
        self._stopping.set()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._runner, 5.0)
            self._runner = None
        try:
            if self.protocol is not None:
                self._save_contacts()
                self.protocol.close_pending()
            if self.transport is not None:
                self.transport.close()
        finally:
            self.storage.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def refresh_table(self, interval: float = 3600) -> None:
        """Disabled: kademlia's timer is fire-and-forget; ``_maintenance`` does this."""

    # kademlia entry points that would bypass signing, sealing or use pickle: closed off.
    def _unsupported(self, *args: object, **kwargs: object) -> Any:
        raise LocalProtocolError(
            "this kademlia method is disabled on DhtNode; use start/put/get/delete/stop"
        )

    listen = set = set_digest = save_state = save_state_regularly = bootstrap_node = _unsupported

    @classmethod
    async def load_state(cls, *args: object, **kwargs: object) -> Any:
        raise LocalProtocolError("load_state (pickle) is disabled; contacts persist in LMDB")

    # ---- properties -------------------------------------------------------------------------
    @property
    def _proto(self) -> DhtProtocol:
        if self.protocol is None or self._stopping.is_set():
            raise LocalProtocolError("the DHT node is not running; use `await DhtNode.start(...)`")
        return self.protocol

    @property
    def address(self) -> Addr:
        """The bound (host, port)."""
        if self.transport is None:
            raise LocalProtocolError("the DHT node is not listening")
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (str(host), int(port))

    @property
    def site_id(self) -> bytes:
        return bytes(self.node.id)

    def on_drop(self, observer: Callable[[str, Addr], None] | None) -> None:
        """Call ``observer(reason, sender)`` for each datagram dropped before parsing (one of
        ``DROP_REASONS``), on the event loop; it must not block."""
        self._proto.on_drop = observer

    @property
    def stats(self) -> dict[str, int]:
        """Counters: datagrams in/out, drops by reason (each present, 0 until the first),
        records stored/rejected, timeouts."""
        return {**dict.fromkeys(DROP_REASONS, 0), **self._stats}

    def contacts(self) -> list[Contact]:
        proto = self._proto
        out = []
        for bucket in proto.router.buckets:
            for n in bucket.get_nodes():
                out.append(Contact(n.id, n.ip, n.port, proto.names.get(n.id, "")))
        return out

    # ---- joining ----------------------------------------------------------------------------
    async def bootstrap(self, addrs: Sequence[Addr]) -> None:
        """Prove and add the members at ``addrs``, then look up our own ID to fill the table.

        Raises ``LookupFailedError`` if none of them answered as a federation member."""
        if not await self._join(list(addrs)):
            raise LookupFailedError(
                f"none of {len(addrs)} bootstrap addresses answered as a federation member; "
                "check the addresses and that they belong to this federation"
            )

    async def _resolve(self, addrs: Sequence[Addr]) -> list[Addr]:
        """Host names to addresses of our socket's family, so answers match their requests."""
        assert self.transport is not None
        family = self.transport.get_extra_info("socket").family
        loop = asyncio.get_running_loop()
        out: list[Addr] = []
        for host, port in addrs:
            try:
                infos = await loop.getaddrinfo(host, int(port), family=family, type=SOCK_DGRAM)
            except OSError:
                self._stats["resolve_failed"] += 1
                continue
            out.extend((str(info[4][0]), int(info[4][1])) for info in infos[:1])
        return out

    async def _join(self, addrs: list[Addr]) -> int:
        proto = self._proto
        addrs = await self._resolve(addrs)
        members = await asyncio.gather(*(proto.call_hello(a) for a in addrs))
        proven = sum(1 for m in members if m is not None and m.site_id != self.site_id)
        if proven:
            await self._lookup(self.site_id, want_values=False)
            await self._settle()
        return proven

    async def _settle(self) -> None:
        """Wait (bounded) for the identity checks of contacts the last lookup found."""
        tasks = [t for t in self._tasks if not t.done() and t is not self._maint_task]
        if tasks:
            await asyncio.wait(tasks, timeout=2 * self._rpc_timeout)

    _maint_task: asyncio.Task[None] | None = None

    async def ping(self, addr: Addr) -> bytes | None:
        """The proven site_id of the member at ``addr``, or None if nothing answered as one."""
        resolved = await self._resolve([addr])
        if not resolved:
            return None
        member = await self._proto.call_hello(resolved[0])
        return None if member is None else member.site_id

    # ---- lookups ----------------------------------------------------------------------------
    async def _lookup(self, key: bytes, want_values: bool) -> LookupResult:
        proto = self._proto
        seeds = proto.router.find_neighbors(Node(key), k=K)

        async def query(node: Node) -> Answer | None:
            return await proto.call_find(node, key, want_values)

        return await iterative_lookup(
            key, seeds=seeds, query=query, self_id=self.site_id, k=K, alpha=ALPHA
        )

    def _has_peers(self) -> bool:
        return any(len(b) for b in self._proto.router.buckets)

    # ---- records ----------------------------------------------------------------------------
    def _next_seq(self) -> int:
        """Monotonic across restarts: at least the wall clock in ns, above the persisted last."""
        self._last_seq = max(time.time_ns(), self._last_seq + 1)
        self.storage.set_meta("seq", self._last_seq.to_bytes(8, "big"))
        return self._last_seq

    def _sign(self, dkey: bytes, sealed: bytes, ttl: float, flags: int) -> Record:
        now = time.time()
        return sign_record(
            key=self._identity.key,
            cert=self._identity.certificate,
            publisher=self.site_id,
            dht_key=dkey,
            seq=self._next_seq(),
            expires_ms=int((now + ttl) * 1000),
            sealed=sealed,
            flags=flags,
        )

    async def put(self, namespace: str, key: str, value: bytes, ttl: float) -> int:
        """Publish our entry under (namespace, key); return how many nodes stored it (with us).

        Raises ``LookupFailedError`` if peers are known but none of them stored it."""
        if not 0 < ttl <= MAX_TTL:
            raise LocalProtocolError(f"ttl must be between 0 and {MAX_TTL:.0f} seconds")
        dkey = derive_dht_key(self._federation.key_hash_key, namespace, key)
        sealed = seal_value(self._federation.seal_key, dkey, value)
        record = self._sign(dkey, sealed, ttl, 0)
        self.storage.put_own(OwnEntry(dkey, sealed, ttl, 0, record.expires_ms))
        return await self._publish(record)

    async def delete(self, namespace: str, key: str) -> int:
        """Withdraw our entry: publish a tombstone with a higher seq that outlives the entry."""
        dkey = derive_dht_key(self._federation.key_hash_key, namespace, key)
        own = {e.dht_key: e for e in self.storage.own_entries()}.get(dkey)
        remaining = (own.expires_ms / 1000 - time.time()) if own else 0.0
        ttl = max(remaining, 60.0)
        sealed = seal_value(self._federation.seal_key, dkey, b"")
        record = self._sign(dkey, sealed, ttl, FLAG_TOMBSTONE)
        self.storage.put_own(OwnEntry(dkey, sealed, ttl, FLAG_TOMBSTONE, record.expires_ms))
        return await self._publish(record)

    async def _publish(self, record: Record) -> int:
        proto = self._proto
        raw = encode_record(record)
        try:
            self.storage.put(record, time.time())
        except StoreFullError:  # the k closest nodes still get it; our own entry is kept apart
            self._stats["store_full"] += 1
        if not self._has_peers():
            return 1
        result = await self._lookup(record.dht_key, want_values=False)
        targets = result.closest[:K]
        acks = await asyncio.gather(*(proto.call_store(n, raw) for n in targets))
        stored = sum(ack is True for ack in acks)
        if stored == 0:
            refused = sum(ack is False for ack in acks)
            if refused:
                raise LookupFailedError(
                    f"{refused} of {len(targets)} peers refused the record: their DHT stores "
                    "are full (they count store_full); raise their dht_capacity"
                )
            raise LookupFailedError(
                f"no peer stored the record ({len(targets)} asked); the node's contacts may be "
                "down, bootstrap again"
            )
        return stored + 1

    async def get(self, namespace: str, key: str) -> list[Entry]:
        """Verified, decrypted entries (one per publisher) from the k closest answering nodes."""
        return (await self.get_detailed(namespace, key)).entries

    async def get_detailed(self, namespace: str, key: str) -> GetResult:
        dkey = derive_dht_key(self._federation.key_hash_key, namespace, key)
        now = time.time()
        records = self.storage.records(dkey, now)
        hops = queried = 0
        found_remote = False
        if self._has_peers():
            started = time.monotonic()
            self._stats["lookups"] += 1
            try:
                result = await self._lookup(dkey, want_values=True)
            except BaseException:
                self._stats["lookups_failed"] += 1
                raise
            finally:
                # microseconds: a loopback lookup can take under 0.5 ms, which rounds to 0 ms
                self._stats["lookup_us"] += round(1e6 * (time.monotonic() - started))
            hops, queried = result.hops, result.queried
            verified = []
            for raw in dict.fromkeys(result.records):
                try:
                    record = decode_record(raw)
                    if record.dht_key != dkey:
                        raise RecordError("record answered for another key")
                    verify_record(record, self._verifier, now)
                except RecordError:
                    self._stats["records_rejected"] += 1
                    continue
                verified.append(record)
            found_remote = bool(verified)
            records = merge_records(records, verified, now)
        entries = []
        for record in records:
            if record.is_tombstone:
                continue
            try:
                value = unseal_value(self._federation.seal_key, dkey, record.sealed)
                member = self._verifier.verify(record.cert_der, now)
            except RecordError:
                self._stats["records_rejected"] += 1
                continue
            entries.append(
                Entry(record.publisher, member.name, record.seq, record.expires_at, value)
            )
        return GetResult(entries, hops, queried, found_remote)

    def own_record(self, namespace: str, key: str) -> bytes | None:
        """Our latest signed record under (namespace, key), encoded as on the wire; members keep
        a copy of it (``open_record``) so it outlives its expiry on the DHT."""
        dkey = derive_dht_key(self._federation.key_hash_key, namespace, key)
        for record in self.storage.records(dkey, time.time()):
            if record.publisher == self.site_id:
                return encode_record(record)
        return None

    def open_record(
        self, namespace: str, key: str, raw: bytes, *, allow_expired: bool = False
    ) -> Entry:
        """Verify and unseal a record received outside the DHT (from a member's copy).

        Raises ``RecordError`` unless it is a member's signed record for exactly this key."""
        dkey = derive_dht_key(self._federation.key_hash_key, namespace, key)
        now = time.time()
        record = decode_record(raw)
        if record.dht_key != dkey or record.is_tombstone:
            raise RecordError("record is for another key, or withdrawn")
        member = verify_record(record, self._verifier, now, allow_expired=allow_expired)
        value = unseal_value(self._federation.seal_key, dkey, record.sealed)
        return Entry(record.publisher, member.name, record.seq, record.expires_at, value)

    # ---- maintenance ------------------------------------------------------------------------
    async def _maintenance(self) -> None:
        """Republish own entries, cull expired records, refresh buckets, save contacts."""
        tick = min(self._republish_interval, 60.0)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), tick)
            if self._stopping.is_set():
                return
            try:
                await self.republish()
                self.storage.cull(time.time())
                await self._refresh()
                self._save_contacts()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._stats["maintenance_errors"] += 1
                log.exception("DHT maintenance round failed; retrying next round")

    async def republish(self, force: bool = False) -> int:
        """Re-sign (new seq, new expiry) and re-store own entries due for it; return how many.

        An entry is due ``republish_interval`` after it was last published, or when a quarter of
        its lifetime remains (so a TTL shorter than the interval still never lapses)."""
        now = time.time()
        done = 0
        for own in self.storage.own_entries():
            expires = own.expires_ms / 1000
            if own.flags & FLAG_TOMBSTONE:
                if expires <= now:
                    self.storage.drop_own(own.dht_key)
                    continue
                record_ttl = expires - now
            else:
                record_ttl = own.ttl
            published = expires - own.ttl
            due = force or now - published >= self._republish_interval
            due = due or expires - now <= max(own.ttl / 4, 2 * min(self._republish_interval, 60))
            if not due:
                continue
            record = self._sign(own.dht_key, own.sealed, record_ttl, own.flags)
            self.storage.put_own(
                OwnEntry(own.dht_key, own.sealed, own.ttl, own.flags, record.expires_ms)
            )
            try:
                await self._publish(record)
                done += 1
            except LookupFailedError:
                self._stats["republish_failed"] += 1
        self._stats["republished"] += done
        return done

    async def _refresh(self) -> None:
        """Look up a random ID in each bucket untouched for an hour (paper section 2.3)."""
        for rid in self._proto.get_refresh_ids()[:8]:
            await self._lookup(rid, want_values=False)
        if not self._has_peers():
            saved = self._saved_contacts()
            if saved:
                await self._join(saved)

    def _save_contacts(self) -> None:
        nodes = [n for b in self._proto_or_none_buckets() for n in b.get_nodes()]
        if nodes:
            packed = msgpack.packb([[n.id, n.ip, n.port] for n in nodes], use_bin_type=True)
            self.storage.set_meta("contacts", packed)

    def _proto_or_none_buckets(self) -> list[Any]:
        return [] if self.protocol is None else list(self.protocol.router.buckets)

    def _saved_contacts(self) -> list[Addr]:
        raw = self.storage.get_meta("contacts")
        if not raw:
            return []
        try:
            items = msgpack.unpackb(raw, raw=False)
            addrs = [
                (str(h), int(p))
                for i, h, p in items
                if isinstance(i, bytes) and len(i) == ID_SIZE and i != self.site_id
            ]
        except (ValueError, TypeError):
            return []
        random.shuffle(addrs)
        return addrs[: 2 * K]
