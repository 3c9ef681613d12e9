"""Constants of p2pacs, each with its unit and reason (zeroconf's const.py is the model)."""

from __future__ import annotations

CHUNK_SIZE = 1024 * 1024  # bytes; blobs above this are split so reads stream and ranges are cheap
DEFAULT_MAP_SIZE = (
    1 << 40
)  # bytes (1 TiB); LMDB reserves address space only, the file grows as used
MAX_DBS = 32  # LMDB named sub-databases a site may open (store, index, federation state)

GROUP_COMMIT_MAX_JOBS = 256  # write jobs folded into one LMDB transaction (one fsync)
GROUP_COMMIT_MAX_BYTES = 64 * 1024 * 1024  # bytes per group commit, bounds the dirty set in RAM
WRITE_TIMEOUT = 120.0  # seconds a caller waits for its write to be durable before giving up

HASH_HEX_LEN = 64  # hex characters of a BLAKE3-256 digest

DEFAULT_AE_TITLE = "P2PACS"
DEFAULT_DICOM_PORT = 11112  # IANA-registered DICOM port, unprivileged
DEFAULT_TRANSFER_PORT = 11180  # HTTPS peer-transfer API
DEFAULT_DHT_PORT = 11190  # UDP Kademlia
DEFAULT_REPLICATION = 2  # R: sites holding every study (design.md)
DEFAULT_MAX_PDU = 0  # 0 = unlimited; pynetdicom's fastest setting for large instances
# seconds pynetdicom's polling DUL thread sleeps when idle (its default: 1 ms); p2pacs's own
# associations wait on events instead (dicom/reactor.py): only the bench's bare-pynetdicom baseline
DUL_POLL_DELAY = 0.0001

RECORD_TTL = 48 * 3600.0  # seconds a DHT record lives unless republished (libp2p's 48 h)
DHT_CAPACITY = 4 << 30  # bytes: ~3 M DHT records of ~1.3 KB held for the federation (sparse)
STATUS_SCHEMA = 1  # "schema" of status's JSON: raised when a field changes meaning or goes
DEFAULT_WEB_PORT = 11443  # HTTPS status page and /metrics (and later DICOMweb)

# --- object store (store.backend = "s3") ---
INLINE_MAX = 64 * 1024  # bytes: blobs up to this stay in LMDB (manifests, catalogues, tiny SRs):
# an object-store round trip costs more than 64 KiB of LMDB, and the index stays small either way
OBJECT_PROBE_INTERVAL = 1.0  # seconds between attempts while the object store is down; the
# C-STOREs in between fail at once (0xA700) instead of each waiting out the timeouts
OBJECT_CONNECT_TIMEOUT = 3.0  # seconds to open a connection to the object store
OBJECT_READ_TIMEOUT = 30.0  # seconds of silence on an open object-store connection
OBJECT_MAX_ATTEMPTS = 4  # tries per request (botocore "standard" retry: throttling, 5xx, resets,
# exponential backoff with jitter); the first outage costs up to ~10 s, then the probe rules
OBJECT_POOL = 32  # connections kept to the object store (parallel C-STORE associations + fetches)
MULTIPART_THRESHOLD = 64 * 1024 * 1024  # bytes: larger instances go up in parts of this size
ORPHAN_GRACE = 3600.0  # seconds an unindexed object is left alone by the sweep (a PUT whose
# index commit is still on its way must never be swept)
ORPHAN_SWEEP_INTERVAL = 6 * 3600.0  # seconds between sweeps of orphan objects by a running site
# seconds 'recover' waits, while a wiped site has not found its last site record (no member
# answers, or none holds it), before it exits 1 saying why (the site keeps looking meanwhile):
# long enough for a restarting member to answer, short enough for on-call to hear within a minute
RECOVER_WAIT = 60.0
RECOVER_NOTICE_EVERY = 5.0  # seconds between 'recover's reminders of what it is waiting for
