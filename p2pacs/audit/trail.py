"""The audit trail: site events to DICOM audit messages, logged locally and sent to repositories.

``observe`` is the bus observer: it stamps the event with the time and puts it on a bounded
in-memory queue without waiting, so auditing never blocks or fails a DICOM operation (a full
queue drops the event and counts it; the log says so). One background thread, the recorder,
builds the messages and appends them to the local log (fsync'd: from then on they survive a
crash). Each repository has its own sender thread that follows the log from the repository's
persistent cursor, so a slow or unreachable repository delays neither the recorder nor the
other repositories; while one is down its records wait in the log and go out, in order, when it
is back (retried with backoff), and a restart resumes at the saved cursor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from p2pacs.audit.log import AuditLog, Cursor
from p2pacs.audit.syslog import (
    MAX_FRAME,
    Repository,
    TlsSender,
    UdpSender,
    frame,
    parse_repository,
    tls_context,
)
from p2pacs.audit.translate import Local, StudyLookup, audited, translate
from p2pacs.errors import AuditError
from p2pacs.events import Event

__all__ = ["AuditTrail", "TrailSettings"]

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000  # events waiting for the recorder (~1 min of C-STOREs at full speed)
BATCH = 500  # events turned into messages and fsync'd together
# seconds the recorder waits for more events before an fsync: at hundreds of C-STOREs a second
# one fsync per event took ~12 % of ingest (its journal commits contend with the archive's own
# fsyncs); the events wait in memory either way, and a flush or stop ends the wait at once
LINGER = 0.05
SEND_BATCH = 200  # records written to a repository at a time (its cursor saved after each)
RETRY_FIRST = 1.0  # seconds before trying a repository that failed again
RETRY_MAX = 30.0  # seconds: the longest wait between tries
DROP_LOG_INTERVAL = 60.0  # seconds between log lines about a full queue

_Item = tuple[float, Event] | threading.Event | None  # an event, a flush marker, or stop


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
    """One repository and its sender thread's state (read by others under ``AuditTrail._cv``)."""

    repo: Repository
    sender: Sender
    cursor: Cursor
    sent: int = 0
    failures: int = 0  # consecutive
    last_error: str = ""
    thread: threading.Thread | None = None


@dataclass(slots=True)
class _Stats:
    events: int = 0
    messages: int = 0
    dropped: int = 0
    batches: int = 0  # appends to the local log, one fsync each


