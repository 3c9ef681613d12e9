"""The last few failures the site's event bus told of, for the status page.

A bounded ring (``KEEP`` entries), filled from any thread: DIMSE requests answered with a
failure status and security alerts. What is kept is what an on-call person needs to start
looking (when, which service, which status, which calling AE or peer), never a patient's or a
study's identifiers: the page is not the audit trail.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from p2pacs.events import DicomRequest, Event, EventBus, SecurityAlert
from p2pacs.web.metrics import status_class

__all__ = ["Failure", "RecentFailures"]

KEEP = 20  # failures shown on the page


@dataclass(frozen=True, slots=True)
class Failure:
    time: float  # Unix time
    what: str  # "C-STORE 0xA700", "auth-failed"
    who: str  # calling AE and address, or the peer
    detail: str = ""


class RecentFailures:
    def __init__(self, events: EventBus, keep: int = KEEP):
        self._items: deque[Failure] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._unsubscribe = events.subscribe(self._on)

    def _on(self, event: Event) -> None:
        if isinstance(event, DicomRequest):
            if status_class(event.status) != "failure":
                return
            failure = Failure(
                time.time(),
                f"{event.service} 0x{event.status:04X}",
                f"{event.calling_ae} at {event.address}",
                f"{event.failed} sub-operations failed" if event.failed else "",
            )
        elif isinstance(event, SecurityAlert):
            failure = Failure(time.time(), event.kind, event.peer, event.detail[:200])
        else:
            return
        with self._lock:
            self._items.append(failure)

    def latest(self) -> list[Failure]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._items))

    def close(self) -> None:
        self._unsubscribe()
