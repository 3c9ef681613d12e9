"""A site's configuration: one TOML file, ``site.toml``, in the site directory.

Every field has a working default, so ``p2pacs init`` (or the first command run against an empty
directory) yields a usable single-site archive; enrollment in a federation fills the
``[federation]`` table. ``p2pacs config get/set section.key`` reads and edits it with the same
checks as loading it (``Config.get_key``, ``Config.set_key``, ``Config.check``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from p2pacs import const, credentials
from p2pacs.errors import ConfigError

__all__ = [
    "CONFIG_NAME",
    "AuditConfig",
    "Config",
    "DicomConfig",
    "FederationConfig",
    "StoreConfig",
    "WebConfig",
    "parse_hostport",
    "parse_value",
]

PORT_SETTINGS = {  # the setting an operator changes when a listener's port is taken
    "dicom": "dicom.port",
    "transfer": "federation.transfer_port",
    "dht": "federation.dht_port",
    "web": "web.port",
}

CONFIG_NAME = "site.toml"


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) to a tuple; a clear ConfigError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        if default_port is None:
            raise ConfigError(f"{text!r} is not host:port")
        host, port = text.strip(), str(default_port)
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{text!r}: port {port!r} is not a number") from None
    if not host or not 0 < number < 65536:
        raise ConfigError(f"{text!r} is not a valid host:port")
    return host, number


@dataclass(slots=True)
class StoreConfig:
    map_size: int = const.DEFAULT_MAP_SIZE  # bytes of address space for the LMDB map
    sync: bool = True  # fsync every commit; never turn off for clinical data
    # where instance bytes live (docs/operations.md "Instance bytes on an object store"): "lmdb"
    # (in the site database) or "s3" (an S3-compatible object store; the index stays in LMDB)
    backend: str = "lmdb"
    s3_endpoint: str = ""  # "https://host:port"; empty: AWS's own endpoint for s3_region
    s3_bucket: str = ""
    s3_prefix: str = "p2pacs/"  # key prefix; give each site its own when sites share a bucket
    s3_region: str = "us-east-1"
    s3_addressing: str = "path"  # "path" (SeaweedFS, MinIO, Ceph RGW), "virtual" (AWS), "auto"
    s3_verify_tls: bool = True  # never turn off outside a test bench
    s3_ca_bundle: str = ""  # PEM file of the CA behind the endpoint's certificate; empty: system
    # TOML file with access_key_id and secret_access_key, mode 0600, relative to the site folder;
    # empty: the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or instance credentials
    s3_credentials_file: str = ""
    s3_inline_max: int = const.INLINE_MAX  # bytes: blobs up to this stay in LMDB
    s3_multipart_threshold: int = const.MULTIPART_THRESHOLD  # bytes: larger go up in parts


@dataclass(slots=True)
class DicomConfig:
    ae_title: str = const.DEFAULT_AE_TITLE
    port: int = const.DEFAULT_DICOM_PORT
    bind: str = "0.0.0.0"
    max_pdu: int = const.DEFAULT_MAX_PDU
    allowed_calling_aets: list[str] = field(default_factory=list)  # empty: accept any calling AE
    destinations: dict[str, str] = field(default_factory=dict)  # C-MOVE AE title -> "host:port"
    network_timeout: float = 60.0  # seconds of silence before an association is dropped
    # C-GET/C-MOVE: when a peer accepted, of what we can encode, only a lossy syntax (JPEG
    # 2000; JPEG Baseline for 8-bit images), send it lossy-compressed copies (off: such a
    # sub-operation fails). Stored bytes never change either way.
    lossy_transcoding: bool = False
    # gateway processes sharing the DICOM port: 0 = one per core, 1 = the gateway runs in the
    # site's own process (docs/architecture.md, "Gateway workers")
    workers: int = 0


@dataclass(slots=True)
class FederationConfig:
    enabled: bool = False
    name: str = ""  # site name, the CN of its certificate
    host: str = "127.0.0.1"  # address other sites use to reach this one
    bind: str = "0.0.0.0"
    dht_port: int = const.DEFAULT_DHT_PORT
    transfer_port: int = const.DEFAULT_TRANSFER_PORT
    bootstrap: list[str] = field(default_factory=list)  # "host:dht_port" of sites in other networks
    discovery: bool = True  # announce and browse with mDNS on the local network
    replication: int = const.DEFAULT_REPLICATION
    # seconds without an answer before a member is down: five missed heartbeats (two make it
    # suspect, still live); long enough for a busy site's slow answer, short enough that R is
    # restored within seconds of a crash
    down_after: float = 10.0
    repair_interval: float = 10.0  # seconds between anti-entropy passes
    record_ttl: float = const.RECORD_TTL  # seconds a DHT record lives unless republished
    dht_capacity: int = const.DHT_CAPACITY  # bytes the DHT record store may use
    recover_give_up: float = 600.0  # seconds a study may keep failing before recover reports it
    metadata_grace: float = 3600.0  # seconds superseded catalogue nodes and manifests are kept
    # seconds a study must stay over-replicated (every member up) before a surplus copy, one
    # outside its placement, is dropped; 0 never drops one. A day: an outage's copies outlive
    # the usual flaps and restarts, and the archive still shrinks back within days
    trim_after: float = 86400.0


LOOPBACK_HOSTS = ("localhost", "::1")  # besides 127.0.0.0/8: where plain HTTP may listen


@dataclass(slots=True)
class WebConfig:
    """The site's web server: status page, ``/status.json`` and ``/metrics`` (docs/security.md).

    HTTPS with the given certificate; plain HTTP only when asked for and bound to loopback.
    Every request needs a bearer token or a user's password (both stored hashed here, written
    by ``p2pacs web token add`` / ``p2pacs web user add``)."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = const.DEFAULT_WEB_PORT  # 0: any free port (the one taken is in node.json)
    tls_cert: str = ""  # PEM certificate chain (a path; relative to the site folder)
    tls_key: str = ""  # its PEM private key
    plain_http: bool = False  # no TLS: allowed only when bind is a loopback address
    tokens: dict[str, str] = field(default_factory=dict)  # name -> "sha256$HEX" of the token
    users: dict[str, str] = field(default_factory=dict)  # name -> "scrypt$N$r$p$SALT$HASH"
    refresh: float = 5.0  # seconds between refreshes of the status page in the browser
    # origins ("https://viewer.example:8443") whose pages may call this server from a browser
    # (CORS, e.g. a web viewer on another host or port); empty: same origin only
    cors_origins: list[str] = field(default_factory=list)
    dicomweb: bool = True  # serve DICOMweb (QIDO/WADO/STOW-RS) at /dicomweb (docs/dicomweb.md)

    def check(self) -> list[str]:
        problems = []
        if not 0 <= self.port < 65536:
            problems.append(
                f"web.port = {self.port} is not a port (1-65535, or 0 for any free one)"
            )
        if not self.refresh > 0:
            problems.append(f"web.refresh = {self.refresh} must be more than 0 seconds")
        for name, stored in self.users.items():
            why = credentials.password_problem(stored) if isinstance(stored, str) else "not text"
            if why:
                problems.append(f"web.users.{name}: {why} (set it with 'p2pacs web user add')")
        for name, stored in self.tokens.items():
            why = credentials.token_problem(stored) if isinstance(stored, str) else "not text"
            if why:
                problems.append(f"web.tokens.{name}: {why} (make one with 'p2pacs web token add')")
        for origin in self.cors_origins:
            why = origin_problem(origin) if isinstance(origin, str) else "not text"
            if why:
                problems.append(f"web.cors_origins: {origin!r}: {why}")
        if not self.enabled:
            return problems
        if not self.users and not self.tokens:
            problems.append(
                "web.enabled needs a web user or token first: 'p2pacs web user add NAME' or "
                "'p2pacs web token add NAME'"
            )
        if self.plain_http:
            if not is_loopback(self.bind):
                problems.append(
                    f"web.plain_http is allowed only on a loopback bind, not {self.bind!r}: "
                    "give web.tls_cert and web.tls_key instead"
                )
        elif not (self.tls_cert and self.tls_key):
            problems.append(
                "web.enabled needs web.tls_cert and web.tls_key (PEM files) for HTTPS, or "
                "web.plain_http = true with a loopback web.bind"
            )
        return problems


