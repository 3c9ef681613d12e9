"""The local audit log: 0600 files, fsync'd records, size rotation, a torn tail cut off,
cursors that survive a reopen; the octet-counting parser refuses corrupt counts."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from p2pacs.audit.log import AuditLog, Cursor
from p2pacs.audit.syslog import octet_count, parse_repository, read_frames
from p2pacs.errors import AuditError


def records(n: int, size: int = 100) -> list[bytes]:
    return [f"<85>1 - h p2pacs 1 IHE+RFC-3881 - record {i:04d} ".encode().ljust(size, b"x")
            for i in range(n)]  # fmt: skip


def test_append_read_and_mode(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", max_bytes=1 << 20)
    log.append(records(3))
    seg = log.path(log.current)
    assert stat.S_IMODE(seg.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "audit").stat().st_mode) == 0o700
    got = list(log.read_from(Cursor(1, 0), 10))
    assert [r for _, r in got] == records(3)
    assert got[-1][0] == log.end()
    assert list(log.read_from(log.end(), 10)) == []
    # the file is the records octet-counted, one per line: readable as syslog over TLS
    assert [f for _, f in read_frames(seg.read_bytes(), lines=True)] == records(3)


def test_rotation_by_size_and_reading_across_segments(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, max_bytes=4096)
    for chunk in range(10):
        log.append(records(10)[chunk : chunk + 1] * 10)
    assert len(log.segments()) > 1
    assert all(log.path(s).stat().st_size <= 4096 + 10 * 110 for s in log.segments())
    got = [r for _, r in log.read_from(Cursor(1, 0), 1000)]
    assert len(got) == 100
    # in pieces, from saved cursors, nothing skipped or repeated
    cursor, pieces = Cursor(1, 0), []
    while True:
        batch = list(log.read_from(cursor, 7))
        if not batch:
            break
        pieces += [r for _, r in batch]
        cursor = batch[-1][0]
    assert pieces == got


def test_torn_tail_is_cut_on_open(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, max_bytes=1 << 20)
    log.append(records(2))
    log.close()
    seg = log.path(1)
    with seg.open("ab") as f:
        f.write(octet_count(records(1)[0])[:50])  # a crash mid-append
    log = AuditLog(tmp_path, max_bytes=1 << 20)
    assert [r for _, r in log.read_from(Cursor(1, 0), 10)] == records(2)
    log.append(records(1))
    assert len(list(log.read_from(Cursor(1, 0), 10))) == 3


def test_cursors_persist_and_start_at_the_end(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, max_bytes=1 << 20)
    log.append(records(2))
    assert log.cursor("tls://a:1") == log.end()  # new repository: from now on
    log.save_cursor("tls://a:1", Cursor(1, 5))
    log.close()
    log = AuditLog(tmp_path, max_bytes=1 << 20)
    assert log.cursor("tls://a:1") == Cursor(1, 5)
    (tmp_path / "cursor-tls_a_1.json").write_text("{nonsense")
    with pytest.raises(AuditError, match="remove it"):
        log.cursor("tls://a:1")


def test_prune_keeps_what_a_repository_still_needs(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, max_bytes=4096, keep=1)
    for _ in range(6):
        log.append(records(40))
    assert len(log.segments()) == 6
    log.prune([Cursor(3, 0)])  # a repository still needs segment 3
    assert log.segments() == [2, 3, 4, 5, 6]  # 1 removed, 2 kept (keep=1)


def test_corrupt_counts_are_refused() -> None:
    with pytest.raises(AuditError):
        list(read_frames(b"12x4 abc"))
    with pytest.raises(AuditError):
        list(read_frames(b"99999999999 abc"))
    assert list(read_frames(b"5 abc")) == []  # incomplete: wait for the rest


@pytest.mark.parametrize("text", ["http://a:1", "tls://", "udp://h:99999", "h:514"])
def test_bad_repository_addresses(text: str) -> None:
    with pytest.raises(AuditError):
        parse_repository(text)
    assert parse_repository("tls://127.0.0.1").port == 6514


def test_a_record_larger_than_a_read_chunk(tmp_path: Path) -> None:
    from p2pacs.audit.log import READ_CHUNK

    log = AuditLog(tmp_path, max_bytes=1 << 30)
    big = records(1, 3 * READ_CHUNK)
    log.append(records(2) + big + records(2))
    got = [r for _, r in log.read_from(Cursor(1, 0), 10)]
    assert got == records(2) + big + records(2)
