"""The local audit log: every audit message, fsync'd, in size-rotated segments; the outbox.

Segments are ``audit-NNNNNNNN.log`` (created 0600), each a run of octet-counted RFC 5424
frames (RFC 5425's framing, one record per line: ``LEN SP FRAME LF``), so a segment can be
replayed to any syslog receiver as it is. A record is appended and fsync'd before anything is
sent; each repository has a cursor (segment, byte offset) saved atomically after every
delivery, so what was queued while a repository was down is sent when it returns, and a
restart resumes where the last delivery ended. A torn record at the end of the newest segment
(a crash mid-write) is cut off when the log is opened. One thread appends; any may read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from p2pacs.audit.syslog import octet_count, read_frames
from p2pacs.errors import AuditError

__all__ = ["AuditLog", "Cursor"]

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^audit-(\d{8})\.log$")
FILE_MODE = 0o600  # audit records name patients: only the site's own user reads them
DIR_MODE = 0o700
READ_CHUNK = 1 << 20  # bytes read from a segment at a time when delivering (more for a record
# larger than that)


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """A position in the log: everything before it was delivered."""

    segment: int
    offset: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    def __init__(self, directory: Path, *, max_bytes: int, keep: int = 0):
        """``max_bytes``: a segment is closed once it reaches this size; ``keep``: delivered
        segments kept besides the current one (0: all, the operator archives them)."""
        self.dir = directory
        self.max_bytes = max_bytes
        self.keep = keep
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        except OSError as exc:
            raise AuditError(f"cannot create the audit log directory {directory}: {exc}") from exc
        self._lock = threading.Lock()  # current and size: written by one thread, read by all
        segments = self.segments()
        self.current = segments[-1] if segments else 1
        self._fd = self._open(self.current)
        self.size = self._repair_tail()

    def path(self, segment: int) -> Path:
        return self.dir / f"audit-{segment:08d}.log"

    def segments(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _SEGMENT.match(p.name)))

    def _open(self, segment: int) -> int:
        path = self.path(segment)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, FILE_MODE)
            os.fchmod(fd, FILE_MODE)  # also when an older file had looser permissions
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {path}: {exc}") from exc
        _fsync_dir(self.dir)
        return fd

    def _repair_tail(self) -> int:
        """Cut a torn last record (crash mid-append); the size of the segment after it."""
        data = self.path(self.current).read_bytes()
        end = 0
        try:
            for after, _ in read_frames(data, lines=True):
                end = after
        except AuditError as exc:
            log.error(
                "audit log %s is corrupt after byte %d: %s", self.path(self.current), end, exc
            )
        if end < len(data):
            log.warning(
                "audit log %s: cutting %d bytes of a torn record at its end",
                self.path(self.current),
                len(data) - end,
            )
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        return end

    def append(self, frames: list[bytes]) -> None:
        """Write records and fsync them (one fsync for the lot); rotate first if full."""
        if not frames:
            return
        if self.size >= self.max_bytes:
            self._rotate()
        data = b"".join(octet_count(f) + b"\n" for f in frames)
        try:
            os.write(self._fd, data)
            os.fsync(self._fd)
        except OSError as exc:
            raise AuditError(f"cannot write the audit log: {exc}") from exc
        with self._lock:
            self.size += len(data)

    def _rotate(self) -> None:
        os.close(self._fd)
        fd = self._open(self.current + 1)
        with self._lock:
            self._fd = fd
            self.current += 1
            self.size = 0

    def end(self) -> Cursor:
        """Where the next record will go (any thread)."""
        with self._lock:
            return Cursor(self.current, self.size)

    def read_from(self, cursor: Cursor, limit: int) -> Iterator[tuple[Cursor, bytes]]:
        """Records after ``cursor`` (at most ``limit``), each with the cursor after it, up to
        the end as it is now. Safe beside ``append`` in another thread: it reads only what was
        written and fsync'd before it started."""
        stop = self.end()
        sent, chunk = 0, READ_CHUNK
        segment, offset = cursor.segment, cursor.offset
        while sent < limit and (segment, offset) < (stop.segment, stop.offset):
            if segment != stop.segment and not self.path(segment).exists():
                segment, offset = segment + 1, 0  # removed by the operator: nothing to send
                continue
            with self.path(segment).open("rb") as f:
                f.seek(offset)
                want = chunk if segment != stop.segment else min(chunk, stop.offset - offset)
                data = f.read(want)
            pos = 0
            for after, record in read_frames(data, lines=True):
                pos = after
                sent += 1
                yield Cursor(segment, offset + pos), record
                if sent >= limit:
                    return
            if pos:
                offset, chunk = offset + pos, READ_CHUNK
            elif len(data) == chunk:  # one record larger than the chunk: read more at once
                chunk *= 2
            elif segment == stop.segment:
                return
            else:  # the end of a closed segment
                segment, offset, chunk = segment + 1, 0, READ_CHUNK

    # --- cursors ------------------------------------------------------------------------------

    def _cursor_path(self, name: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9.-]+", "_", name)
        return self.dir / f"cursor-{safe}.json"

    def cursor(self, name: str) -> Cursor:
        """Where delivery to repository ``name`` stands; a new repository starts at the end
        (it is sent what happens from now on, not the site's whole history)."""
        path = self._cursor_path(name)
        try:
            raw = json.loads(path.read_text())
            return Cursor(int(raw["segment"]), int(raw["offset"]))
        except FileNotFoundError:
            at = self.end()
            self.save_cursor(name, at)
            return at
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AuditError(
                f"unreadable audit cursor {path}: {exc}; remove it to resend from the end"
            ) from exc

    def save_cursor(self, name: str, cursor: Cursor) -> None:
        path = self._cursor_path(name)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.write(fd, json.dumps({"segment": cursor.segment, "offset": cursor.offset}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def prune(self, cursors: list[Cursor]) -> None:
        """Remove delivered segments beyond ``keep`` (never one a repository still needs)."""
        if not self.keep:
            return
        oldest_needed = min((c.segment for c in cursors), default=self.current)
        done = [s for s in self.segments() if s < min(oldest_needed, self.current)]
        for segment in done[: max(len(done) - self.keep, 0)]:
            self.path(segment).unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
