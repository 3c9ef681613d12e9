"""The audit trail: site events to DICOM audit messages, logged locally and sent to repositories.

``observe`` is the bus observer: it stamps the event with the time and puts it on a bounded
in-memory queue without waiting, so auditing never blocks or fails a DICOM operation (a full
queue drops the event and counts it; the log says so). One background thread does the rest:
builds the messages, appends them to the local log (fsync'd: they survive a crash from then on)
and delivers the log to each repository from its own persistent cursor, retrying with backoff
while a repository is down. Delivery follows the log, never the queue, so nothing queued while
a repository is down is lost, and a restart resumes at the saved cursor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from p2pacs.audit.log import AuditLog, Cursor
from p2pacs.audit.syslog import (
    Repository,
    TlsSender,
    UdpSender,
    frame,
    parse_repository,
    tls_context,
)
from p2pacs.audit.translate import Local, StudyLookup, translate
from p2pacs.errors import AuditError
from p2pacs.events import Event

__all__ = ["AuditTrail", "TrailSettings"]

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000  # events waiting for the audit thread (~1 min of C-STOREs at full speed)
BATCH = 500  # events turned into messages and fsync'd together
SEND_BATCH = 200  # records written to a repository at a time (cursor saved after each)
RETRY_FIRST = 1.0  # seconds before trying a repository that failed again
RETRY_MAX = 30.0  # seconds: the longest wait between tries
DROP_LOG_INTERVAL = 60.0  # seconds between log lines about a full queue


_Item = tuple[float, Event] | threading.Event | None  # an event, a flush marker, or stop
_TIMEOUT = threading.Event()  # stands for "nothing arrived": retry the repositories


class Sender(Protocol):
    def send(self, frames: list[bytes]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class TrailSettings:
    """What the trail needs from ``[audit]`` (``p2pacs.config.AuditConfig``), resolved."""

    log_dir: Path
    max_bytes: int
    keep: int = 0
    repositories: tuple[str, ...] = ()
    ca_file: Path | None = None
    client_cert: tuple[Path, Path] | None = None  # (certificate, key): the site's own


@dataclass(slots=True)
class _Repo:
    repo: Repository
    sender: Sender
    cursor: Cursor
    retry_at: float = 0.0
    backoff: float = RETRY_FIRST
    failures: int = 0
    last_error: str = ""


@dataclass(slots=True)
class _Stats:
    events: int = 0
    messages: int = 0
    dropped: int = 0
    sent: dict[str, int] = field(default_factory=dict)


class AuditTrail:
    """Start with ``start()``, subscribe ``observe`` to the site's bus, ``stop()`` at the end."""

    def __init__(self, settings: TrailSettings, local: Local, lookup: StudyLookup | None = None):
        self.settings = settings
        self.local = local
        self.lookup = lookup
        self._queue: queue.Queue[_Item] = queue.Queue(QUEUE_SIZE)
        self._log: AuditLog | None = None
        self._repos: list[_Repo] = []
        self._thread: threading.Thread | None = None
        self.stats = _Stats()
        self._last_drop_log = 0.0
        self._hostname = socket.gethostname()
        self.repositories = [parse_repository(r) for r in settings.repositories]  # checked now

    # --- the observer (any thread; never blocks) --------------------------------------------

    def observe(self, event: Event) -> None:
        try:
            self._queue.put_nowait((time.time(), event))
        except queue.Full:
            self.stats.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= DROP_LOG_INTERVAL:
                self._last_drop_log = now
                log.error(
                    "audit queue full (%d events): %d events not audited so far; the audit "
                    "log's disk is too slow or the audit thread is stuck",
                    QUEUE_SIZE,
                    self.stats.dropped,
                )

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the log and the repositories' cursors (``AuditError`` if they cannot be), then
        start the thread."""
        s = self.settings
        self._log = AuditLog(s.log_dir, max_bytes=s.max_bytes, keep=s.keep)
        context = None
        for repo in self.repositories:
            sender: Sender
            if repo.scheme == "tls":
                if context is None:
                    context = tls_context(s.ca_file, s.client_cert)
                sender = TlsSender(repo, context)
            else:
                sender = UdpSender(repo)
            self._repos.append(_Repo(repo, sender, self._log.cursor(repo.name)))
        self._thread = threading.Thread(target=self._run, name="audit-trail", daemon=True)
        self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until every event queued before this call is in the log and has been offered
        to every repository not waiting out a retry; False if that took over ``timeout`` s."""
        if self._thread is None:
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Log what is queued, give the repositories ``timeout`` seconds to take it, stop.
        What they did not take stays in the log for the next start."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=max(deadline - time.monotonic(), 0.1))
        self._thread.join(max(deadline - time.monotonic(), 0.1))
        if self._thread.is_alive():
            log.error("the audit thread did not stop within %.0f s", timeout)
            return  # it still owns the log; the process is ending
        self._thread = None
        for r in self._repos:
            r.sender.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def snapshot(self) -> dict[str, object]:
        """For status: counts and where each repository stands."""
        end = self._log.end() if self._log is not None else None
        return {
            "events": self.stats.events,
            "messages": self.stats.messages,
            "dropped": self.stats.dropped,
            "repositories": {
                r.repo.name: {
                    "sent": self.stats.sent.get(r.repo.name, 0),
                    "behind": end is not None and r.cursor < end,
                    "failures": r.failures,
                    "last_error": r.last_error,
                }
                for r in self._repos
            },
        }

    # --- the audit thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first: _Item = self._queue.get(timeout=self._next_retry())
            except queue.Empty:
                first = _TIMEOUT
            items = [first]
            while len(items) < BATCH and first is not None:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = [i for i in items if isinstance(i, tuple)]
            try:
                self._record(events)
                self._deliver()
            except Exception:  # the trail must keep running whatever one batch does
                log.exception("audit trail: a batch of %d events failed", len(events))
            for i in items:
                if isinstance(i, threading.Event) and i is not _TIMEOUT:
                    i.set()
            if None in items:
                return

    def _next_retry(self) -> float | None:
        """Seconds until a repository that is behind may be tried again; None: none waits."""
        if self._log is None:
            return None
        end = self._log.end()
        waits = [r.retry_at - time.monotonic() for r in self._repos if r.cursor < end]
        return max(min(waits), 0.05) if waits else None

    def _record(self, batch: list[tuple[float, Event]]) -> None:
        assert self._log is not None
        frames = []
        procid = str(os.getpid())
        for at, event in batch:
            self.stats.events += 1
            try:
                messages = translate(event, at, self.local, self.lookup)
            except Exception:
                log.exception("audit: cannot build the message for %r", type(event).__name__)
                continue
            frames += [
                frame(msg, at=at, hostname=self._hostname, procid=procid) for msg in messages
            ]
        self._log.append(frames)
        self.stats.messages += len(frames)

    def _deliver(self) -> None:
        """Send each repository what it has not taken yet, from its cursor, in order."""
        assert self._log is not None
        end = self._log.end()
        now = time.monotonic()
        for r in self._repos:
            while r.cursor < end and r.retry_at <= now:
                try:
                    records = list(self._log.read_from(r.cursor, SEND_BATCH))
                except (OSError, AuditError) as exc:
                    log.error("audit log unreadable for %s: %s", r.repo.name, exc)
                    r.retry_at = now + RETRY_MAX
                    break
                if not records:
                    break
                try:
                    r.sender.send([rec for _, rec in records])
                except OSError as exc:
                    self._failed(r, exc)
                    break
                r.cursor = records[-1][0]
                self._log.save_cursor(r.repo.name, r.cursor)
                self.stats.sent[r.repo.name] = self.stats.sent.get(r.repo.name, 0) + len(records)
                if r.failures:
                    log.warning("audit repository %s is back", r.repo.name)
                r.failures, r.backoff, r.last_error = 0, RETRY_FIRST, ""
                end = self._log.end()
        self._log.prune([r.cursor for r in self._repos])

    def _failed(self, r: _Repo, exc: OSError) -> None:
        r.failures += 1
        r.last_error = str(exc) or type(exc).__name__
        r.retry_at = time.monotonic() + r.backoff
        if r.failures == 1:
            log.warning(
                "audit repository %s unreachable (%s); audit records wait in the local log",
                r.repo.name,
                r.last_error,
            )
        r.backoff = min(r.backoff * 2, RETRY_MAX)
