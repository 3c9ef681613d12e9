"""Site events: what happened, for the observers (metrics, audit trail) that must not slow it.

The parts that do the work emit small frozen records on the site's ``EventBus``; observers
subscribe. Emitting never raises and never blocks the caller: an observer that fails is logged
(rate-limited) and skipped, and observers only count or enqueue. Events may be emitted from
pynetdicom's association threads, the asyncio loop or the write thread.

Patient and study identifiers travel in events because the audit trail must name them
(PS3.15 A.5); observers that export labels (metrics) must never use them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "AssociationEvent",
    "DicomRequest",
    "Event",
    "EventBus",
    "Lifecycle",
    "PeerTransfer",
    "SecurityAlert",
    "TransferBegun",
    "UserAuthentication",
    "alert_limiter",
    "bad_mac_alerts",
]

log = logging.getLogger(__name__)

ERROR_LOG_INTERVAL = 60.0  # seconds between log lines about one failing observer


@dataclass(frozen=True, slots=True)
class DicomRequest:
    """One DIMSE request answered by the gateway, with the status it was answered with."""

    service: str  # "C-ECHO", "C-STORE", "C-FIND", "C-MOVE", "C-GET", "N-ACTION"
    status: int  # the final status sent
    seconds: float  # from the request to the final answer
    calling_ae: str
    address: str  # the requestor's host
    study_uids: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    sop_class_uid: str = ""
    sop_uids: tuple[str, ...] = ()  # C-STORE: the instance stored
    bytes: int = 0  # C-STORE: dataset bytes received
    completed: int = 0  # C-STORE: 1 when stored; C-MOVE/C-GET: sub-operations completed
    failed: int = 0  # C-MOVE/C-GET: sub-operations failed
    warning: int = 0  # C-MOVE/C-GET: sub-operations with a warning
    destination: str = ""  # C-MOVE: the move destination AE title
    level: str = ""  # C-FIND/C-MOVE/C-GET: QueryRetrieveLevel
    query: tuple[tuple[str, str], ...] = ()  # C-FIND/C-MOVE/C-GET: the identifier's keys


@dataclass(frozen=True, slots=True)
class AssociationEvent:
    """A DICOM association was established (``opened``) or ended."""

    opened: bool
    calling_ae: str
    address: str


@dataclass(frozen=True, slots=True)
class PeerTransfer:
    """Instance bytes moved between this site and a member (replication, recovery, read-through)."""

    direction: str  # "in" (fetched from the peer) or "out" (served to it)
    peer: str  # the member's site name
    bytes: int
    purpose: str = ""  # "fetch" or "serve"
    study_uid: str = ""


@dataclass(frozen=True, slots=True)
class SecurityAlert:
    """Something a member would not do: a refused non-member, a bad MAC, a tampered blob."""

    kind: str  # "tls-refused", "bad-mac", "tampered-blob", "auth-failed"
    peer: str  # address or site name, as known
    detail: str


@dataclass(frozen=True, slots=True)
class TransferBegun:
    """A C-MOVE or C-GET starts sending instances (PS3.15 A.5.3.3 Begin Transferring)."""

    service: str  # "C-MOVE" or "C-GET"
    calling_ae: str
    address: str  # the requestor's host
    destination: str = ""  # C-MOVE: the move destination AE title
    level: str = ""
    study_uids: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UserAuthentication:
    """A person logged in (or failed to) at the web interface (PS3.15 A.5.3.13)."""

    user: str
    address: str  # the client's host
    success: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """The site started or stopped."""

    what: str  # "start" or "stop"
    site: str


Event = (
    DicomRequest
    | AssociationEvent
    | PeerTransfer
    | SecurityAlert
    | Lifecycle
    | TransferBegun
    | UserAuthentication
)
Observer = Callable[[Event], None]


class EventBus:
    """One per site; thread-safe. ``emit`` calls every observer in the caller's thread."""

    def __init__(self) -> None:
        self._observers: tuple[Observer, ...] = ()
        self._lock = threading.Lock()
        self._last_error: dict[int, float] = {}

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Add an observer; the returned function removes it."""
        with self._lock:
            self._observers = (*self._observers, observer)

        def unsubscribe() -> None:
            with self._lock:
                self._observers = tuple(o for o in self._observers if o is not observer)

        return unsubscribe

    def emit(self, event: Event) -> None:
        for observer in self._observers:  # a tuple: subscribing meanwhile never breaks this
            try:
                observer(event)
            except Exception:  # an observer never fails the work that emitted the event
                now = time.monotonic()
                key = id(observer)
                if now - self._last_error.get(key, 0.0) >= ERROR_LOG_INTERVAL:
                    self._last_error[key] = now
                    log.exception("event observer %r failed", observer)


ALERT_INTERVAL = 60.0  # seconds between two alerts of one kind about one peer (a flood of bad
# datagrams must not flood the audit trail; the next alert counts what was held back)


def alert_limiter(
    bus: EventBus, kind: str, *, interval: float = ALERT_INTERVAL
) -> Callable[[str, str], None]:
    """A ``(peer, detail)`` callback emitting ``SecurityAlert(kind, ...)`` at most once per
    ``interval`` per peer; the alerts held back meanwhile are counted into the next one.
    For emitters a peer can trigger at will (datagrams with a bad MAC)."""
    lock = threading.Lock()
    last: dict[str, float] = {}
    held: dict[str, int] = {}

    def alert(peer: str, detail: str) -> None:
        now = time.monotonic()
        with lock:
            if now - last.get(peer, -interval) < interval:
                held[peer] = held.get(peer, 0) + 1
                return
            if len(last) > 4096:  # forget quiet peers; bounded memory against spoofed sources
                last.clear()
            last[peer] = now
            more = held.pop(peer, 0)
        if more:
            detail = f"{detail} ({more} more since the last alert)"
        bus.emit(SecurityAlert(kind, peer, detail))

    return alert


def bad_mac_alerts(bus: EventBus) -> Callable[[str, tuple[str, int]], None]:
    """A DHT ``on_drop`` observer: datagrams failing their MAC come from outside the federation
    (another federation's secret, or none): one ``SecurityAlert("bad-mac")`` per sender and
    minute. Other drops (stale, replayed, rate-limited) are counted by the DHT, not alerted."""
    alert = alert_limiter(bus, "bad-mac")

    def dropped(reason: str, addr: tuple[str, int]) -> None:
        if reason == "dropped_bad_mac":
            alert(f"{addr[0]}:{addr[1]}", "DHT datagram dropped: bad MAC (not a federation member)")

    return dropped
