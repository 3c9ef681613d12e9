"""Gateway worker processes (``dicom.workers`` > 1): real LMDB, real dcmtk senders, real kills.

A stopped worker (SIGSTOP) cannot accept, so stopping one makes the other take every new
association: that is how each test chooses the worker that serves.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from test_gw_hooks import Requester

from p2pacs import events as ev
from p2pacs.config import Config
from p2pacs.dicom import split_part10
from p2pacs.dicom.scu import get_study
from p2pacs.gateway import Gateway
from p2pacs.gateway.channel import ChannelError, decode_event, encode_event, frame
from p2pacs.node import SiteNode
from p2pacs.samples import generate_instances
from p2pacs.site import Site
from p2pacs.store import ChangeLog, SiteDB

from gw_helpers import AET, StorageSCP, find, header, move

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"  # pynetdicom installs same-named apps in the venv
STORESCU = shutil.which("storescu", path=SYSTEM_PATH)
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
TIMEOUT = 60.0
EXPLICIT = "1.2.840.10008.1.2.1"


def wait_until(
    condition: Callable[[], bool], timeout: float = TIMEOUT, interval: float = 0.05
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# --- pure parts: the change log on a real LMDB, the channel codec -------------------------------


def test_change_log_numbers_entries_in_commit_order_and_prunes(tmp_path: Path) -> None:
    db = SiteDB(tmp_path / "db", map_size=1 << 24, sync=False)
    try:
        log = ChangeLog(db)
        seqs = [
            db.write(lambda txn, uid=uid: log.append(txn, uid)) for uid in ("1.1", "1.2", "1.1")
        ]
        assert seqs == [1, 2, 3]
        assert log.read(0, 10) == [(1, "1.1"), (2, "1.2"), (3, "1.1")]
        assert log.read(1, 1) == [(2, "1.2")]
        assert db.write(lambda txn: log.prune(txn, 2)) == 2
        assert log.read(0, 10) == [(3, "1.1")]
        assert db.write(lambda txn: log.append(txn, "1.3")) == 4  # never reuses a number
        assert db.write(lambda txn: log.prune(txn, 10)) == 2
        assert log.pending() == 0
        assert db.write(lambda txn: log.append(txn, "1.4")) == 1  # empty log starts again
    finally:
        db.close()


def test_channel_events_round_trip_and_bad_input_is_an_error() -> None:
    events: list[ev.Event] = [
        ev.DicomRequest("C-FIND", 0, 0.5, "SCU", "127.0.0.1", ("1.2",), query=(("a", "b"),)),
        ev.AssociationEvent(True, "SCU", "127.0.0.1"),
        ev.TransferBegun("C-GET", "SCU", "127.0.0.1", study_uids=("1.2", "1.3")),
    ]
    import msgpack

    for event in events:
        (wire,) = frame([0, "event", encode_event(event)])  # small: one buffer
        _, _, raw = msgpack.unpackb(bytes(wire)[8:], raw=False)
        assert decode_event(raw) == event
    big = frame([1, "write", []], b"x" * 100_000)  # a dataset is sent as it is, not copied
    assert len(big) == 2 and big[1] == b"x" * 100_000
    for bad in (["NoSuchEvent", []], ["DicomRequest", [1]], "text", None):
        with pytest.raises(ChannelError):
            decode_event(bad)


# --- a site with two worker processes -------------------------------------------------------------


@dataclass
class Sent:
    acknowledged: list[Path]
    returncode: int
    output: str


def storescu(host: str, port: int, files: list[Path]) -> Sent:
    """dcmtk storescu on one association; the files whose C-STORE was answered Success."""
    assert STORESCU is not None
    args = ["-v", "-aec", AET, "-to", "20", "-ta", "20", "-td", "20", host, str(port)]
    done = subprocess.run(
        [STORESCU, *args, *map(str, files)],
        check=False,
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    acked, current = [], None
    for line in (done.stdout + done.stderr).splitlines():
        if m := re.match(r"I: Sending file: (.*)$", line):
            current = Path(m.group(1))
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return Sent(acked, done.returncode, done.stdout[-2000:] + done.stderr[-2000:])


def dataset_of(path: Path) -> bytes:
    return bytes(split_part10(path.read_bytes()).dataset)


async def start_node(path: Path, destinations: dict[str, str] | None = None) -> SiteNode:
    """A site with two gateway workers (destinations are fixed when the workers start)."""
    config = Config()
    config.dicom.ae_title = AET
    config.dicom.bind = "127.0.0.1"
    config.dicom.port = 0
    config.dicom.workers = 2
    config.dicom.network_timeout = 20.0
    config.dicom.destinations = dict(destinations or {})
    config.store.sync = False
    node = SiteNode(Site.init(path, config))
    await node.start()
    return node


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[SiteNode]:
    node = await start_node(tmp_path / "site")
    try:
        yield node
    finally:
        await node.stop()


@pytest.fixture(scope="module")
def explicit_instances(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Explicit VR only: storescu then sends each dataset as it is in the file."""
    files = generate_instances(
        tmp_path_factory.mktemp("workers"), studies=2, series_per_study=1,
        instances_per_series=31, rows=256, columns=256, seed=19,
    )  # fmt: skip
    return [p for p in files if split_part10(p.read_bytes()).transfer_syntax == EXPLICIT]


