"""``p2pacs doctor``: find what keeps a site from working, before a person has to.

Each check returns a ``Check`` (what was checked, ``ok``/``warn``/``fail``/``skip`` and what to
do). Local checks work on a stopped site: the config, the identity files and their modes, the
three ports (free, or held by this site's own running node), disk space and LMDB map headroom,
the bootstrap sites (a DHT ``hello`` from a throwaway port: only a member of *this* federation,
same CA and same secret, answers one) and the C-MOVE destinations (C-ECHO). On a running site it
also reads ``status`` over the control plane: clock skew against the members, the DHT's drop
counters (``dropped_bad_mac``: datagrams from outside this federation), and a mutual-TLS
handshake with every member (a member in another federation refuses this site's certificate,
or presents one this site's CA did not issue).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import shutil
import socket
import ssl
import stat
from dataclasses import dataclass
from typing import Any

from dht.const import REPLAY_WINDOW
from dht.errors import DhtError
from dht.membership import Federation, Identity
from p2pacs.config import PORT_SETTINGS, parse_hostport
from p2pacs.control.client import connect, read_runfile
from p2pacs.errors import ConfigError, P2PacsError
from p2pacs.site import Site

__all__ = [
    "DISK_FREE_MIN",
    "MAP_HEADROOM_MIN",
    "Check",
    "busy_ports",
    "failed",
    "member_handshake",
    "port_in_use",
    "run_checks",
]

log = logging.getLogger(__name__)

DISK_FREE_MIN = 1 << 30  # bytes; below this the archive is about to stop taking C-STORE
DISK_FREE_WARN = 0.10  # fraction of the disk; below it, warn
MAP_HEADROOM_MIN = 0.10  # fraction of store.map_size still free; below it, fail
CERT_EXPIRY_WARN = 30 * 86400.0  # seconds; warn this long before the site certificate expires
NET_TIMEOUT = 5.0  # seconds for one network check (a handshake, an echo, a DHT hello)

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(frozen=True, slots=True)
class Check:
    """One finding: ``name`` says what was checked, ``detail`` what was found or what to do."""

    name: str
    verdict: str  # ok, warn, fail or skip (not applicable: a standalone or stopped site)
    detail: str


# --- ports --------------------------------------------------------------------------------------


def port_in_use(host: str, port: int, *, udp: bool = False) -> bool:
    """Whether ``host:port`` cannot be bound now (another process or site holds it). TCP
    probes set SO_REUSEADDR as the servers do, so a port in TIME_WAIT counts as free."""
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as s:
        if not udp:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _listeners(site: Site) -> list[tuple[str, str, str, int, bool]]:
    """(label, runfile key, bind host, port, udp) of every listener the site has."""
    cfg = site.config
    out = [("DICOM port", "dicom", cfg.dicom.bind, cfg.dicom.port, False)]
    if cfg.federation.enabled:
        fed = cfg.federation
        out += [
            ("transfer port", "transfer", fed.bind, fed.transfer_port, False),
            ("DHT port", "dht", fed.bind, fed.dht_port, True),
        ]
    if cfg.web.enabled:
        out.append(("web port", "web", cfg.web.bind, cfg.web.port, False))
    return out


def busy_ports(site: Site) -> list[tuple[str, str, int, str]]:
    """The listeners whose port is taken now: (label, bind host, port, setting to change)."""
    return [
        (f"{label} {port} ({'UDP' if udp else 'TCP'} on {host})", host, port, PORT_SETTINGS[key])
        for label, key, host, port, udp in _listeners(site)
        if port_in_use(host, port, udp=udp)
    ]


def _check_ports(site: Site, running: dict[str, Any] | None) -> list[Check]:
    out = []
    for name, key, host, port, udp in _listeners(site):
        label = f"{name} ({'UDP' if udp else 'TCP'})"
        setting = PORT_SETTINGS[key]
        ours = running.get(key) if running else None
        pid = running["pid"] if running else None
        if ours is not None and int(ours[1]) == port:
            out.append(Check(label, OK, f"{host}:{port} held by this site (pid {pid})"))
        elif ours is not None and port != 0:
            out.append(
                Check(
                    label,
                    WARN,
                    f"the running site listens on {ours[1]}, site.toml says {port} ({setting}): "
                    "restart 'p2pacs serve' to apply",
                )
            )
        elif port_in_use(host, port, udp=udp):
            out.append(
                Check(
                    label,
                    FAIL,
                    f"{host}:{port} is in use by another program or site: free it, or change "
                    f"'p2pacs config set {setting} N'",
                )
            )
        else:
            out.append(Check(label, OK, f"{host}:{port} free"))
    return out


# --- identity -----------------------------------------------------------------------------------


def _check_identity(site: Site) -> tuple[list[Check], tuple[Identity, Federation] | None]:
    from p2pacs.federation.identity import load_identity

    if not site.config.federation.enabled:
        return [Check("identity", SKIP, "standalone site (not enrolled in a federation)")], None
    out: list[Check] = []
    folder = site.identity_path
    try:
        identity, federation = load_identity(site)
    except P2PacsError as exc:
        return [Check("identity", FAIL, str(exc))], None
    loose = []
    for path, want in ((folder, 0o700), (folder / "site.key", 0o600), (folder / "secret", 0o600)):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            loose.append(f"{path} is mode {mode:o} (run 'chmod {want:o} {path}')")
    if loose:
        out.append(Check("identity file modes", FAIL, "; ".join(loose)))
    else:
        out.append(Check("identity file modes", OK, "identity/ 0700, site.key and secret 0600"))
    expires = identity.certificate.not_valid_after_utc
    left = (expires - dt.datetime.now(dt.UTC)).total_seconds()
    verdict = FAIL if left <= 0 else WARN if left < CERT_EXPIRY_WARN else OK
    out.append(
        Check(
            "identity",
            verdict,
            f"site {identity.name}, federation fingerprint {federation.fingerprint}, "
            f"certificate valid until {expires:%Y-%m-%d}",
        )
    )
    return out, (identity, federation)


# --- disk and LMDB map --------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _check_disk(site: Site) -> list[Check]:
    usage = shutil.disk_usage(site.path)
    share = usage.free / usage.total if usage.total else 0.0
    verdict = FAIL if usage.free < DISK_FREE_MIN else WARN if share < DISK_FREE_WARN else OK
    out = [
        Check(
            "disk space",
            verdict,
            f"{_size(usage.free)} free of {_size(usage.total)} ({share:.0%}) at {site.path}",
        )
    ]
    data = site.db_path / "data.mdb"
    map_size = site.config.store.map_size
    try:
        used = data.stat().st_size
    except OSError:
        return [*out, Check("LMDB map", SKIP, "no archive yet (db/ is empty)")]
    headroom = (map_size - used) / map_size
    if headroom < MAP_HEADROOM_MIN:
        out.append(
            Check(
                "LMDB map",
                FAIL,
                f"{_size(used)} used of store.map_size {_size(map_size)}: raise it with "
                "'p2pacs config set store.map_size 2T' and restart",
            )
        )
    else:
        out.append(Check("LMDB map", OK, f"{_size(used)} used of store.map_size {_size(map_size)}"))
    return out


# --- a running site: status, clock, DHT drops, members ------------------------------------------


async def _status(site: Site) -> dict[str, Any]:
    async with connect(site, timeout=15) as node:
        return dict(await node.get_json("/v1/status"))


def _check_running(status: dict[str, Any]) -> list[Check]:
    fed = status.get("federation") or {}
    if not fed:
        return []
    out = []
    clock = fed.get("clock") or {}
    offset = clock.get("offset_s")
    if offset is None:
        out.append(Check("clock", SKIP, "no member has answered a heartbeat yet"))
    else:
        verdict = FAIL if clock.get("off") else WARN if abs(offset) > REPLAY_WINDOW / 3 else OK
        out.append(
            Check(
                "clock",
                verdict,
                f"members' clocks are {offset:+.1f} s from this one (DHT window "
                f"{REPLAY_WINDOW:.0f} s)" + ("; check NTP" if verdict != OK else ""),
            )
        )
    dht = fed.get("dht") or {}
    bad_mac, stale = int(dht.get("dropped_bad_mac", 0)), int(dht.get("dropped_stale", 0))
    if bad_mac:
        out.append(
            Check(
                "DHT datagrams",
                WARN,
                f"{bad_mac} dropped_bad_mac: something outside this federation sends to the DHT "
                "port (a site enrolled in another federation, or with a wrong secret?)",
            )
        )
    if stale:
        out.append(
            Check(
                "DHT datagrams",
                WARN,
                f"{stale} dropped_stale: a sender's clock is off by more than "
                f"{REPLAY_WINDOW:.0f} s (check NTP)",
            )
        )
    if not bad_mac and not stale:
        out.append(Check("DHT datagrams", OK, "no datagram dropped as bad MAC or stale"))
    return out


async def member_handshake(
    host: str, port: int, identity: Identity, federation: Federation
) -> tuple[str, str]:
    """(verdict, detail) of a mutual-TLS ``GET /v1/health`` at a member's transfer port."""
    from p2pacs.transfer.tls import client_context

    ctx = client_context(identity, federation)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx), NET_TIMEOUT
        )
    except ssl.SSLCertVerificationError:
        return FAIL, (
            "its certificate is not issued by this federation's CA "
            f"(fingerprint {federation.fingerprint}): wrong federation?"
        )
    except (OSError, TimeoutError) as exc:
        return FAIL, f"unreachable: {getattr(exc, 'strerror', None) or exc or 'timed out'}"
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: p2pacs\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), NET_TIMEOUT)
    except ssl.SSLError:
        answer = b""
    except (OSError, TimeoutError) as exc:
        return FAIL, f"no answer after the handshake: {exc or 'timed out'}"
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    if not answer.startswith(b"HTTP/1.1 200"):
        return FAIL, "it refused this site's certificate: wrong federation?"
    return OK, "answers over mutual TLS (same federation CA)"


