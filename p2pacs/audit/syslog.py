"""Syslog for audit messages: RFC 5424 framing, RFC 5425 TLS and RFC 5426 UDP transports.

``frame`` and ``octet_count``/``read_frames`` are pure (the framing, its parser); the two
senders are thin blocking shells over ``socket`` and ``ssl`` run by the audit trail's one
thread. TLS 1.2+ with the repository's certificate checked against the configured CA (and
its host name); the site's own certificate may be presented as the client certificate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import select
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from p2pacs.errors import AuditError

__all__ = [
    "APP_NAME",
    "MSGID",
    "Repository",
    "TlsSender",
    "UdpSender",
    "frame",
    "octet_count",
    "parse_frame",
    "parse_repository",
    "read_frames",
    "tls_context",
]

APP_NAME = "p2pacs"
MSGID = "IHE+RFC-3881"  # IHE ITI TF-2a 3.20.6.2: the MSGID of an audit message
FACILITY_AUTHPRIV = 10  # RFC 5424 6.2.1: security/authorization messages (private)
SEVERITY_NOTICE = 5  # normal but significant
BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: MSG-UTF8 starts with a byte order mark
MAX_FRAME = 16 << 20  # bytes: no audit message is larger (the trail refuses to log one that
# would be); a larger count in a log is corruption
UDP_MAX = 65507  # bytes of payload in one IPv4 UDP datagram (RFC 5426 3.2)
CONNECT_TIMEOUT = 5.0  # seconds to connect and complete the TLS handshake
SEND_TIMEOUT = 10.0  # seconds a blocked repository may hold one write
CLOSE_TIMEOUT = 2.0  # seconds for the repository to answer our close_notify
ACCEPT_TIMEOUT = 2.0  # seconds to wait for a TLS 1.3 repository's verdict on our certificate


def frame(message: bytes, *, at: float, hostname: str, procid: str) -> bytes:
    """One RFC 5424 syslog message: PRI, version 1, timestamp, host, APP-NAME p2pacs, PROCID,
    MSGID ``IHE+RFC-3881``, no structured data (``-``), and the XML as MSG-UTF8."""
    pri = FACILITY_AUTHPRIV * 8 + SEVERITY_NOTICE
    stamp = dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="milliseconds")
    stamp = stamp.replace("+00:00", "Z")
    header = f"<{pri}>1 {stamp} {_field(hostname, 255)} {APP_NAME} {_field(procid, 128)} {MSGID} -"
    return header.encode("ascii") + b" " + BOM + message


def _field(text: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters."""
    clean = "".join(c for c in text if "!" <= c <= "~")[:limit]
    return clean or "-"


@dataclass(frozen=True, slots=True)
class Parsed:
    """A syslog message read back (tests, the ``audit`` log reader)."""

    pri: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    message: bytes


def parse_frame(data: bytes) -> Parsed:
    """The fields of an RFC 5424 message whose structured data is ``-``."""
    if not data.startswith(b"<") or b">" not in data[:5]:
        raise AuditError(f"not an RFC 5424 message: {data[:40]!r}")
    close = data.index(b">")
    parts = data[close + 1 :].split(b" ", 7)
    if len(parts) < 7 or parts[0] != b"1":
        raise AuditError(f"not an RFC 5424 message: {data[:80]!r}")
    msg = parts[7] if len(parts) > 7 else b""
    if msg.startswith(BOM):
        msg = msg[len(BOM) :]
    _, stamp, host, app, procid, msgid, sd = (p.decode("ascii", "replace") for p in parts[:7])
    return Parsed(int(data[1:close]), stamp, host, app, procid, msgid, sd, msg)