class AuditTrail:
    """Start with ``start()``, subscribe ``observe`` to the site's bus, ``stop()`` at the end."""

    def __init__(self, settings: TrailSettings, local: Local, lookup: StudyLookup | None = None):
        self.settings = settings
        self.local = local
        self.lookup = lookup
        self.repositories = [parse_repository(r) for r in settings.repositories]  # checked now
        self._queue: queue.Queue[_Item] = queue.Queue(QUEUE_SIZE)
        self._log: AuditLog | None = None
        self._repos: list[_Repo] = []
        self._recorder: threading.Thread | None = None
        self._cv = threading.Condition()  # the log grew, a cursor moved, or stopping
        self._stopping = False
        self.stats = _Stats()
        self._last_drop_log = 0.0
        self._hostname = socket.gethostname()

    # --- the observer (any thread; never blocks) --------------------------------------------

    def observe(self, event: Event) -> None:
        if not audited(event):
            return
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
        start the recorder and one sender per repository."""
        s = self.settings
        audit_log = AuditLog(s.log_dir, max_bytes=s.max_bytes, keep=s.keep)
        try:
            context = None
            for repo in self.repositories:
                sender: Sender
                if repo.scheme == "tls":
                    if context is None:
                        context = tls_context(s.ca_file, s.client_cert)
                    sender = TlsSender(repo, context)
                else:
                    sender = UdpSender(repo)
                self._repos.append(_Repo(repo, sender, audit_log.cursor(repo.name)))
        except BaseException:
            audit_log.close()
            for r in self._repos:
                r.sender.close()
            self._repos.clear()
            raise
        self._log = audit_log
        self._recorder = threading.Thread(target=self._record_loop, name="audit-log", daemon=True)
        self._recorder.start()
        for r in self._repos:
            r.thread = threading.Thread(
                target=self._send_loop, args=(r,), name=f"audit-{r.repo.name}", daemon=True
            )
            r.thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until every event queued before this call is in the log, and every repository
        has taken it or is failing; False if that took more than ``timeout`` seconds."""
        if self._recorder is None or self._log is None:
            return True
        deadline = time.monotonic() + timeout
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        if not done.wait(timeout):
            return False
        target = self._log.end()
        with self._cv:
            return self._cv.wait_for(
                lambda: all(r.cursor >= target or r.failures for r in self._repos),
                max(deadline - time.monotonic(), 0.0),
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Log what is queued, give the repositories ``timeout`` seconds to take it, stop.
        What they did not take stays in the log for the next start."""
        if self._recorder is None:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=max(deadline - time.monotonic(), 0.1))
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        threads = [self._recorder, *(r.thread for r in self._repos if r.thread is not None)]
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0.1))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:  # a sender blocked on a repository: it times out on its own (SEND_TIMEOUT)
            log.error("audit threads still busy at stop: %s", ", ".join(stuck))
            return
        self._recorder = None
        for r in self._repos:
            r.sender.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def snapshot(self) -> dict[str, object]:
        """For status: counts and where each repository stands."""
        end = self._log.end() if self._log is not None else None
        with self._cv:
            repos = {
                r.repo.name: {
                    "sent": r.sent,
                    "behind": end is not None and r.cursor < end,
                    "failures": r.failures,
                    "last_error": r.last_error,
                }
                for r in self._repos
            }
        return {
            "events": self.stats.events,
            "messages": self.stats.messages,
            "dropped": self.stats.dropped,
            "batches": self.stats.batches,
            "repositories": repos,
        }

    # --- the recorder ---------------------------------------------------------------------------

    def _record_loop(self) -> None:
        while True:
            items = [self._queue.get()]
            deadline = time.monotonic() + LINGER
            while len(items) < BATCH and isinstance(items[-1], tuple):
                try:
                    items.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._record([i for i in items if isinstance(i, tuple)])
            except Exception:  # the trail must keep running whatever one batch does
                log.exception("audit trail: a batch of %d events could not be logged", len(items))
            with self._cv:
                self._cv.notify_all()
            for i in items:
                if isinstance(i, threading.Event):
                    i.set()
            if items[-1] is None:
                return

    def _record(self, batch: list[tuple[float, Event]]) -> None:
        assert self._log is not None
        frames = []
        procid = str(os.getpid())
        for at, event in batch:
            self.stats.events += 1
            try:
                messages = translate(event, at, self.local, self.lookup)
            except Exception:
                log.exception("audit: cannot build the message for %s", type(event).__name__)
                continue
            for msg in messages:
                data = frame(msg, at=at, hostname=self._hostname, procid=procid)
                if len(data) > MAX_FRAME:  # e.g. a C-MOVE naming tens of thousands of studies
                    log.error(
                        "audit: a %s message of %d bytes is too large to log (limit %d)",
                        type(event).__name__, len(data), MAX_FRAME,
                    )  # fmt: skip
                    continue
                frames.append(data)
        self._log.append(frames)
        self.stats.batches += 1
        self.stats.messages += len(frames)
        if frames:
            with self._cv:
                cursors = [r.cursor for r in self._repos]
            self._log.prune(cursors)

    # --- one sender per repository --------------------------------------------------------------

    def _send_loop(self, r: _Repo) -> None:
        assert self._log is not None
        audit_log = self._log
        backoff = RETRY_FIRST
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopping or r.cursor < audit_log.end())
                if self._stopping and (r.failures or r.cursor >= audit_log.end()):
                    return
            try:
                records = list(audit_log.read_from(r.cursor, SEND_BATCH))
                r.sender.send([rec for _, rec in records])
            except (OSError, AuditError) as exc:
                with self._cv:
                    r.failures += 1
                    r.last_error = str(exc) or type(exc).__name__
                    self._cv.notify_all()
                if r.failures == 1:
                    log.warning(
                        "audit repository %s unreachable (%s); its records wait in the local log",
                        r.repo.name,
                        r.last_error,
                    )
                with self._cv:  # wait out the backoff, or until the site stops
                    self._cv.wait_for(lambda: self._stopping, backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                continue
            if records:
                audit_log.save_cursor(r.repo.name, records[-1][0])
            with self._cv:
                if r.failures:
                    log.warning("audit repository %s is back", r.repo.name)
                if records:
                    r.cursor = records[-1][0]
                r.sent += len(records)
                r.failures, r.last_error = 0, ""
                self._cv.notify_all()
            backoff = RETRY_FIRST
