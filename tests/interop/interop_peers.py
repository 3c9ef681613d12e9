"""Real DICOM peers for the interop tests and bench/ingest_dicom.py: dcmtk tools, Orthanc,
``p2pacs serve`` and a bare pynetdicom receiver (the reference for what went over the wire).

Every external peer is a plain child process started with TCP_NODELAY=1 (without it each
C-STORE stalls ~40 ms on loopback), waited for with a deadline, and stopped by its PID in
``finally``. Imported by path from bench/ingest_dicom.py, so it must not need test fixtures.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

__all__ = [
    "Orthanc",
    "P2pacsServe",
    "StoreSCP",
    "WireSCP",
    "free_tcp_port",
    "peer_env",
    "prefer_requested_syntaxes",
    "require_tools",
    "run_dcmtk",
    "tool_path",
    "wait_for_port",
]

START_TIMEOUT = 30.0  # seconds for a peer to start answering
TOOL_TIMEOUT = 120.0  # seconds for one dcmtk command


def peer_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def free_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for tools that cannot take port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# dcmtk's tools, not pynetdicom's same-named Python apps that a venv puts first on PATH (this
# one, or any other venv whose bin/ is on PATH: a folder beside a pyvenv.cfg)
SYSTEM_PATH = (
    os.pathsep.join(
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p
        and Path(p).resolve() != Path(sys.prefix, "bin").resolve()
        and not Path(p, os.pardir, "pyvenv.cfg").exists()
    )
    + os.pathsep
    + "/usr/local/bin:/usr/bin:/usr/sbin:/bin"
)


def tool_path(name: str) -> str:
    """Absolute path of a system tool (dcmtk's ``storescu``, not pynetdicom's)."""
    path = shutil.which(name, path=SYSTEM_PATH)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (apt-get install dcmtk orthanc)")
    return path


def require_tools(*names: str) -> None:
    """Skip the calling test when a tool is missing (``make test`` installs dcmtk and Orthanc)."""
    missing = [n for n in names if shutil.which(n, path=SYSTEM_PATH) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install dcmtk orthanc)")


def wait_for_port(port: int, proc: subprocess.Popen[Any], timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """Stop a process the tests or benchmarks started, by its PID: SIGTERM, then SIGKILL."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def run_dcmtk(
    tool: str,
    *args: str | Path | int,
    cwd: Path | None = None,
    timeout: float = TOOL_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run one dcmtk command line with TCP_NODELAY=1; raise with its output when it fails."""
    proc = subprocess.run(
        [tool_path(tool), *map(str, args)],
        cwd=cwd,
        env=peer_env(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{tool} exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


class _Process:
    proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> Any:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class StoreSCP(_Process):
    """dcmtk ``storescp`` writing what it receives, bit-preserved, into ``out_dir``."""

    def __init__(
        self,
        out_dir: Path,
        aet: str = "STORESCP",
        port: int | None = None,
        accept: str = "+xa",  # storescp's transfer syntax option; "+x=": uncompressed only
    ):
        self.out_dir, self.aet = out_dir, aet
        self.port = port or free_tcp_port()
        self.accept = accept

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                tool_path("storescp"),
                "-aet",
                self.aet,
                self.accept,
                "+B",
                "-pdu",
                "131072",
                "-od",
                str(self.out_dir),
                str(self.port),
            ],
            env=peer_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc)


class Orthanc(_Process):
    """Orthanc as a plain process with a temporary JSON config; tests talk to it on 127.0.0.1
    only (Orthanc 1.10 binds 0.0.0.0 whatever the config says; remote REST access is off)."""

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        *,
        extra: dict[str, Any] | None = None,  # more configuration (plugins and their settings)
    ):
        self.workdir, self.aet = workdir, aet
        self.dicom_port = dicom_port or free_tcp_port()
        self.http_port = http_port or free_tcp_port()
        self.modalities = modalities or {}
        self.extra = extra or {}
        self.url = f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": self.aet,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "DicomCheckCalledAet": False,
            "AuthenticationEnabled": False,
            "StorageCompression": False,
            "Plugins": [],
            "MaximumPduLength": 131072,
            "DicomScuTimeout": 30,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowFind": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            **self.extra,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        self.log = (self.workdir / "orthanc.log").open("wb")
        self.proc = subprocess.Popen(
            [tool_path("Orthanc"), str(path)],
            env=peer_env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: see {path}")
            try:
                self.get("/system")
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError("Orthanc's REST API did not answer") from None
                time.sleep(0.1)
        wait_for_port(self.dicom_port, self.proc)

    @property
    def port(self) -> int:
        """The DICOM port (as for the other peers)."""
        return self.dicom_port

    def stop(self) -> None:
        super().stop()
        if getattr(self, "log", None) is not None:
            self.log.close()

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> bytes:
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return bytes(resp.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: Any) -> Any:
        raw = self.request("POST", path, body)
        return json.loads(raw) if raw.strip() else None

    def upload(self, data: bytes) -> dict[str, Any]:
        result: dict[str, Any] = self.post("/instances", data)
        return result


class P2pacsServe(_Process):
    """``python -m p2pacs --site DIR serve`` as a child process, after ``p2pacs init``."""

    def __init__(
        self,
        site_dir: Path,
        aet: str = "P2PACS",
        port: int | None = None,
        destinations: dict[str, str] | None = None,
    ):
        self.site_dir, self.aet = site_dir, aet
        self.port = port or free_tcp_port()
        self.destinations = destinations or {}
        self.stderr_path = site_dir.parent / f"{site_dir.name}-serve.log"

    def start(self) -> None:
        base = [sys.executable, "-m", "p2pacs", "--site", str(self.site_dir)]
        subprocess.run([*base, "-q", "init"], check=True, capture_output=True, timeout=60)
        if self.destinations:
            from p2pacs.site import Site

            site = Site.open(self.site_dir)
            site.config.dicom.destinations.update(self.destinations)
            site.save_config()
        self.stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [*base, "serve", "--port", str(self.port), "--aet", self.aet, "--bind", "127.0.0.1"],
            env=peer_env(),
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    break
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"p2pacs serve exited; see {self.stderr_path}")
                if line.startswith("ready "):
                    return
            raise TimeoutError(f"p2pacs serve did not print 'ready'; see {self.stderr_path}")
        finally:
            sel.close()

    def stop(self) -> None:
        super().stop()
        if getattr(self, "stderr", None) is not None:
            self.stderr.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def prefer_requested_syntaxes(event: Any) -> None:
    """EVT_REQUESTED handler: per abstract syntax, order the acceptor's transfer syntaxes as the
    requestor proposed them, so pynetdicom accepts the requestor's preferred one."""
    requested: dict[str, list[str]] = {}
    for cx in event.assoc.requestor.primitive.presentation_context_definition_list:
        order = requested.setdefault(str(cx.abstract_syntax), [])
        for ts in map(str, cx.transfer_syntax):
            if ts not in order:
                order.append(ts)
    contexts = event.assoc.acceptor.supported_contexts
    for cx in contexts:
        order = requested.get(str(cx.abstract_syntax), [])
        ours = [str(ts) for ts in cx.transfer_syntax]
        cx.transfer_syntax = [t for t in order if t in ours] + [t for t in ours if t not in order]
    event.assoc.acceptor.supported_contexts = contexts


