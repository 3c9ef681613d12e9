"""rsync over ssh on loopback: the copy an administrator would use instead of p2pacs.

``RsyncOverSsh`` starts a throwaway ``sshd`` on 127.0.0.1 (a free port, host and user keys made
with ``ssh-keygen`` in a temporary folder, no PAM, key login only), and ``copy(src, dst)`` runs

    rsync -a --whole-file --fsync -e "ssh -p P -i KEY ... -c aes128-gcm@openssh.com" SRC/ \
        root@127.0.0.1:DST/

and returns its wall-clock seconds (ssh's connection set-up included, as for a user). The sshd
is stopped by its pid file on exit: only the process this module started. Nothing is installed
here: without rsync or openssh-server (Debian packages ``rsync`` and ``openssh-server``) the
benchmark stops with a message saying so. ``--fsync`` is used when the installed rsync has it
(3.2.4 and later); ``fsync`` says whether it was.

    with RsyncOverSsh() as rsync:
        seconds = rsync.copy(Path("a"), Path("b"))
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from p2pacs.testbed import free_port

__all__ = ["RsyncOverSsh", "require_tools", "rsync_version"]

SSHD = "/usr/sbin/sshd"
TOOLS = ("rsync", "ssh", "ssh-keygen")
CIPHER = "aes128-gcm@openssh.com"
START_TIMEOUT = 15.0  # seconds for sshd to accept connections
STOP_TIMEOUT = 10.0  # seconds for sshd to exit after SIGTERM


def require_tools() -> None:
    """Stop the benchmark with a clear message unless rsync, ssh and sshd are installed."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    if missing:
        raise SystemExit(
            f"the rsync baseline needs {', '.join(missing)}, not found on this machine: install "
            "the Debian packages rsync and openssh-server (apt-get install rsync openssh-server)"
        )


def rsync_version() -> str:
    """The installed rsync's version, e.g. ``3.2.7``."""
    out = subprocess.run(
        ["rsync", "--version"], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[2] if len(out) > 2 and out[0] == "rsync" and out[1] == "version" else "unknown"


def rsync_has_fsync() -> bool:
    """Whether the installed rsync has ``--fsync`` (fsync every received file; 3.2.4+)."""
    help_text = subprocess.run(
        ["rsync", "--help"], capture_output=True, text=True, check=False
    ).stdout
    return "--fsync" in help_text


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "p2pacs-bench", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _accepts(port: int) -> bool:
    """True once something on 127.0.0.1:port answers with an SSH banner."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


class RsyncOverSsh:
    """A throwaway sshd on loopback and rsync over ssh into it (a context manager)."""

    def __init__(self) -> None:
        require_tools()
        self.version = rsync_version()
        self.fsync = rsync_has_fsync()
        self.user = getpass.getuser()
        self.port = 0
        self._tmp: Path | None = None
        self._pid_file: Path | None = None

    def __enter__(self) -> RsyncOverSsh:
        self._tmp = Path(tempfile.mkdtemp(prefix="p2pacs-bench-sshd-"))
        try:
            self._start(self._tmp)
        except BaseException:
            self._stop()
            raise
        return self

    def _start(self, tmp: Path) -> None:
        _keygen(tmp / "host_key")
        _keygen(tmp / "user_key")
        self.port = free_port()
        self._pid_file = tmp / "sshd.pid"
        config = tmp / "sshd_config"
        config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {tmp / 'host_key'}\n"
            f"AuthorizedKeysFile {tmp / 'user_key.pub'}\n"
            f"PidFile {self._pid_file}\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "LogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir
        started = subprocess.run(
            [SSHD, "-f", str(config), "-E", str(tmp / "sshd.log")],
            capture_output=True,
            text=True,
            check=False,
        )
        if started.returncode != 0:
            raise RuntimeError(f"sshd did not start: {started.stderr.strip()}")
        deadline = time.monotonic() + START_TIMEOUT
        while not (self._pid_file.exists() and _accepts(self.port)):
            if time.monotonic() > deadline:
                log = (tmp / "sshd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"sshd on port {self.port} did not answer: {log}")
            time.sleep(0.05)

    def ssh_command(self) -> str:
        """The ``-e`` argument for rsync."""
        assert self._tmp is not None
        return (
            f"ssh -p {self.port} -i {self._tmp / 'user_key'} -o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR "
            f"-c {CIPHER}"
        )

    def copy(self, src_dir: Path, dst_dir: Path) -> float:
        """Seconds for ``rsync -a --whole-file [--fsync]`` of ``src_dir``'s content into
        ``dst_dir`` (made if missing) over ssh to this sshd; raises if rsync fails."""
        dst_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["rsync", "-a", "--whole-file", *(["--fsync"] if self.fsync else [])]
        cmd += ["-e", self.ssh_command()]
        cmd += [f"{src_dir.resolve()}/", f"{self.user}@127.0.0.1:{dst_dir.resolve()}/"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(
                f"rsync exited with {done.returncode}: {done.stderr.strip()[-2000:]}"
            )
        return seconds

    def _stop(self) -> None:
        """SIGTERM the sshd whose pid is in our pid file (the listener we started; sessions
        it forked end with their rsync), then remove the keys and config."""
        pid_file, tmp = self._pid_file, self._tmp
        self._pid_file = self._tmp = None
        try:
            if pid_file is not None and pid_file.exists():
                pid = int(pid_file.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if _alive(pid) else b""
                if str(pid_file.parent).encode() in cmdline:  # ours: started with our config
                    os.kill(pid, signal.SIGTERM)
                    deadline = time.monotonic() + STOP_TIMEOUT
                    while _alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is not alive
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True