async def _check_members(
    site: Site, status: dict[str, Any], creds: tuple[Identity, Federation]
) -> list[Check]:
    fed = status.get("federation") or {}
    members = fed.get("members") or []
    if not members:
        verdict = FAIL if site.config.federation.bootstrap else WARN
        return [
            Check(
                "members",
                verdict,
                "no member known yet: the bootstrap sites did not answer as members of this "
                "federation (unreachable, or a different federation or secret)",
            )
        ]

    async def one(m: dict[str, Any]) -> Check:
        host, port = parse_hostport(str(m["address"]))
        verdict, detail = await member_handshake(host, port, *creds)
        state = m.get("state") or ("up" if m.get("up") else "down")
        return Check(f"member {m['name']}", verdict, f"{m['address']} ({state}): {detail}")

    return list(await asyncio.gather(*(one(m) for m in members)))


# --- bootstrap over the DHT (stopped site) ------------------------------------------------------


async def _check_bootstrap(site: Site, creds: tuple[Identity, Federation]) -> list[Check]:
    from dht import DhtNode

    addrs = site.config.federation.bootstrap
    if not addrs:
        return [Check("bootstrap", SKIP, "none configured (mDNS on the local network only)")]
    try:
        node = await DhtNode.start(*creds, host="0.0.0.0", port=0, rpc_timeout=NET_TIMEOUT / 2)
    except DhtError as exc:
        return [Check("bootstrap", FAIL, f"cannot open a DHT socket: {exc}")]
    try:

        async def one(text: str) -> Check:
            host, port = parse_hostport(text)
            try:
                found = await asyncio.wait_for(node.ping((host, port)), NET_TIMEOUT)
            except (DhtError, OSError, TimeoutError):
                found = None
            if found is None:
                return Check(
                    f"bootstrap {text}",
                    FAIL,
                    "no answer as a member of this federation: unreachable, or it is in "
                    "another federation or has another secret (its DHT drops our datagrams "
                    "as bad MAC)",
                )
            return Check(f"bootstrap {text}", OK, f"answered as site {found.hex()[:16]}")

        return list(await asyncio.gather(*(one(a) for a in addrs)))
    finally:
        await node.stop()


