"""The Kademlia protocol with authenticated datagrams, proven node IDs and multi-value records.

Subclasses kademlia's ``KademliaProtocol`` and keeps its routing table, but replaces the receive
path and the RPC layer of ``rpcudp``: every datagram is checked (size, MAC, timestamp, replay,
rate) before msgpack sees it, handlers run synchronously and never let an exception out, only
the RPCs listed in ``_HANDLERS`` are callable, and a contact enters the routing table only after
it proved its node ID with a signed ``hello`` (a CA-issued certificate whose key hashes to it).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable

from dht.const import (
    HELLO_CONCURRENCY,
    ID_SIZE,
    LOG_EVERY,
    MAX_RESPONSE_RECORDS_BYTES,
    SILENT_FOR,
    SILENT_MAX,
    K,
)
from dht.errors import DhtError, LocalProtocolError, RecordError, StoreFullError
from dht.lookup import Answer
from dht.membership import Federation, Identity
from dht.records import CertVerifier, Member, decode_record, encode_record, verify_record
from dht.storage import RecordStore
from dht.wire import (
    KIND_REQUEST,
    KIND_RESPONSE,
    DroppedDatagram,
    ReplayGuard,
    TokenBuckets,
    encode_datagram,
    open_datagram,
    parse_payload,
)

__all__ = ["DhtProtocol"]

log = logging.getLogger(__name__)

_HELLO_CONTEXT = b"p2pacs-dht-hello-v1\x00"  # domain separation for identity proofs
Addr = tuple[str, int]
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None] | None"]


class _QuietLog:
    """Warnings a peer can trigger, at most one per key every LOG_EVERY seconds (zeroconf)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -LOG_EVERY) >= LOG_EVERY:
            self._last[key] = now
            log.warning(msg, *args)


def _hello_bytes(nonce: bytes, requester: bytes, responder: bytes) -> bytes:
    return _HELLO_CONTEXT + nonce + requester + responder


def _valid_contact(item: Any) -> Node | None:
    """A contact from a peer's answer, or None if it is malformed (kademlia would crash)."""
    if not isinstance(item, list) or len(item) != 3:
        return None
    node_id, host, port = item
    if not (
        isinstance(node_id, bytes)
        and len(node_id) == ID_SIZE
        and isinstance(host, str)
        and 0 < len(host) <= 64
        and type(port) is int
        and 0 < port < 65536
    ):
        return None
    return Node(node_id, host, port)


class DhtRoutingTable(RoutingTable):  # type: ignore[misc]  # kademlia is untyped
    """kademlia's table, but the ping of a full bucket's head runs in the node's task group
    instead of kademlia's fire-and-forget ``ensure_future``."""

    def __init__(self, protocol: DhtProtocol, ksize: int, node: Node) -> None:
        super().__init__(protocol, ksize, node)
        self._protocol = protocol

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        # Paper section 4.2: split if the bucket covers our own ID or its depth is not 0 mod 5.
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self._protocol.spawn_ping(bucket.head())

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        """The k closest contacts to ``node``. kademlia's ``TableTraverser`` stops once the
        buckets on one side run out and can return nothing while contacts exist (seen at 1,000
        nodes), so this scans every bucket; a table holds at most a few hundred contacts."""
        index = self.get_bucket_for(node)
        if index is not None:
            self.buckets[index].touch_last_updated()
        candidates = (
            n
            for bucket in self.buckets
            for n in bucket.nodes.values()
            if n.id != node.id and (exclude is None or not n.same_home_as(exclude))
        )
        return heapq.nsmallest(k or self.ksize, candidates, key=node.distance_to)


