"""The one error tree of p2pacs.

Every message says what went wrong and what to do about it. Errors of other libraries (lmdb,
pydicom, pynetdicom, aiohttp, zeroconf) are translated into these at the module that calls them,
so callers only ever catch ``P2PacsError``.
"""

from __future__ import annotations

__all__ = [
    "AuditError",
    "BlobNotFoundError",
    "ConfigError",
    "CorruptBlobError",
    "DicomIndexError",
    "FederationError",
    "IdentityError",
    "IntegrityError",
    "InvalidDicomError",
    "MalformedDatasetError",
    "MembershipError",
    "ObjectStoreUnavailableError",
    "P2PacsError",
    "PeerUnavailableError",
    "RecoveryError",
    "ReplicationError",
    "StoreError",
    "StoreFullError",
    "TranscodeError",
    "TransferError",
    "WebError",
]


class P2PacsError(Exception):
    """Base of every error p2pacs raises on purpose."""


class ConfigError(P2PacsError):
    """A site directory or its config file is missing or invalid."""


class StoreError(P2PacsError):
    """The content-addressed blob store failed."""


class StoreFullError(StoreError):
    """The LMDB map is full; nothing already stored is lost. Raise ``map_size`` in the config."""


class ObjectStoreUnavailableError(StoreError):
    """The object store holding this site's instance bytes does not answer (or answers with
    5xx or throttling after every retry); nothing was acknowledged. Ingest resumes by itself
    once it answers again."""


class BlobNotFoundError(StoreError, KeyError):
    """No blob with this hash is stored here."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "blob not found"


class CorruptBlobError(StoreError):
    """A stored blob no longer matches its hash (disk corruption); repair it from a peer."""


class InvalidDicomError(P2PacsError):
    """The bytes are not a DICOM dataset p2pacs can index."""


class MalformedDatasetError(InvalidDicomError):
    """The dataset is not structurally whole (an element, item or delimiter is cut short, runs
    past its container or is missing); the message says at which byte and tag it broke."""


class TranscodeError(P2PacsError):
    """An instance cannot be converted to the transfer syntax asked for (no codec for its
    pixel data, an encoder that cannot hold the image, data the decoder refuses)."""


class DicomIndexError(P2PacsError):
    """The DICOM index could not answer or update."""


class FederationError(P2PacsError):
    """Federation set-up or operation failed."""


class IdentityError(FederationError):
    """A site or federation identity file is missing, unreadable or inconsistent."""


class MembershipError(FederationError):
    """A peer, certificate or record does not belong to this federation."""


class TransferError(P2PacsError):
    """Fetching from or serving to a peer failed."""


class PeerUnavailableError(TransferError):
    """No reachable peer holds what was asked for."""


class IntegrityError(TransferError):
    """Bytes did not match their BLAKE3 hash; they were discarded, never stored or served."""


class ReplicationError(P2PacsError):
    """Replication or repair could not restore the replication factor."""


class TrimRefusedError(ReplicationError):
    """A surplus copy was not dropped: the study changed here since it was checked."""


class RecoveryError(P2PacsError):
    """Whole-site recovery could not complete; run it again to resume."""


class WebError(P2PacsError):
    """The site's web server (status page, metrics) could not do what was asked."""


class AuditError(P2PacsError):
    """The audit trail cannot be set up (log directory, repository address, CA file)."""
