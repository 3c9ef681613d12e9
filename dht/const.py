"""Constants of dht/, each with its unit and the reason for its value (zeroconf's const.py)."""

from __future__ import annotations

K = 20  # Kademlia bucket size and replication factor (paper section 2.2; libp2p uses 20 too)
ALPHA = 3  # lookup parallelism (paper section 2.3)
ID_SIZE = 20  # bytes of a node ID / DHT key: 160 bits, as in the paper

MAX_DATAGRAM = 8192  # bytes; anything larger is dropped before it is parsed
MAX_RESPONSE_RECORDS_BYTES = 6000  # bytes of records packed into one find_value answer
MAX_VALUE = 1000  # bytes of plaintext value; BEP 44's cap, the app publishes < 200
MAX_TTL = 30 * 24 * 3600.0  # seconds; a record may not claim to live longer than 30 days

DATAGRAM_VERSION = 1  # first byte of every datagram; bump on any wire change
MAC_SIZE = 16  # bytes of keyed-BLAKE3 tag per datagram (128-bit, as Poly1305)
MSG_ID_SIZE = 8  # bytes; random per request, matches an answer to its request
REPLAY_WINDOW = 30.0  # seconds a datagram timestamp may differ from our clock
REPLAY_CACHE_MAX = 200_000  # remembered datagram tags; bounded so a flood cannot grow memory

RATE_PER_PEER = 200.0  # datagrams per second a single address may send us
BURST_PER_PEER = 400.0  # token-bucket depth per address
RATE_TABLE_MAX = 8192  # addresses tracked by the rate limiter (LRU beyond that)

RPC_TIMEOUT = 1.0  # seconds per RPC; a dead peer costs at most this (kademlia waits 5 s)
SILENT_FOR = 30.0  # seconds a contact that timed out is not asked again (unless it speaks first)
SILENT_MAX = 4096  # silent addresses remembered; bounded
REPUBLISH_INTERVAL = 3600.0  # seconds between republish rounds of our own records
DEFAULT_TTL = 48 * 3600.0  # seconds; libp2p provider-record lifetime
HELLO_CONCURRENCY = 32  # parallel identity checks of new contacts
CERT_CACHE_MAX = 4096  # verified certificates remembered per node
LOG_EVERY = 10.0  # seconds between repeated warnings a peer can trigger (QuietLogger)
