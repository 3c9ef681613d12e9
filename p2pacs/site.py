"""A site directory: its config, its archive database, and (once enrolled) its identity.

Layout::

    SITE_DIR/site.toml       configuration
    SITE_DIR/db/             LMDB: blobs, DICOM index, federation state
    SITE_DIR/dht/            LMDB: DHT records held for the federation
    SITE_DIR/identity/       site key and certificate, federation CA and secret (0600)
    SITE_DIR/node.json       while a node runs: its pid and ports (``p2pacs.control.client``)
    SITE_DIR/node.lock       held (``fcntl.flock``) by the process running the site
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

import platformdirs

from p2pacs.archive import Archive
from p2pacs.config import CONFIG_NAME, Config
from p2pacs.errors import ConfigError

__all__ = [
    "LOCKFILE",
    "Site",
    "SiteLock",
    "SiteRunningError",
    "default_site_dir",
    "is_site",
    "lock_held",
    "lock_holder",
]

LOCKFILE = "node.lock"  # in the site directory; locked by the process that runs the site


class SiteRunningError(ConfigError):
    """Another process already runs this site (it holds ``node.lock``)."""

    def __init__(self, path: Path, pid: int | None):
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(
            f"site already running ({who}) at {path}; stop it first, or use 'p2pacs status'"
        )
        self.pid = pid


class SiteLock:
    """An exclusive ``flock`` on ``SITE/node.lock`` for as long as one process runs the site.

    The kernel drops the lock when the process dies (SIGKILL, power loss), so a lock that can
    be taken means no site process is running, whatever a stale ``node.json`` says.
    """

    def __init__(self, path: Path):
        self.path = path / LOCKFILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``SiteRunningError`` naming the holder's pid."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SiteRunningError(self.path.parent, lock_holder(self.path.parent)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> SiteLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def lock_held(path: Path) -> bool:
    """Whether a process holds the site's lock (probes without keeping it)."""
    try:
        fd = os.open(path / LOCKFILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def lock_holder(path: Path) -> int | None:
    """The pid written in the site's lock file, or None if unreadable."""
    try:
        return int((path / LOCKFILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def default_site_dir() -> Path:
    """Per-user data directory, so the CLI works with no set-up (``$P2PACS_SITE`` overrides)."""
    env = os.environ.get("P2PACS_SITE")
    return Path(env) if env else Path(platformdirs.user_data_dir("p2pacs")) / "site"


def is_site(path: Path) -> bool:
    """Whether ``path`` is a site directory (it holds a ``site.toml``)."""
    return (path / CONFIG_NAME).is_file()


class Site:
    """A site directory and its config; opens the archive on demand."""

    def __init__(self, path: Path, config: Config):
        self.path = path
        self.config = config

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def db_path(self) -> Path:
        return self.path / "db"

    @property
    def dht_path(self) -> Path:
        return self.path / "dht"

    @property
    def identity_path(self) -> Path:
        return self.path / "identity"

    @classmethod
    def init(cls, path: Path, config: Config | None = None) -> Site:
        """Create a site directory with a default config (an existing config is kept)."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create site directory {path}: {exc.strerror}") from exc
        cfg_path = path / CONFIG_NAME
        if cfg_path.exists():
            return cls(path, Config.load(cfg_path))
        site = cls(path, config or Config())
        site.config.save(cfg_path)
        return site

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> Site:
        """Open an existing site directory; only ``create`` (``init``) makes a new one."""
        if create and not (path / CONFIG_NAME).exists():
            return cls.init(path)
        if not path.is_dir():
            raise ConfigError(f"no site folder at {path} (it does not exist)")
        return cls(path, Config.load(path / CONFIG_NAME))

    def lock(self) -> SiteLock:
        """The lock the process running this site holds (``serve``; ``recover``/``scrub``
        when they start the site themselves)."""
        return SiteLock(self.path)

    def save_config(self) -> None:
        self.config.save(self.config_path)

    def archive(self) -> Archive:
        st = self.config.store
        objects = None
        if st.s3_bucket:  # boto3 is imported only by sites that use an object store
            from p2pacs.store.s3 import open_object_store

            objects = open_object_store(st, self.path)
        return Archive(
            self.db_path,
            map_size=st.map_size,
            sync=st.sync,
            objects=objects,
            offload=st.backend == "s3",
            inline_max=st.s3_inline_max,
        )
