"""A federation of real site processes on this machine: the demo's and the fault tests' stage.

Each site is a ``p2pacs serve`` process with its own directory, identity and ports, so it can be
killed with SIGKILL, wiped and restarted exactly as a hospital's archive server could.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from p2pacs import const
from p2pacs.control.client import RUNFILE
from p2pacs.errors import P2PacsError, PeerUnavailableError
from p2pacs.site import Site

__all__ = ["SiteProcess", "Testbed", "free_port", "wait_for"]

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # seconds for a site process to print its ready line


_given: set[int] = set()
PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range, so no outgoing connection takes it


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1, never handed out twice by this process."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        if port in _given:
            continue
        try:
            for sock_type in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, sock_type) as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _given.add(port)
        return port
    raise OSError("no free port found on 127.0.0.1")


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


@dataclass
class SiteProcess:
    name: str
    path: Path
    aet: str
    dicom_port: int
    host: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", NS) to run it in a namespace
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.path.parent / f"{self.name}.log"

    @property
    def site(self) -> Site:
        return Site.open(self.path)

    def start(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        """Start ``p2pacs serve`` (or another command) and wait for its ready line; ``env``
        adds to the environment (e.g. ``P2PACS_FAILPOINTS``)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        log_file = self.log_path.open("ab")
        cmd = [
            *self.prefix,
            sys.executable,
            "-m",
            "p2pacs",
            "-v",
            "--site",
            str(self.path),
            *(args or ("serve",)),
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log_file, env=env, start_new_session=True
        )
        log_file.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise PeerUnavailableError(
                    f"site {self.name} exited before it was ready; see {self.log_path}"
                )
            if line.startswith(b"ready "):
                return
        raise PeerUnavailableError(f"site {self.name} was not ready in {READY_TIMEOUT:.0f} s")

    def restart(self, *args: str, env: Mapping[str, str] | None = None, hard: bool = False) -> None:
        """Stop (SIGKILL when ``hard``, else SIGTERM) and start again, e.g. with other
        failpoints armed or none."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start(*args, env=env)

    def log_tail(self, lines: int = 40, max_bytes: int = 65536) -> str:
        """The last ``lines`` of this site's log (every process it ran), for failure reports."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
                data = f.read()
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def run_cli(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[bytes]:
        """Run another ``p2pacs`` command against this site, as its operator would."""
        return subprocess.run(
            [sys.executable, "-m", "p2pacs", "--site", str(self.path), *args],
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def holds_whole(
        self, studies: set[str], copies: int, instances: Mapping[str, int] | None = None
    ) -> bool:
        """Whether, as this site sees the federation, every study is held whole by ``copies``
        live sites (whole: ``instances[uid]`` instances, or as many as the fullest holder)."""
        try:
            for uid in studies:
                holders = [h for h in self.find(uid) if h["up"]]
                full = max((h["instances"] for h in holders), default=0)
                want = max(full, (instances or {}).get(uid, 0))
                if sum(h["instances"] >= want for h in holders) < copies:
                    return False
            return True
        except P2PacsError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as in a crash or power loss."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def wipe(self) -> None:
        """Lose the archive and all federation state; keep only the identity and config."""
        site = self.site
        for path in (site.db_path, site.dht_path):
            shutil.rmtree(path, ignore_errors=True)
        (self.path / RUNFILE).unlink(missing_ok=True)

    def corrupt_blob(self, pick: float = 0.0) -> str | None:
        """Flip a byte of one stored instance blob of this stopped site, below the store's API,
        as disk rot would: the one at fraction ``pick`` (0 <= pick < 1) of its instances in
        study order. Returns the blob's hash, or None when the site holds no instance."""
        with self.site.archive() as archive:
            instances = [
                instance.current.hash
                for uid in sorted(s.study_uid for s in archive.index.studies())
                for instance in archive.index.study_instances(uid)
            ]
            if not instances:
                return None
            h = instances[min(int(pick * len(instances)), len(instances) - 1)]
            key = bytes.fromhex(h) + (0).to_bytes(4, "big")  # the blob's first chunk
            chunks = archive.db.db("chunks")

            def flip(txn: Any) -> None:
                data = bytearray(txn.get(key, db=chunks))
                data[len(data) // 2] ^= 0xFF
                txn.put(key, bytes(data), db=chunks)

            archive.db.write(flip)
            if archive.blobs.verify_blob(h):
                raise AssertionError(f"blob {h} still verifies after a byte was flipped")
        return h

    def status(self) -> dict[str, Any]:
        from p2pacs.control.client import connect

        async def run() -> dict[str, Any]:
            async with connect(self.site, timeout=15) as node:
                return dict(await node.get_json("/v1/status"))

        return asyncio.run(run())

    def find(self, study_uid: str) -> list[dict[str, Any]]:
        from p2pacs.control.client import connect

        async def run() -> list[dict[str, Any]]:
            async with connect(self.site, timeout=30) as node:
                found = await node.get_json("/v1/find", study=study_uid)
                return list(found["holders"])

        return asyncio.run(run())


class Testbed:
    """A fresh federation of named sites in ``root``; stops every process it started."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        root: Path,
        names: Sequence[str],
        *,
        replication: int = 2,
        down_after: float = 4.0,
        repair_interval: float = 2.0,
        host: str = "127.0.0.1",
        hosts: dict[str, str] | None = None,
        prefixes: dict[str, tuple[str, ...]] | None = None,
        record_ttl: float | None = None,
        recover_give_up: float | None = None,
        metadata_grace: float | None = None,
        trim_after: float | None = None,
        workers: int = 1,
    ):
        """``hosts``/``prefixes`` place sites on other addresses (e.g. network namespaces),
        where each site can use the default ports. ``workers``: each site's ``dicom.workers``
        (1, the in-process gateway, unless a test is about worker processes)."""
        from p2pacs.federation.identity import create_federation_dir, enroll_site

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.fed_dir = create_federation_dir(root / "federation", "p2pacs-demo")
        self.sites: dict[str, SiteProcess] = {}
        first_dht: int | None = None
        first_host = host
        hosts, prefixes = hosts or {}, prefixes or {}
        for name in names:
            site_host = hosts.get(name, host)
            if name in hosts:
                dicom, transfer, dht = (
                    const.DEFAULT_DICOM_PORT, const.DEFAULT_TRANSFER_PORT, const.DEFAULT_DHT_PORT
                )  # fmt: skip
            else:
                dicom, transfer, dht = free_port(), free_port(), free_port()
            aet = name.upper().replace("-", "")[:16]
            bootstrap = [f"{first_host}:{first_dht}"] if first_dht else []
            site = enroll_site(
                self.fed_dir,
                name,
                root / name,
                host=site_host,
                bind=site_host,
                aet=aet,
                dicom_port=dicom,
                dht_port=dht,
                transfer_port=transfer,
                bootstrap=bootstrap,
                replication=replication,
                discovery=False,
            )
            site.config.federation.down_after = down_after
            site.config.federation.repair_interval = repair_interval
            if record_ttl is not None:
                site.config.federation.record_ttl = record_ttl
            if recover_give_up is not None:
                site.config.federation.recover_give_up = recover_give_up
            if metadata_grace is not None:
                site.config.federation.metadata_grace = metadata_grace
            if trim_after is not None:
                site.config.federation.trim_after = trim_after
            site.config.dicom.bind = site_host
            site.config.dicom.workers = workers
            site.save_config()
            if first_dht is None:
                first_dht, first_host = dht, site_host
            self.sites[name] = SiteProcess(
                name, root / name, aet, dicom, site_host, prefixes.get(name, ())
            )
        # every site bootstraps from the first one; the first from the second
        if len(names) > 1 and first_dht is not None:
            first = self.sites[names[0]].site
            second = self.sites[names[1]].site
            second_fed = second.config.federation
            first.config.federation.bootstrap = [f"{second_fed.host}:{second_fed.dht_port}"]
            first.save_config()

    def __getitem__(self, name: str) -> SiteProcess:
        return self.sites[name]

    def start(self) -> None:
        for site in self.sites.values():
            site.start()

    def close(self) -> None:
        for site in self.sites.values():
            try:
                site.stop()
            except (OSError, subprocess.SubprocessError, P2PacsError):
                site.kill()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