def _pids(node: SiteNode) -> list[int]:
    assert node.workers is not None
    return node.workers.pids()


@pytest.mark.skipif(STORESCU is None, reason="needs dcmtk storescu")
async def test_worker_killed_mid_stream_loses_nothing_acknowledged(
    node: SiteNode, explicit_instances: list[Path]
) -> None:
    import asyncio

    assert node.workers is not None and node.archive is not None
    archive, pool = node.archive, node.workers
    victim, other = _pids(node)
    host, port = node.dicom_address
    first, rest = explicit_instances[:30], explicit_instances[30:]
    assert len(rest) >= 5
    os.kill(other, signal.SIGSTOP)  # every association of the run goes to the victim
    try:
        with ThreadPoolExecutor(3) as pool_:
            # each sender's files four times over (a resent instance is stored once): the
            # senders are still sending when the kill lands, however fast the worker stores
            runs = [pool_.submit(storescu, host, port, first[i::3] * 4) for i in range(3)]
            stored_some = await asyncio.to_thread(
                wait_until, lambda: archive.index.counts()[2] >= 3, TIMEOUT, 0.005
            )
            assert stored_some, "nothing was stored"
            os.kill(victim, signal.SIGKILL)
            sent = [r.result(TIMEOUT) for r in runs]
    finally:
        os.kill(other, signal.SIGCONT)
    acked = [p for s in sent for p in s.acknowledged]
    assert acked, "the senders saw no success before the kill"
    assert any(s.returncode != 0 for s in sent), "the kill cut no association"
    restarted = await asyncio.to_thread(
        wait_until, lambda: pool.slots[0].restarts + pool.slots[1].restarts >= 1
    )
    assert restarted and victim not in _pids(node)
    for path in acked:  # every acknowledged instance, byte for byte
        record = archive.index.instance(str(header(path).SOPInstanceUID))
        assert record is not None, f"{path.name} was acknowledged but is not stored"
        assert archive.dataset_bytes(record) == dataset_of(path)
    after = await asyncio.to_thread(storescu, host, port, rest)  # the site serves on
    assert after.returncode == 0 and len(after.acknowledged) == len(rest), after.output