class WireSCP:
    """A bare pynetdicom Storage SCP in this process that keeps each received dataset's bytes:
    the reference for what a sender put on the wire.

    It offers the transfer syntaxes in the gateway's order; pynetdicom as acceptor takes the
    first of its own list that the requestor proposed, unless ``requestor_order`` makes it take
    the requestor's first choice instead. A sender negotiates one of the two with any pynetdicom
    SCP, so between them the two runs record the bytes the gateway was sent, whichever it chose.
    """

    def __init__(self, aet: str = "WIRE", *, requestor_order: bool = False):
        self.aet = aet
        self.requestor_order = requestor_order
        self.received: dict[str, tuple[str, bytes]] = {}  # SOP Instance UID -> (syntax, bytes)
        self.port = 0
        self._server: Any = None

    def __enter__(self) -> WireSCP:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        from p2pacs.gateway.server import STORAGE_SYNTAXES

        ae = AE(ae_title=self.aet)
        ae.maximum_pdu_size = 0
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), STORAGE_SYNTAXES)

        def on_store(event: Any) -> int:
            uid = str(event.request.AffectedSOPInstanceUID)
            ts = str(event.context.transfer_syntax)
            self.received[uid] = (ts, bytes(event.encoded_dataset(include_meta=False)))
            return 0x0000

        handlers: list[Any] = [(evt.EVT_C_STORE, on_store)]
        if self.requestor_order:
            handlers.append((evt.EVT_REQUESTED, prefer_requested_syntaxes))
        self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@contextmanager
def serve_app(app: Any, mount: str = "") -> Iterator[str]:
    """Run an aiohttp application on 127.0.0.1, port 0, in a thread with its own event loop;
    yields its base URL (plus ``mount``); stops the runner and the loop on exit."""
    from aiohttp import web

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    ready = threading.Event()
    port: list[int] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port.append(int(runner.addresses[0][1]))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="serve-app", daemon=True)
    thread.start()
    if not ready.wait(START_TIMEOUT):
        raise TimeoutError("the aiohttp application did not start")
    try:
        yield f"http://127.0.0.1:{port[0]}{mount}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(START_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT)
        loop.close()
