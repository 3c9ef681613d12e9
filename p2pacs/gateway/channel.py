"""The local channel between gateway worker processes and the site's main process.

A worker does C-STORE, C-FIND, C-GET and C-MOVE on its own (it opens the site's LMDB); what
needs the federation, which runs only in the main process, goes over a Unix socket: read-through
of studies not held here (``ensure_local``), the Storage Commitment check (``commit``), and the
gateway's events for metrics and audit (``event``, one way).

Wire: each message is two 4-byte big-endian lengths, a msgpack array and a payload of raw
bytes (a forwarded dataset travels there, so it is never copied into or out of msgpack). A
request is ``[id, method, args]``; the answer ``[id, ok, result-or-error]``. An event is a
request with id 0 and gets no answer. Every wait is bounded; a failure reaches the caller as
``ChannelError``, which the DICOM handlers turn into a status.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from p2pacs import events as ev
from p2pacs.errors import (
    InvalidDicomError,
    MalformedDatasetError,
    P2PacsError,
    StoreError,
    StoreFullError,
)

__all__ = [
    "Caller",
    "ChannelError",
    "ChannelServer",
    "EventSender",
    "call",
    "decode_event",
    "encode_event",
]

log = logging.getLogger(__name__)

MAX_HEADER = 64 << 20  # bytes of msgpack: a commitment request for ~500 k instances
EVENT_QUEUE = 10_000  # events a worker holds while the main process is slow; more are dropped
CONNECT_TIMEOUT = 5.0  # seconds to reach the main process's socket

_EVENT_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        ev.DicomRequest,
        ev.AssociationEvent,
        ev.TransferBegun,
        ev.PeerTransfer,
        ev.SecurityAlert,
    )
}


class ChannelError(P2PacsError):
    """The main process could not be asked, or answered with an error."""


# --- pure codec ----------------------------------------------------------------------------------


_HEAD = struct.Struct(">II")  # msgpack length, payload length
SMALL = 64 * 1024  # bytes: a message shorter than this is sent in one piece
# bytes a worker may queue on its connection: a whole forwarded dataset goes in one send
# instead of waiting for the main process to read each ~200 KiB (the default)
SEND_BUFFER = 2 << 20


def frame(message: list[Any], payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """The buffers of one message, to send in order."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    head = _HEAD.pack(len(body), len(payload))
    if len(payload) + len(body) < SMALL:
        return [head + body + bytes(payload)]
    return [head + body, payload]


def send_message(
    sock: socket.socket, message: list[Any], payload: bytes | memoryview = b""
) -> None:
    for part in frame(message, payload):
        sock.sendall(part)


def _tuples(value: Any) -> Any:
    """msgpack gives arrays back as lists; every sequence field of an event is a tuple."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def encode_event(event: ev.Event) -> list[Any]:
    fields = [getattr(event, f.name) for f in dataclasses.fields(event)]
    return [type(event).__name__, fields]


def decode_event(raw: Any) -> ev.Event:
    """The event ``encode_event`` encoded; ``ChannelError`` for anything else."""
    try:
        name, fields = raw
        cls = _EVENT_TYPES[name]
        event: ev.Event = cls(*(_tuples(v) for v in fields))
    except (KeyError, TypeError, ValueError) as exc:
        raise ChannelError(f"not a gateway event: {exc}") from exc
    return event


# --- socket I/O ----------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("the channel was closed")
        got += k
    return buf


def read_message(sock: socket.socket) -> tuple[Any, bytearray]:
    """One message and its payload."""
    size, payload = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    if size > MAX_HEADER:
        raise ChannelError(f"message of {size} bytes refused (limit {MAX_HEADER})")
    return msgpack.unpackb(_recv_exact(sock, size), raw=False), _recv_exact(sock, payload)


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    sock.settimeout(min(timeout, CONNECT_TIMEOUT))
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    sock.settimeout(timeout)
    return sock


# errors the main process names in an answer, raised again as themselves in the worker
_ERRORS: dict[str, type[P2PacsError]] = {
    cls.__name__: cls
    for cls in (InvalidDicomError, MalformedDatasetError, StoreFullError, StoreError)
}


def _error(result: Any, method: str) -> P2PacsError:
    try:
        name, text = result
        return _ERRORS.get(str(name), ChannelError)(str(text))
    except (TypeError, ValueError):
        return ChannelError(f"{method} failed in the main process: {result}")


class Caller:
    """Requests on one kept connection per calling thread (each association has its own
    thread): a C-STORE costs one round trip, not a connect."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()

    def call(
        self, method: str, args: list[Any], timeout: float, payload: bytes | memoryview = b""
    ) -> Any:
        sock: socket.socket | None = getattr(self._local, "sock", None)
        try:
            if sock is None:
                sock = self._local.sock = _connect(self.path, timeout)
            sock.settimeout(timeout)
            send_message(sock, [1, method, args], payload)
            (_, ok, result), _ = read_message(sock)
        except (OSError, ValueError, msgpack.UnpackException, ChannelError) as exc:
            if sock is not None:
                sock.close()
            self._local.sock = None
            raise ChannelError(f"{method}: the channel to the main process failed: {exc}") from exc
        if not ok:
            raise _error(result, method)
        return result