@pytest.mark.skipif(STORESCU is None, reason="needs dcmtk storescu")
async def test_find_move_get_and_commitment_answered_by_either_worker(
    tmp_path: Path, explicit_instances: list[Path]
) -> None:
    import asyncio

    files = explicit_instances[:6]
    sop_class = str(header(files[0]).SOPClassUID)
    study = str(header(files[0]).StudyInstanceUID)
    contexts = [(sop_class, "1.2.840.10008.1.2.1")]
    refs = [(str(header(p).SOPClassUID), str(header(p).SOPInstanceUID)) for p in files]
    want = {str(header(p).SOPInstanceUID): dataset_of(p) for p in files}
    requester = Requester()
    dest = StorageSCP("DEST", {sop_class: ["1.2.840.10008.1.2.1"]})
    node = await start_node(tmp_path / "site", {"REQ": requester.address, "DEST": dest.address})
    try:
        host, port = node.dicom_address
        sent = await asyncio.to_thread(storescu, host, port, files)
        assert len(sent.acknowledged) == len(files)

        class Address:  # what the test SCUs need of a gateway
            address = (host, port)

        gw = cast(Gateway, Address)
        for serving, stopped in (_pids(node), _pids(node)[::-1]):
            os.kill(stopped, signal.SIGSTOP)
            try:
                found, final = await asyncio.to_thread(
                    find, gw, STUDY_ROOT_FIND, QueryRetrieveLevel="STUDY",
                    StudyInstanceUID=study, NumberOfStudyRelatedInstances=None,
                )  # fmt: skip
                assert final == 0 and len(found) == 1
                assert int(found[0].NumberOfStudyRelatedInstances) == len(files)
                got = await asyncio.to_thread(get_study, host, port, AET, study, contexts)
                assert got == want
                dest.received.clear()
                statuses = await asyncio.to_thread(
                    move, gw, STUDY_ROOT_MOVE, "DEST",
                    QueryRetrieveLevel="STUDY", StudyInstanceUID=study,
                )  # fmt: skip
                assert int(statuses[-1].Status) == 0x0000
                assert {uid: data for uid, (_, data) in dest.received.items()} == want
                status = await asyncio.to_thread(requester.request, gw, "1.2.3.9", refs)
                assert status == 0x0000
                event_type, info = await asyncio.to_thread(requester.report)
                assert event_type == 1, "every instance is held: all committed"
                assert len(info.ReferencedSOPSequence) == len(files)
            finally:
                os.kill(stopped, signal.SIGCONT)
            assert serving in _pids(node)
    finally:
        await node.stop()
        requester.close()
        dest.close()


async def test_workers_answer_a_full_archive_and_a_broken_dataset_with_their_statuses(
    tmp_path: Path,
) -> None:
    """The main process's errors reach the worker as themselves: 0xA700 for a full archive,
    0xC210 for a dataset that is not whole; what was stored stays whole."""
    import asyncio

    from p2pacs.dicom.scu import store_files

    files = generate_instances(
        tmp_path / "gen", studies=1, series_per_study=1, instances_per_series=8, seed=21
    )  # 8 x 0.5 MB against a 2 MiB store
    config = Config()
    config.store.map_size = 2 * 1024 * 1024
    config.store.sync = False
    config.dicom.ae_title = AET
    config.dicom.bind = "127.0.0.1"
    config.dicom.port = 0
    config.dicom.workers = 2
    async with SiteNode(Site.init(tmp_path / "site", config)) as node:
        assert node.archive is not None
        host, port = node.dicom_address
        report = await asyncio.to_thread(store_files, host, port, AET, files)
        assert report.stored, "the first instances fit"
        assert set(report.failed.values()) == {"status 0xA700"}, report.failed
        for path in report.stored:
            record = node.archive.index.instance(str(header(path).SOPInstanceUID))
            assert record is not None and node.archive.dataset_bytes(record) == dataset_of(path)

        part = split_part10(files[0].read_bytes())
        broken = tmp_path / "broken.dcm"  # a dataset cut in the middle of an element
        broken.write_bytes(bytes(part.prefix) + bytes(part.dataset)[:301])
        sent = await asyncio.to_thread(store_files, host, port, AET, [broken])
        assert sent.failed == {broken: "status 0xC210"}


def test_workers_setting_is_checked_and_zero_means_one_per_core() -> None:
    from p2pacs.gateway.pool import resolve_workers

    config = Config()
    assert config.dicom.workers == 0 and not config.check()
    assert resolve_workers(0) == (os.cpu_count() or 1) and resolve_workers(3) == 3
    config.dicom.workers = -1
    assert any("dicom.workers" in p for p in config.check())
