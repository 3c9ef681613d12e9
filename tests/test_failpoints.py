"""Failpoints: parsed from the environment's syntax, armed in-process, inert when off."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pacs import failpoints
from p2pacs.errors import P2PacsError, StoreError
from p2pacs.failpoints import FailpointError
from p2pacs.store import SiteDB


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    failpoints.arm("")
    yield
    failpoints.arm("")


def test_parse_accepts_each_action_and_names_what_is_wrong() -> None:
    armed = failpoints.parse(
        "store.commit=crash, transfer.send=error:0.25,recovery.study=delay:1.5"
    )
    assert {k: (a.kind, a.value) for k, a in armed.items()} == {
        "store.commit": ("crash", 1.0),
        "transfer.send": ("error", 0.25),
        "recovery.study": ("delay", 1.5),
    }
    assert failpoints.parse("") == {}
    for bad in ("nowhere=crash", "dht.put", "dht.put=explode", "dht.put=error:0", "dht.put=delay"):
        with pytest.raises(ValueError, match="P2PACS_FAILPOINTS"):
            failpoints.parse(bad)


async def test_error_raises_the_class_the_caller_expects() -> None:
    failpoints.hit("dht.put")  # not armed: nothing happens
    failpoints.arm("dht.put=error")
    with pytest.raises(FailpointError, match=r"dht\.put"):
        failpoints.hit("dht.put")
    with pytest.raises(StoreError):
        await failpoints.async_hit("dht.put", StoreError)
    assert issubclass(FailpointError, P2PacsError)


def test_store_commit_error_fails_the_write_and_loses_nothing_committed(tmp_path: Path) -> None:
    db = SiteDB(tmp_path / "db")
    try:
        table = db.db("t")
        db.write(lambda txn: txn.put(b"a", b"1", db=table))
        failpoints.arm("store.commit=error")
        with pytest.raises(StoreError, match=r"store\.commit"):
            db.write(lambda txn: txn.put(b"b", b"2", db=table))
        failpoints.arm("")
        with db.read() as txn:
            assert txn.get(b"a", db=table) == b"1" and txn.get(b"b", db=table) is None
    finally:
        db.close()


def test_crash_kills_the_process_at_the_point(tmp_path: Path) -> None:
    """Armed from the environment, as the fault tests arm a site process."""
    code = (
        "from pathlib import Path; from p2pacs.store import SiteDB\n"
        f"db = SiteDB(Path({str(tmp_path / 'db')!r})); t = db.db('t')\n"
        "db.write(lambda txn: txn.put(b'a', b'1', db=t))\n"
        "print('unreachable')\n"
    )
    env = {**os.environ, "P2PACS_FAILPOINTS": "store.commit=crash"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == -9, done.stderr.decode()
    assert b"unreachable" not in done.stdout