def call(path: Path, method: str, args: list[Any], timeout: float) -> Any:
    """Ask the main process and wait at most ``timeout`` seconds (one connection per call, so
    a long read-through never holds up another association's request)."""
    try:
        sock = _connect(path, timeout)
    except OSError as exc:
        raise ChannelError(f"the site's main process is unreachable: {exc}") from exc
    try:
        send_message(sock, [1, method, args])
        (_, ok, result), _ = read_message(sock)
    except TimeoutError as exc:
        raise ChannelError(f"{method}: no answer from the main process in {timeout:g} s") from exc
    except (OSError, ValueError, msgpack.UnpackException) as exc:
        raise ChannelError(f"{method}: the channel failed: {exc}") from exc
    finally:
        sock.close()
    if not ok:
        raise _error(result, method)
    return result


class EventSender:
    """A worker's events, sent in order on one connection by one thread; emitting never blocks
    a DICOM thread (a full queue drops the event and counts it)."""

    def __init__(self, path: Path):
        self.path = path
        self.dropped = 0
        self._queue: queue.Queue[ev.Event | None] = queue.Queue(EVENT_QUEUE)
        self._thread = threading.Thread(target=self._run, name="event-sender", daemon=True)
        self._thread.start()

    def emit(self, event: ev.Event) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        sock: socket.socket | None = None
        while True:
            event = self._queue.get()
            if event is None:
                break
            try:
                if sock is None:
                    sock = _connect(self.path, CONNECT_TIMEOUT)
                send_message(sock, [0, "event", encode_event(event)])
            except OSError as exc:
                self.dropped += 1
                log.warning("event for the main process dropped: %s", exc)
                if sock is not None:
                    sock.close()
                sock = None
                time.sleep(0.2)  # the main process restarts its side: do not spin
        if sock is not None:
            sock.close()


# --- the main process's side ---------------------------------------------------------------------

Method = Callable[[list[Any], bytearray], Any]  # (args, payload) -> result


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            try:
                message, payload = read_message(sock)
            except (ConnectionError, OSError):
                return
            except (ChannelError, ValueError, msgpack.UnpackException) as exc:
                log.warning("bad message from a gateway worker: %s", exc)
                return
            try:
                ident, method, args = message
            except (TypeError, ValueError):
                log.warning("bad request from a gateway worker: %r", message)
                return
            answer = self.server.dispatch(str(method), args, payload)
            if ident:
                try:
                    send_message(sock, [ident, *answer])
                except OSError:
                    return


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    dispatch: Callable[[str, Any, bytearray], tuple[bool, Any]]


class ChannelServer:
    """Serves the workers' requests on a Unix socket, a thread per connection."""

    def __init__(self, path: Path, bus: ev.EventBus, methods: dict[str, Method]):
        self.path = path
        self.bus = bus
        self.methods = methods
        path.unlink(missing_ok=True)
        self._server = _Server(str(path), _Handler)
        self._server.dispatch = self._dispatch
        path.chmod(0o600)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="gateway-channel", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
        self.path.unlink(missing_ok=True)

    def _dispatch(self, method: str, args: Any, payload: bytearray) -> tuple[bool, Any]:
        """Run one request; every failure becomes an error answer, never a dead connection."""
        if method == "event":
            try:
                self.bus.emit(decode_event(args))
            except ChannelError as exc:
                log.warning("%s", exc)
            return True, None
        fn = self.methods.get(method)
        if fn is None:
            return False, ["ChannelError", f"unknown method {method!r}"]
        try:
            return True, fn(args, payload)
        except P2PacsError as exc:
            return False, [type(exc).__name__, str(exc)]
        except Exception as exc:
            log.exception("gateway worker request %s failed", method)
            return False, ["ChannelError", f"{type(exc).__name__}: {exc}"]
