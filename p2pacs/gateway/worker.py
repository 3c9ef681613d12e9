"""A gateway worker process: the pynetdicom SCP on the site's shared listening socket.

Started by ``WorkerPool`` as ``python -m p2pacs.gateway.worker`` (a fresh interpreter: never a
fork of a process holding an LMDB environment or threads), with its settings as one msgpack map
on stdin. It opens the site's LMDB itself (LMDB serves several processes on one environment),
so C-FIND, C-GET and C-MOVE read it here, and C-STORE's CPU work (PDU handling, structure check,
header parse, hash) runs here; the checked instance is then written by the main process's writer
thread (``write`` over the channel), so one group commit and one fsync serve the associations of
every worker, and the C-STORE success follows that durable commit. Read-through, Storage
Commitment with a federation, and the gateway's events go to the main process over the channel.

The worker exits when stdin closes (the main process ended, however it ended) or on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgpack

from p2pacs import const
from p2pacs.archive import Ingested, RemoteWrite
from p2pacs.config import Config, DicomConfig, StoreConfig
from p2pacs.dicom.header import AttrValue
from p2pacs.errors import P2PacsError
from p2pacs.gateway.channel import Caller, EventSender, call
from p2pacs.gateway.commitment import CommitFn, CommitmentResult
from p2pacs.gateway.server import Gateway
from p2pacs.index import Version
from p2pacs.site import Site

__all__ = ["main", "spec"]

log = logging.getLogger(__name__)

READ_THROUGH_TIMEOUT = 600.0  # seconds a C-MOVE/C-GET waits for the federation to fetch a study
REPAIR_TIMEOUT = 150.0  # seconds: the main process gives a repair 120 s, plus the channel
COMMIT_MARGIN = 30.0  # seconds beyond the commitment timeout before the channel gives up


def spec(
    *,
    site_path: Path,
    store: StoreConfig,
    dicom: DicomConfig,
    channel: Path,
    listen_fd: int,
    federated: bool,
    log_level: int,
) -> bytes:
    """The settings a worker reads from its stdin."""
    packed: bytes = msgpack.packb(
        {
            "site_path": str(site_path),
            "store": dataclasses.asdict(store),
            "dicom": dataclasses.asdict(dicom),
            "channel": str(channel),
            "listen_fd": listen_fd,
            "federated": federated,
            "log_level": log_level,
        },
        use_bin_type=True,
    )
    return packed


def _remote_ensure_local(channel: Path) -> Any:
    def ensure_local(study_uids: list[str]) -> None:
        call(channel, "ensure_local", [study_uids], READ_THROUGH_TIMEOUT)

    return ensure_local


def _remote_commitment(channel: Path) -> CommitFn:
    def commit(refs: list[tuple[str, str]], timeout: float) -> CommitmentResult:
        committed, failed = call(channel, "commit", [refs, timeout], timeout + COMMIT_MARGIN)
        return CommitmentResult(
            committed=[(str(c), str(s)) for c, s in committed],
            failed=[(str(c), str(s), int(code)) for c, s, code in failed],
        )

    return commit


def _remote_write(caller: Caller) -> RemoteWrite:
    """The write half of ``Archive.submit``, done by the main process: its writer thread
    group-commits the instances of every worker together (one fsync for all of them)."""

    def write(
        attrs: dict[str, AttrValue], version: Version, dataset: bytes | memoryview
    ) -> Future[Ingested]:
        result: Future[Ingested] = Future()
        try:
            fields = caller.call(
                "write", [attrs, version.to_wire()], const.WRITE_TIMEOUT, payload=dataset
            )
            result.set_result(Ingested(*fields))
        except P2PacsError as exc:
            result.set_exception(exc)
        return result

    return write


def _remote_repair(channel: Path) -> Callable[[str], bool]:
    """A blob that fails its hash when read here is repaired by the main process's federation
    (as the in-process gateway's ``repair_hook`` does); False if that could not be done."""

    def repair(h: str) -> bool:
        try:
            return bool(call(channel, "repair", [h], REPAIR_TIMEOUT))
        except P2PacsError as exc:
            log.error("blob %s could not be repaired while reading it: %s", h[:16], exc)
            return False

    return repair


def run(settings: dict[str, Any]) -> None:
    channel = Path(settings["channel"])
    # the archive exactly as the site opens it (the same LMDB map; the object store, if any)
    site = Site(Path(settings["site_path"]), Config(store=StoreConfig(**settings["store"])))
    archive = site.archive()
    archive.remote_write = _remote_write(Caller(channel))
    if settings["federated"]:
        archive.repair_hook = _remote_repair(channel)
    sender = EventSender(channel)
    archive.events.subscribe(sender.emit)
    federated = bool(settings["federated"])
    gateway = Gateway(
        archive,
        DicomConfig(**settings["dicom"]),
        ensure_local=_remote_ensure_local(channel) if federated else None,
        commitment=_remote_commitment(channel) if federated else None,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=_watch_parent, args=(stop,), name="parent-watch", daemon=True).start()
    gateway.start(listen_fd=int(settings["listen_fd"]))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        while not stop.wait(1.0):  # a timed wait: the SIGTERM handler runs between waits
            pass
    finally:
        gateway.stop()  # no new associations; open ones end with the process
        sender.close()
        archive.close()


def _watch_parent(stop: threading.Event) -> None:
    """stdin is a pipe from the main process: end of file means it is gone."""
    try:
        while os.read(0, 4096):  # the raw descriptor: a buffered read would block shutdown
            pass
    except OSError:
        pass
    stop.set()


def main() -> None:
    line = bytearray()  # one line, the hex of the msgpack settings, read unbuffered
    while not line.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            raise SystemExit("gateway worker: no settings on stdin")
        line += chunk
    raw = bytes(line)
    settings = msgpack.unpackb(bytes.fromhex(raw.decode().strip()), raw=False)
    logging.basicConfig(
        level=settings["log_level"],
        format=f"%(asctime)s %(levelname)s gateway-worker[{os.getpid()}] %(name)s: %(message)s",
    )
    run(settings)


if __name__ == "__main__":
    main()
