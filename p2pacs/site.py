"""A site directory: its config, its archive database, and (once enrolled) its identity.

Layout::

    SITE_DIR/site.toml       configuration
    SITE_DIR/db/             LMDB: blobs, DICOM index, federation state
    SITE_DIR/dht/            LMDB: DHT records held for the federation
    SITE_DIR/identity/       site key and certificate, federation CA and secret (0600)
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from p2pacs.archive import Archive
from p2pacs.config import CONFIG_NAME, Config
from p2pacs.errors import ConfigError

__all__ = ["Site", "default_site_dir"]


def default_site_dir() -> Path:
    """Per-user data directory, so the CLI works with no set-up (``$P2PACS_SITE`` overrides)."""
    env = os.environ.get("P2PACS_SITE")
    return Path(env) if env else Path(platformdirs.user_data_dir("p2pacs")) / "site"


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
        if create and not (path / CONFIG_NAME).exists():
            return cls.init(path)
        return cls(path, Config.load(path / CONFIG_NAME))

    def save_config(self) -> None:
        self.config.save(self.config_path)

    def archive(self) -> Archive:
        return Archive(
            self.db_path, map_size=self.config.store.map_size, sync=self.config.store.sync
        )