class DhtProtocol(KademliaProtocol):  # type: ignore[misc]  # kademlia is untyped
    """One node's UDP endpoint; built by ``DhtNode`` through kademlia's ``protocol_class`` seam."""

    def __init__(
        self,
        source_node: Node,
        storage: RecordStore,
        ksize: int,
        *,
        identity: Identity,
        federation: Federation,
        verifier: CertVerifier,
        stats: Counter[str],
        spawn: Spawn,
        rpc_timeout: float,
        rate: tuple[float, float],
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self.router = DhtRoutingTable(self, ksize, source_node)
        self.storage: RecordStore = storage
        self._identity = identity
        self._cert_der = identity.certificate.public_bytes(serialization.Encoding.DER)
        self._mac_key = federation.mac_key
        self._verifier = verifier
        self.stats = stats
        self._spawn = spawn
        self._wait_timeout = rpc_timeout
        self._replay = ReplayGuard()
        self._buckets = TokenBuckets(rate=rate[0], burst=rate[1])
        self._pending: dict[bytes, tuple[asyncio.Future[Any], Addr]] = {}
        self._hello_pending: set[Addr] = set()
        self._silent: dict[Addr, float] = {}  # address -> monotonic time its RPC timed out
        self._ping_pending: set[bytes] = set()
        self._hello_slots = asyncio.Semaphore(HELLO_CONCURRENCY)
        self.proven: dict[bytes, Addr] = {}  # site_id -> address it proved itself from
        self.names: dict[bytes, str] = {}
        self._quiet = _QuietLog()
        # told of every datagram dropped before parsing (reason, sender): the site's audit trail
        self.on_drop: Callable[[str, Addr], None] | None = None
        self._handlers: dict[str, Callable[[Addr, bytes, list[Any]], Any]] = {
            "hello": self.rpc_hello,
            "ping": self.rpc_ping,
            "find_node": self.rpc_find_node,
            "find_value": self.rpc_find_value,
            "store": self.rpc_store,
        }

    def __getattr__(self, name: str) -> Any:
        # rpcudp turns any unknown attribute into a remote call; a typo must fail loudly instead.
        raise AttributeError(name)

    # ---- receive path ---------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Addr) -> None:
        """Checks before parsing; nothing raised here can escape into the event loop."""
        self.stats["datagrams_in"] += 1
        try:
            addr = (str(addr[0]), int(addr[1]))  # IPv6 sockets add flowinfo and scope id
            now = time.time()
            frame = open_datagram(self._mac_key, data, now)
            self._replay.check(frame.tag, now)
            self._buckets.check(addr, now)
            obj = parse_payload(frame.payload)
            self._silent.pop(addr, None)  # it speaks again: ask it again
            if frame.kind == KIND_REQUEST:
                self._accept_request(frame.msg_id, obj, addr)
            else:
                self._accept_response(frame.msg_id, obj, addr)
        except DroppedDatagram as exc:
            self.stats[exc.reason] += 1
            if self.on_drop is not None:
                try:
                    self.on_drop(exc.reason, addr)
                except Exception:  # an observer's fault never reaches the event loop
                    log.debug("on_drop observer failed", exc_info=True)
            self._quiet.warning(exc.reason, "dropped a datagram from %s: %s", addr, exc.reason)
        except Exception:
            self.stats["handler_errors"] += 1
            self._quiet.warning("handler", "error handling a datagram from %s", addr)
            log.debug("handler error", exc_info=True)

    def error_received(self, exc: Exception) -> None:
        self.stats["socket_errors"] += 1

    def _accept_request(self, msg_id: bytes, obj: Any, addr: Addr) -> None:
        if not (
            isinstance(obj, list)
            and len(obj) == 3
            and isinstance(obj[0], str)
            and isinstance(obj[1], bytes)
            and len(obj[1]) == ID_SIZE
            and isinstance(obj[2], list)
        ):
            raise DroppedDatagram("dropped_malformed")
        method, sender_id, args = obj
        handler = self._handlers.get(method)
        if handler is None:
            raise DroppedDatagram("dropped_malformed")
        self.stats[f"rpc_{method}"] += 1
        try:
            result = handler(addr, sender_id, args)
        except (DhtError, TypeError, ValueError) as exc:
            self.stats["rpc_errors"] += 1
            self._quiet.warning("rpc", "rejected %s from %s: %s", method, addr, exc)
            result = None
        self._send(addr, KIND_RESPONSE, msg_id, result)
        self._consider(Node(sender_id, addr[0], addr[1]))

    def _accept_response(self, msg_id: bytes, obj: Any, addr: Addr) -> None:
        waiting = self._pending.get(msg_id)
        if waiting is None or waiting[1] != addr:
            self.stats["responses_unexpected"] += 1
            return
        future, _ = self._pending.pop(msg_id)
        if not future.done():
            future.set_result(obj)

    # ---- send path ------------------------------------------------------------------------
    def _send(self, addr: Addr, kind: int, msg_id: bytes, obj: Any) -> None:
        data = encode_datagram(self._mac_key, kind, msg_id, int(time.time() * 1000), obj)
        if self.transport is None:
            raise LocalProtocolError("the node is not listening; start it first")
        self.transport.sendto(data, addr)
        self.stats["datagrams_out"] += 1

    async def _call(self, addr: Addr, method: str, args: list[Any]) -> Any:
        """One RPC; returns the answer or None after ``rpc_timeout`` (counted, never raised)."""
        msg_id = os.urandom(8)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = (future, addr)
        try:
            self._send(addr, KIND_REQUEST, msg_id, [method, self.source_node.id, args])
            return await asyncio.wait_for(future, self._wait_timeout)
        except TimeoutError:
            self.stats["rpc_timeouts"] += 1
            return None
        except OSError:
            self.stats["socket_errors"] += 1
            return None
        finally:
            self._pending.pop(msg_id, None)

    async def _call_node(self, node: Node, method: str, args: list[Any]) -> Any:
        """An RPC to a contact; a silent contact leaves the routing table (paper section 2.2).

        Other nodes keep handing out a dead contact until they too notice; without a memory of
        silence, every lookup in a small federation would wait one RPC timeout for it."""
        addr = (node.ip, node.port)
        silent_since = self._silent.get(addr)
        if silent_since is not None and time.monotonic() - silent_since < SILENT_FOR:
            self.stats["rpc_skipped_silent"] += 1
            self.router.remove_contact(node)
            return None
        answer = await self._call(addr, method, args)
        if answer is None:
            if len(self._silent) >= SILENT_MAX:
                self._silent.pop(next(iter(self._silent)))
            self._silent[addr] = time.monotonic()
            self.router.remove_contact(node)
        else:
            self._consider(node)
        return answer

    # ---- identity proof -------------------------------------------------------------------
    async def call_hello(self, addr: Addr) -> Member | None:
        """Ask whoever is at ``addr`` to prove its identity; add it to the table if it does."""
        nonce = os.urandom(16)
        answer = await self._call(addr, "hello", [nonce])
        if answer is None:
            return None
        try:
            if not (isinstance(answer, list) and len(answer) == 2):
                raise RecordError("hello answer has the wrong shape")
            cert_der, signature = answer
            if not isinstance(cert_der, bytes) or not isinstance(signature, bytes):
                raise RecordError("hello answer has the wrong types")
            member = self._verifier.verify(cert_der, time.time())
            member.public_key.verify(
                signature, _hello_bytes(nonce, self.source_node.id, member.site_id)
            )
        except (RecordError, InvalidSignature):
            self.stats["hello_rejected"] += 1
            self._quiet.warning("hello", "%s failed to prove a federation identity", addr)
            return None
        if member.site_id == self.source_node.id:
            return member
        self.proven[member.site_id] = addr
        self.names[member.site_id] = member.name
        self.router.add_contact(Node(member.site_id, addr[0], addr[1]))
        self.stats["contacts_proven"] += 1
        return member

    def rpc_hello(self, addr: Addr, sender_id: bytes, args: list[Any]) -> list[bytes]:
        (nonce,) = args
        if not isinstance(nonce, bytes) or len(nonce) != 16:
            raise RecordError("hello nonce must be 16 bytes")
        sig = self._identity.key.sign(_hello_bytes(nonce, sender_id, self.source_node.id))
        return [self._cert_der, sig]

    def _consider(self, node: Node) -> None:
        """Refresh a proven contact, or prove a new one in the background (never trust a claim)."""
        if node.id == self.source_node.id:
            return
        addr = (node.ip, node.port)
        if self.proven.get(node.id) == addr:
            self.router.add_contact(node)
        elif addr not in self._hello_pending and len(self._hello_pending) < 4 * HELLO_CONCURRENCY:
            self._hello_pending.add(addr)
            self._spawn(self._hello_task(addr))

    async def _hello_task(self, addr: Addr) -> None:
        try:
            async with self._hello_slots:
                await self.call_hello(addr)
        finally:
            self._hello_pending.discard(addr)

    def welcome_if_new(self, node: Node) -> None:
        """Unlike kademlia: never push stored values to a new contact (that was a 196x amplifier
        and handed values to the wrong nodes); only proven contacts enter the table."""
        self._consider(node)

    def handle_call_response(self, result: Any, node: Node) -> Any:
        return result

    # ---- RPCs -----------------------------------------------------------------------------
    def rpc_ping(self, addr: Addr, sender_id: bytes, args: list[Any]) -> bytes:
        return bytes(self.source_node.id)

    def spawn_ping(self, node: Node) -> None:
        """Check a full bucket's least-recently seen contact; a silent one is replaced."""
        if node.id not in self._ping_pending:
            self._ping_pending.add(node.id)
            self._spawn(self._ping_task(node))

    async def _ping_task(self, node: Node) -> None:
        try:
            await self.call_ping(node)
        finally:
            self._ping_pending.discard(node.id)

    async def call_ping(self, node: Node) -> bytes | None:
        """Used by kademlia's routing table to check a bucket's head before evicting it."""
        answer = await self._call_node(node, "ping", [])
        return answer if isinstance(answer, bytes) else None

    def _neighbors(self, key: bytes, addr: Addr) -> list[list[Any]]:
        exclude = Node(bytes(ID_SIZE), addr[0], addr[1])
        found = self.router.find_neighbors(Node(key), k=K, exclude=exclude)
        return [[n.id, n.ip, n.port] for n in found]

    def rpc_find_node(self, addr: Addr, sender_id: bytes, args: list[Any]) -> list[list[Any]]:
        (key,) = args
        if not isinstance(key, bytes) or len(key) != ID_SIZE:
            raise RecordError("find_node key must be 20 bytes")
        return self._neighbors(key, addr)

    def rpc_find_value(self, addr: Addr, sender_id: bytes, args: list[Any]) -> list[Any]:
        """Records held under the key (as many as fit one datagram) and the closest contacts."""
        (key,) = args
        if not isinstance(key, bytes) or len(key) != ID_SIZE:
            raise RecordError("find_value key must be 20 bytes")
        packed: list[bytes] = []
        size = 0
        for record in self.storage.records(key, time.time()):
            raw = encode_record(record)
            if size + len(raw) > MAX_RESPONSE_RECORDS_BYTES:
                self.stats["records_truncated"] += 1
                break
            packed.append(raw)
            size += len(raw)
        return [packed, self._neighbors(key, addr)]

    def rpc_store(self, addr: Addr, sender_id: bytes, args: list[Any]) -> bool:
        """Verify (CA, publisher == certificate, signature, expiry), then merge per publisher."""
        (raw,) = args
        if not isinstance(raw, bytes):
            raise RecordError("store argument must be an encoded record")
        return self.accept_record(raw, time.time())

    def accept_record(self, raw: bytes, now: float) -> bool:
        """Verify and store one record; a bad one is counted and refused (RecordError)."""
        try:
            record = decode_record(raw)
            verify_record(record, self._verifier, now)
        except RecordError:
            self.stats["records_rejected"] += 1
            raise
        try:
            stored = self.storage.put(record, now)
        except StoreFullError:
            self.stats["store_full"] += 1  # answered "not stored", never left to time out
            self._quiet.warning("store_full", "DHT record store full: refusing records")
            return False
        if stored:
            self.stats["records_stored"] += 1
        return True

    async def call_find(self, node: Node, key: bytes, want_values: bool) -> Answer | None:
        """find_node or find_value; the answer is shape-checked, bad contacts are dropped."""
        answer = await self._call_node(node, "find_value" if want_values else "find_node", [key])
        if answer is None:
            return None
        records: list[bytes] = []
        contacts: Any = answer
        if want_values:
            if not (isinstance(answer, list) and len(answer) == 2 and isinstance(answer[0], list)):
                self.stats["answers_malformed"] += 1
                return Answer([])
            records = [r for r in answer[0] if isinstance(r, bytes)]
            contacts = answer[1]
        if not isinstance(contacts, list):
            self.stats["answers_malformed"] += 1
            return Answer([], records)
        nodes = [n for n in map(_valid_contact, contacts[: 2 * K]) if n is not None]
        if len(nodes) != len(contacts[: 2 * K]):
            self.stats["contacts_malformed"] += 1
        return Answer(nodes, records)

    async def call_store(self, node: Node, raw: bytes) -> bool | None:
        """True: stored; False: the node answered but refused it (full store); None: no
        answer."""
        answer = await self._call_node(node, "store", [raw])
        return None if answer is None else answer is True

    def close_pending(self) -> None:
        for future, _ in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