def octet_count(data: bytes) -> bytes:
    """RFC 5425 4.3 (RFC 6587 3.4.1) octet-counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(data)).encode("ascii") + b" " + data


def read_frames(buf: bytes, *, lines: bool = False) -> Iterator[tuple[int, bytes]]:
    """Octet-counted frames from ``buf``: (offset after the frame, frame). Stops at the first
    incomplete frame (a torn write at the end of a log); ``AuditError`` on a corrupt count.
    ``lines``: each frame is followed by a line feed (the local log), taken with it."""
    pos = 0
    while pos < len(buf):
        space = buf.find(b" ", pos, pos + 8)
        if space < 0:
            if len(buf) - pos >= 8:
                raise AuditError(f"corrupt octet count at byte {pos}")
            return
        digits = buf[pos:space]
        if not digits.isdigit() or int(digits) > MAX_FRAME:
            raise AuditError(f"corrupt octet count {digits[:8]!r} at byte {pos}")
        end = space + 1 + int(digits)
        after = end + 1 if lines else end
        if after > len(buf):
            return
        if lines and buf[end : end + 1] != b"\n":
            raise AuditError(f"no line feed after the record ending at byte {end}")
        yield after, buf[space + 1 : end]
        pos = after


@dataclass(frozen=True, slots=True)
class Repository:
    """An audit record repository: ``tls://host:port`` or ``udp://host:port``."""

    scheme: str
    host: str
    port: int

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_repository(text: str) -> Repository:
    """``tls://host:port`` or ``udp://host:port`` (RFC 5425's port is 6514, RFC 5426's 514)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise AuditError(f"audit repository {text!r}: {exc}") from None
    if parts.scheme not in ("tls", "udp") or not parts.hostname:
        raise AuditError(
            f"audit repository {text!r} must be tls://host:port (RFC 5425) or "
            "udp://host:port (RFC 5426)"
        )
    default = 6514 if parts.scheme == "tls" else 514
    return Repository(parts.scheme, parts.hostname, port or default)


def tls_context(ca_file: Path | None, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """Verify the repository against ``ca_file`` (the system's CAs when None), host name
    included; present ``client`` (certificate file, key file) when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 5425 as updated by RFC 9662
    try:
        if ca_file is not None:
            ctx.load_verify_locations(cafile=str(ca_file))
        if client is not None:
            ctx.load_cert_chain(str(client[0]), str(client[1]))
    except (OSError, ssl.SSLError) as exc:
        raise AuditError(f"audit TLS: cannot load {ca_file} or {client}: {exc}") from exc
    return ctx


class TlsSender:
    """One TLS connection to a repository, opened when needed and again after it drops."""

    def __init__(self, repo: Repository, context: ssl.SSLContext):
        self.repo = repo
        self.context = context
        self._sock: ssl.SSLSocket | None = None

    def _connected(self) -> ssl.SSLSocket:
        sock = self._sock
        if sock is not None and _still_open(sock):
            return sock
        self.close()
        raw = socket.create_connection((self.repo.host, self.repo.port), CONNECT_TIMEOUT)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.context.wrap_socket(raw, server_hostname=self.repo.host)
        except BaseException:
            raw.close()
            raise
        try:
            _accepted(sock)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(SEND_TIMEOUT)
        self._sock = sock
        return sock

    def send(self, frames: Sequence[bytes]) -> None:
        """Write every frame, octet-counted; ``OSError`` (``ssl.SSLError`` included) when the
        repository cannot be reached or drops the connection: then none count as sent."""
        try:
            self._connected().sendall(b"".join(octet_count(f) for f in frames))
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Close cleanly (TLS close_notify, then FIN) after reading what the repository sent,
        so the connection is never reset with records the repository has not read yet."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if _still_open(sock):
                sock.settimeout(CLOSE_TIMEOUT)
                sock.unwrap().close()
        with contextlib.suppress(OSError):
            sock.close()


def _accepted(sock: ssl.SSLSocket) -> None:
    """Wait until the repository has accepted us. In TLS 1.3 the client's handshake ends before
    the server has checked the client's certificate: a refused client learns it only from the
    alert that follows, and whatever it wrote meanwhile is lost. An OpenSSL server sends its
    session tickets once it has accepted the client, so wait for a ticket (or the alert);
    a server that sends none gets ``ACCEPT_TIMEOUT``. ``OSError`` if refused."""
    if sock.version() != "TLSv1.3":
        return  # TLS 1.2: the handshake itself carried the server's verdict
    deadline = time.monotonic() + ACCEPT_TIMEOUT
    sock.settimeout(0.05)
    while time.monotonic() < deadline:
        session = sock.session
        if session is not None and session.has_ticket:
            return
        try:
            if sock.recv(1) == b"":
                raise ConnectionError("the repository closed the connection after the handshake")
            return  # application data from a syslog receiver: unexpected, but not a refusal
        except (TimeoutError, ssl.SSLWantReadError):
            continue


def _still_open(sock: ssl.SSLSocket) -> bool:
    """Whether the repository still holds the connection open. A syslog receiver never sends
    application data; what it does send (TLS 1.3 session tickets) is read here, so it never
    lingers unread: closing a socket with unread input resets the connection, and the receiver
    may then throw away records it had not read yet. End of stream, or an error: closed."""
    try:
        while select.select([sock], [], [], 0)[0] or sock.pending():
            sock.setblocking(False)
            try:
                if sock.recv(65536) == b"":
                    return False
            finally:
                sock.settimeout(SEND_TIMEOUT)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return True  # only TLS housekeeping was waiting
    except (OSError, ValueError):
        return False
    return True


class UdpSender:
    """RFC 5426: one message per datagram, no framing and no acknowledgement."""

    def __init__(self, repo: Repository):
        self.repo = repo
        family = socket.AF_INET6 if ":" in repo.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)

    def send(self, frames: Sequence[bytes]) -> None:
        for f in frames:
            self._sock.sendto(f[:UDP_MAX], (self.repo.host, self.repo.port))

    def close(self) -> None:
        self._sock.close()
