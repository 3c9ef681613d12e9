"""The site's storage: one LMDB environment, a content-addressed blob store on it."""

from __future__ import annotations

from p2pacs.store.blobs import BlobInfo, BlobStore, hash_bytes, hashed_bytes
from p2pacs.store.changelog import ChangeLog
from p2pacs.store.db import SiteDB

__all__ = ["BlobInfo", "BlobStore", "ChangeLog", "SiteDB", "hash_bytes", "hashed_bytes"]
