"""The site's storage: one LMDB environment, a content-addressed blob store on it, and the
seam to an object store for instance bytes (``store.backend = "s3"``)."""

from __future__ import annotations

from p2pacs.store.blobs import BlobStore, BlobWrite
from p2pacs.store.changelog import ChangeLog
from p2pacs.store.db import SiteDB
from p2pacs.store.hashing import hash_bytes, hashed_bytes
from p2pacs.store.layout import BlobInfo
from p2pacs.store.objects import ObjectStore, object_key

__all__ = [
    "BlobInfo",
    "BlobStore",
    "BlobWrite",
    "ChangeLog",
    "ObjectStore",
    "SiteDB",
    "hash_bytes",
    "hashed_bytes",
    "object_key",
]