def origin_problem(origin: str) -> str:
    """Why ``origin`` is not a web origin as a browser sends it (RFC 6454: scheme://host[:port],
    no path, no trailing slash), or "" when it is."""
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        return "expected http://HOST[:PORT] or https://HOST[:PORT]"
    if "/" in rest or "?" in rest or "#" in rest or "*" in rest or origin != origin.strip():
        return "an origin has no path, wildcard or trailing slash"
    return ""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface only."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class AuditConfig:
    """The IHE ATNA audit trail (docs/operations.md, "Audit trail")."""

    enabled: bool = True  # write DICOM audit messages to the local log (and repositories)
    log_dir: str = ""  # the local audit log; empty: SITE_DIR/audit (relative: in SITE_DIR)
    log_max_bytes: int = 16 << 20  # bytes per log segment before the next one is started
    log_keep: int = 0  # delivered segments kept besides the current one; 0: keep all
    repositories: list[str] = field(default_factory=list)  # "tls://host:port", "udp://host:port"
    ca_file: str = ""  # CA certificate(s) the TLS repositories are verified against
    client_cert: bool = False  # present the site's federation certificate to TLS repositories


@dataclass(slots=True)
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    web: WebConfig = field(default_factory=WebConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"no {CONFIG_NAME} at {path.parent}; run 'p2pacs init' there"
            ) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"cannot read {path}: not a text file ({exc})") from exc
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        config = cls(
            store=_section(StoreConfig, raw, "store", path),
            dicom=_section(DicomConfig, raw, "dicom", path),
            federation=_section(FederationConfig, raw, "federation", path),
            web=_section(WebConfig, raw, "web", path),
            audit=_section(AuditConfig, raw, "audit", path),
        )
        unknown = sorted(set(raw) - {"store", "dicom", "federation", "web", "audit"})
        if unknown:
            raise ConfigError(f"{path}: unknown table(s): {', '.join(unknown)}")
        problems = config.check()
        if problems:
            raise ConfigError(f"{path}: " + "; ".join(problems))
        return config

    def save(self, path: Path) -> None:
        """Write atomically (a reader never sees half a file)."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(tomli_w.dumps(dataclasses.asdict(self)))
        os.replace(tmp, path)

    def check(self) -> list[str]:
        """What is wrong with the values (each problem names its key); empty when all is well."""
        problems: list[str] = []
        d, f, st = self.dicom, self.federation, self.store
        for key, port in (
            ("dicom.port", d.port),
            ("federation.transfer_port", f.transfer_port),
            ("federation.dht_port", f.dht_port),
        ):
            if not 0 <= port < 65536:
                problems.append(f"{key} = {port} is not a port (1-65535, or 0 for any free one)")
        if f.enabled and d.port and d.port == f.transfer_port and d.bind == f.bind:
            problems.append(
                f"dicom.port and federation.transfer_port are both {d.port} (both TCP): "
                "give them different ports"
            )
        if not 0 < len(d.ae_title.strip()) <= 16:
            problems.append(f"dicom.ae_title {d.ae_title!r} must be 1 to 16 characters")
        for ae, addr in d.destinations.items():
            if not 0 < len(ae) <= 16:
                problems.append(f"dicom.destinations: AE title {ae!r} must be 1 to 16 characters")
            if not isinstance(addr, str):
                problems.append(f'dicom.destinations.{ae} must be "host:port"')
                continue
            try:
                parse_hostport(addr)
            except ConfigError as exc:
                problems.append(f"dicom.destinations.{ae}: {exc}")
        for b in f.bootstrap:
            try:
                parse_hostport(b)
            except ConfigError as exc:
                problems.append(f"federation.bootstrap: {exc}")
        if d.max_pdu < 0:
            problems.append("dicom.max_pdu must be 0 (unlimited) or more")
        if not 0 <= d.workers <= 256:
            problems.append(f"dicom.workers = {d.workers} must be 0 (one per core) to 256")
        if f.replication < 1:
            problems.append(f"federation.replication = {f.replication} must be 1 or more")
        for key, value in (
            ("dicom.network_timeout", d.network_timeout),
            ("federation.down_after", f.down_after),
            ("federation.repair_interval", f.repair_interval),
            ("federation.record_ttl", f.record_ttl),
            ("federation.recover_give_up", f.recover_give_up),
            ("federation.metadata_grace", f.metadata_grace),
        ):
            if not value > 0:
                problems.append(f"{key} = {value} must be more than 0 seconds")
        if not f.trim_after >= 0:
            problems.append(f"federation.trim_after = {f.trim_after} must be 0 (never) or more")
        if st.map_size < 1 << 20:
            problems.append(f"store.map_size = {st.map_size} must be at least 1 MiB (1048576)")
        problems.extend(self.web.check())
        if self.web.enabled and self.web.port:
            for key, port in (
                ("dicom.port", d.port),
                ("federation.transfer_port", f.transfer_port),
            ):
                if port == self.web.port:
                    problems.append(
                        f"web.port and {key} are both {port}: give them different ports"
                    )
        problems += _audit_problems(self.audit)
        problems.extend(_store_problems(st))
        return problems

    # --- one setting at a time: 'p2pacs config get/set' ---------------------------------------

    def get_key(self, key: str) -> Any:
        """The value of ``section.key`` (e.g. ``federation.dht_port``)."""
        section, name = _split_key(key)
        return getattr(getattr(self, section), name)

    def set_key(self, key: str, text: str) -> Any:
        """Set ``section.key`` from its command-line text, checked like a loaded file; returns
        the value set. Nothing changes when the value is refused."""
        section, name = _split_key(key)
        table = getattr(self, section)
        current = getattr(table, name)
        value = parse_value(text, current, key)
        changed = dataclasses.replace(table, **{name: value})
        problems = dataclasses.replace(self, **{section: changed}).check()
        if problems:
            raise ConfigError("; ".join(problems))
        setattr(table, name, value)
        return value

    @staticmethod
    def setting_keys() -> list[str]:
        """Every ``section.key`` a site.toml may hold."""
        sections: dict[str, Any] = {
            "store": StoreConfig,
            "dicom": DicomConfig,
            "federation": FederationConfig,
            "web": WebConfig,
            "audit": AuditConfig,
        }
        return [
            f"{name}.{f.name}" for name, kind in sections.items() for f in dataclasses.fields(kind)
        ]


def _audit_problems(a: AuditConfig) -> list[str]:
    problems = []
    if a.log_max_bytes < 4096:
        problems.append(f"audit.log_max_bytes = {a.log_max_bytes} must be at least 4096")
    if a.log_keep < 0:
        problems.append(f"audit.log_keep = {a.log_keep} must be 0 (keep all) or more")
    for repo in a.repositories:
        scheme, sep, rest = repo.partition("://")
        if scheme not in ("tls", "udp") or not sep:
            problems.append(
                f"audit.repositories: {repo!r} must be tls://host:port or udp://host:port"
            )
            continue
        try:
            parse_hostport(rest, 6514 if scheme == "tls" else 514)
        except ConfigError as exc:
            problems.append(f"audit.repositories: {exc}")
    return problems


def _store_problems(st: StoreConfig) -> list[str]:
    """The object-store settings (``backend = "s3"``) checked."""
    problems = []
    if st.backend not in ("lmdb", "s3"):
        problems.append(f'store.backend = {st.backend!r} must be "lmdb" or "s3"')
    if st.backend == "s3" and not st.s3_bucket:
        problems.append('store.backend = "s3" needs store.s3_bucket')
    if st.s3_addressing not in ("path", "virtual", "auto"):
        problems.append(f'store.s3_addressing = {st.s3_addressing!r}: "path", "virtual" or "auto"')
    if st.s3_endpoint and not st.s3_endpoint.startswith(("http://", "https://")):
        problems.append(f"store.s3_endpoint = {st.s3_endpoint!r} must start with https://")
    if st.s3_inline_max < 0:
        problems.append("store.s3_inline_max must be 0 or more bytes")
    if st.s3_multipart_threshold < 5 << 20:
        problems.append("store.s3_multipart_threshold must be at least 5 MiB (S3's least part)")
    return problems


def _split_key(key: str) -> tuple[str, str]:
    section, dot, name = key.partition(".")
    if not dot or key not in Config.setting_keys():
        raise ConfigError(
            f"unknown setting {key!r}; known settings: {', '.join(Config.setting_keys())}"
        )
    return section, name


def parse_value(text: str, current: Any, key: str) -> Any:
    """Command-line text to a value of ``current``'s type: numbers with an optional k/M/G/T
    binary suffix for sizes, true/false, comma-separated lists, ``AE=host:port,...`` tables,
    or any TOML value (``[...]``, ``{...}``)."""
    kind = type(current)
    text = text.strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if kind is int:
            units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
            suffix = text[-1:].lower()
            if suffix in units:
                return int(float(text[:-1]) * units[suffix])
            return int(text, 0)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if kind is list:
            if text.startswith("["):
                value = tomllib.loads(f"v = {text}")["v"]
            else:
                value = [item.strip() for item in text.split(",") if item.strip()]
            if not all(isinstance(v, str) for v in value):
                raise ValueError
            return value
        if kind is dict:
            if text.startswith("{"):
                value = tomllib.loads(f"v = {text}")["v"]
            else:
                value = {}
                for item in filter(None, (i.strip() for i in text.split(","))):
                    name, sep, addr = item.partition("=")
                    if not sep:
                        raise ValueError
                    value[name.strip()] = addr.strip()
            return value
    except (ValueError, tomllib.TOMLDecodeError):
        pass
    hint = {
        bool: "true or false",
        int: "a whole number (sizes may end in k, M, G or T)",
        float: "a number",
        list: "a comma-separated list",
        dict: "AE=HOST:PORT[,AE=HOST:PORT...]",
    }.get(kind, kind.__name__)
    raise ConfigError(f"{key}: {text!r} is not {hint}")


S = TypeVar("S")


def _section(kind: type[S], raw: dict[str, Any], name: str, path: Path) -> S:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    known = {f.name: f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [{name}]: {', '.join(unknown)}")
    defaults = kind()
    values: dict[str, Any] = {}
    for key, given in table.items():
        expected = type(getattr(defaults, key))
        value = float(given) if expected is float and isinstance(given, int) else given
        if not isinstance(value, expected):
            raise ConfigError(f"{path}: [{name}] {key} must be {expected.__name__}, not {value!r}")
        values[key] = value
    return kind(**values)
