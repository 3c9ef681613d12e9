"""Gateway worker processes: the DICOM port served by every core.

pynetdicom runs every association's PDU handling under one interpreter lock, so one process
cannot use a second core. The pool opens and listens on the DICOM port once, then starts
``count`` worker processes (``gateway.worker``, fresh interpreters) that inherit the listening
socket and each run the SCP. One shared listening socket rather than ``SO_REUSEPORT``
listeners: the pending-connection queue belongs to the socket, so a worker that dies loses only
its own associations (with ``SO_REUSEPORT`` the connections queued on its socket are reset),
port 0 needs no reservation dance, and a free worker takes the next association where
``SO_REUSEPORT`` would hash it onto a busy one. A monitor thread restarts a worker that exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from p2pacs import const
from p2pacs.archive import Archive
from p2pacs.config import DicomConfig, StoreConfig
from p2pacs.errors import ConfigError, P2PacsError
from p2pacs.events import EventBus
from p2pacs.gateway.channel import ChannelServer, Method
from p2pacs.gateway.worker import spec
from p2pacs.index import Version

__all__ = ["WorkerPool", "resolve_workers"]

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128  # connections the kernel queues while every worker is busy or restarting
READY_TIMEOUT = 60.0  # seconds a new worker may take to open the archive and serve
STOP_TIMEOUT = 10.0  # seconds a worker gets to finish after SIGTERM before SIGKILL
RESTART_PAUSE = 1.0  # seconds between restarts of one worker slot that keeps dying


class WorkerError(P2PacsError):
    """A gateway worker process could not be started."""


def resolve_workers(configured: int) -> int:
    """``dicom.workers``: 0 means one per core."""
    return configured if configured > 0 else max(1, os.cpu_count() or 1)


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    stdin: IO[bytes] | None = field(default=None, repr=False)


class WorkerPool:
    def __init__(
        self,
        *,
        site_path: Path,
        store: StoreConfig,
        config: DicomConfig,
        bus: EventBus,
        methods: dict[str, Method],
        count: int,
        federated: bool,
    ):
        self.site_path = site_path
        self.store = store
        self.config = config
        self.bus = bus
        self.methods = methods
        self.count = count
        self.federated = federated
        self.slots = [_Slot(i) for i in range(count)]
        self._listener: socket.socket | None = None
        self._channel: ChannelServer | None = None
        self._dir: Path | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "gateway workers not started"
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def pids(self) -> list[int]:
        with self._lock:
            return [s.process.pid for s in self.slots if s.process is not None]

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.config.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.bind, self.config.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen for DICOM on {self.config.bind}:{self.config.port}: "
                f"{exc.strerror}; choose another port with 'serve --port'"
            ) from exc
        sock.listen(LISTEN_BACKLOG)  # not inheritable: ``pass_fds`` hands it to the workers only
        self._listener = sock
        # a short path: a Unix socket's path is limited to ~107 bytes
        self._dir = Path(tempfile.mkdtemp(prefix="p2pacs-gw-"))
        self._channel = ChannelServer(self._dir / "channel", self.bus, self.methods)
        self._channel.start()
        try:
            for slot in self.slots:
                self._spawn(slot)
            for slot in self.slots:
                self._await_ready(slot)
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch, name="gateway-workers", daemon=True)
        self._monitor.start()
        log.info("%d gateway workers on %s:%d", self.count, *self.address)

    def _spawn(self, slot: _Slot) -> None:
        assert self._listener is not None and self._channel is not None
        settings = spec(
            site_path=self.site_path,
            store=self.store,
            dicom=self.config,
            channel=self._channel.path,
            listen_fd=self._listener.fileno(),
            federated=self.federated,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "p2pacs.gateway.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(self._listener.fileno(),),
        )
        assert process.stdin is not None
        process.stdin.write(settings.hex().encode() + b"\n")
        process.stdin.flush()  # stdin stays open: its end tells the worker we are gone
        with self._lock:
            slot.process, slot.stdin, slot.started = process, process.stdin, time.monotonic()

    def _await_ready(self, slot: _Slot) -> None:
        process = slot.process
        assert process is not None and process.stdout is not None
        line = _readline(process.stdout, READY_TIMEOUT)
        if line.strip() != b"ready":
            code = process.poll()
            raise WorkerError(
                f"gateway worker {slot.index} did not start (exit {code}); see its log above"
            )

    def _watch(self) -> None:
        """Restart a worker that exits while the pool runs (pausing if it keeps dying)."""
        while not self._stopping.wait(0.1):
            for slot in self.slots:
                process = slot.process
                if process is None or process.poll() is None:
                    continue
                code = process.returncode
                log.error("gateway worker %d (pid %d) exited with %s; restarting",
                          slot.index, process.pid, code)  # fmt: skip
                self._close_pipes(process)
                died_young = time.monotonic() - slot.started < RESTART_PAUSE
                if died_young and self._stopping.wait(RESTART_PAUSE):
                    return
                try:
                    self._spawn(slot)
                    self._await_ready(slot)
                except (OSError, P2PacsError) as exc:
                    log.error("gateway worker %d could not be restarted: %s", slot.index, exc)
                    continue
                slot.restarts += 1

    @staticmethod
    def _close_pipes(process: subprocess.Popen[bytes]) -> None:
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(READY_TIMEOUT)
            self._monitor = None
        with self._lock:
            processes = [s.process for s in self.slots if s.process is not None]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("gateway worker pid %d did not stop; killing it", process.pid)
                process.kill()
                process.wait()
            self._close_pipes(process)
        if self._channel is not None:
            self._channel.stop()
            self._channel = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _readline(pipe: IO[bytes], timeout: float) -> bytes:
    """One line from a child's pipe, or b"" after ``timeout`` seconds."""
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(pipe.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return out[0] if out else b""


def methods_for(
    archive: Archive,
    ensure_local: Callable[[list[str]], None],
    commit: Callable[[list[tuple[str, str]], float], Any],
    repair: Callable[[str], bool],
    *,
    federated: bool,
) -> dict[str, Method]:
    """The channel's methods: the workers' writes, read-through, commitment and blob repair.
    ``federated``: the workers' writes go to the change log the federation tails (nothing else
    would prune it)."""

    def do_write(args: list[Any], dataset: bytearray) -> list[Any]:
        attrs, version = args
        ingested = archive.write_checked(
            dict(attrs), Version.from_wire(version), memoryview(dataset), log_change=federated
        )
        return list(dataclasses.astuple(ingested.result(const.WRITE_TIMEOUT)))

    def do_ensure_local(args: list[Any], _payload: bytearray) -> None:
        ensure_local([str(u) for u in args[0]])

    def do_commit(args: list[Any], _payload: bytearray) -> list[Any]:
        refs = [(str(c), str(s)) for c, s in args[0]]
        result = commit(refs, float(args[1]))
        return [result.committed, result.failed]

    def do_repair(args: list[Any], _payload: bytearray) -> bool:
        return repair(str(args[0]))

    return {
        "write": do_write,
        "ensure_local": do_ensure_local,
        "commit": do_commit,
        "repair": do_repair,
    }
