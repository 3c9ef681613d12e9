"""``p2pacs status --watch``: redraws in place on a terminal until Ctrl-C, then exits 0."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from p2pacs.cli import main

FRAMES_TIMEOUT = 30.0  # seconds to see three frames at 0.2 s each (a loaded machine)


def _read_until(fd: int, done: bytes, count: int, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while out.count(done) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    return out


def test_watch_redraws_until_ctrl_c(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    assert main(["--site", str(folder), "init"]) == 0
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "LINES": "40", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pacs", "--site", str(folder), "status", "--watch", "0.2"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    try:
        out = _read_until(master, b"updated", 3, FRAMES_TIMEOUT)
        assert out.count(b"updated") >= 3, out.decode(errors="replace")
        assert b"not running" in out and b"Ctrl-C to stop" in out
        assert b"\x1b[" in out  # drawn in place with cursor movements, not appended
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)


def test_watch_refuses_json_and_bad_intervals(tmp_path: Path) -> None:
    folder = str(tmp_path / "site")
    assert main(["--site", folder, "init"]) == 0
    assert main(["--site", folder, "status", "--watch", "--json"]) == 2
    assert main(["--site", folder, "status", "--watch", "0"]) == 2