# --- C-MOVE destinations ------------------------------------------------------------------------


def _echo(calling: str, called: str, host: str, port: int) -> tuple[str, str]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = NET_TIMEOUT
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called)
    if assoc.is_rejected:
        return FAIL, f"association rejected (is {called!r} this node's AE title?)"
    if not assoc.is_established:
        return FAIL, "no association: unreachable, or not a DICOM node"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code == 0:
        return OK, "C-ECHO succeeded"
    return FAIL, f"C-ECHO answered status {code!r}"


async def _check_destinations(site: Site) -> list[Check]:
    dests = site.config.dicom.destinations
    if not dests:
        return [
            Check(
                "C-MOVE destinations",
                SKIP,
                "none: add the PACS with 'p2pacs config set dicom.destinations AE=HOST:PORT'",
            )
        ]
    calling = site.config.dicom.ae_title

    async def one(ae: str, addr: str) -> Check:
        try:
            host, port = parse_hostport(addr)
            verdict, detail = await asyncio.to_thread(_echo, calling, ae, host, port)
        except (ConfigError, OSError, RuntimeError, ValueError) as exc:
            verdict, detail = FAIL, str(exc)
        return Check(f"destination {ae}", verdict, f"{addr}: {detail}")

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    return list(await asyncio.gather(*(one(ae, addr) for ae, addr in dests.items())))


# --- all of it ----------------------------------------------------------------------------------


async def run_checks(site: Site) -> tuple[list[Check], dict[str, Any] | None]:
    """Every check that applies to the site, and its status when it is running."""
    checks = [Check("site.toml", OK, f"{site.config_path} is valid")]
    running = read_runfile(site)
    status: dict[str, Any] | None = None
    if running is not None:
        try:
            status = await _status(site)
            checks.append(Check("node", OK, f"running (pid {running['pid']}), status answers"))
        except P2PacsError as exc:
            checks.append(Check("node", FAIL, f"running (pid {running['pid']}) but {exc}"))
    else:
        stale = (site.path / "node.json").exists()
        checks.append(
            Check(
                "node",
                SKIP,
                "not running"
                + (" (node.json is stale: its process is gone)" if stale else "")
                + "; start it with 'p2pacs serve' for the clock, DHT and member checks",
            )
        )
    identity_checks, creds = _check_identity(site)
    checks += identity_checks
    checks += _check_ports(site, running)
    checks += _check_disk(site)
    if creds is not None:
        if status is not None:
            checks += _check_running(status)
            checks += await _check_members(site, status, creds)
        elif running is None:
            checks += await _check_bootstrap(site, creds)
    checks += await _check_destinations(site)
    return checks, status


def failed(checks: list[Check]) -> bool:
    """Whether any check failed (``doctor`` then exits 1)."""
    return any(c.verdict == FAIL for c in checks)
