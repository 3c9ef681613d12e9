"""The trail's promises beside a real receiver: records queued while the repository is down
survive a restart of the site and are delivered once; a full queue drops without blocking;
``[audit]`` settings are checked with clear errors."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from p2pacs.audit import AuditTrail, Local, TrailSettings
from p2pacs.audit.trail import QUEUE_SIZE
from p2pacs.config import Config
from p2pacs.errors import AuditError, ConfigError
from p2pacs.events import Lifecycle, SecurityAlert
from p2pacs.federation.identity import (
    CA_CERT,
    SITE_CERT,
    SITE_KEY,
    create_federation_dir,
    enroll_site,
)

from audit_helpers import Rsyslog, parse, xml_of

LOCAL = Local("lab", "P2PACS", "127.0.0.1")
N_MANY = 2000  # records: ten deliveries of SEND_BATCH on one connection
N_BURST = 100  # events observed at C-STORE pace
BURST_PACE = 0.002  # seconds between them (500 a second)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not Path("/usr/sbin/rsyslogd").exists(), reason="needs rsyslog: make debs")
def test_queued_records_survive_a_restart_and_arrive_once(tmp_path: Path) -> None:
    rs = Rsyslog(tmp_path / "rsyslog", free_port(), free_port(socket.SOCK_DGRAM))
    settings = TrailSettings(
        tmp_path / "audit",
        4096,  # small segments: the backlog spans several, rotated while the repository is down
        repositories=(f"tls://127.0.0.1:{rs.tls_port}",),
        ca_file=rs.ca,
    )
    first = AuditTrail(settings, LOCAL)
    first.start()
    try:
        for i in range(40):  # the repository is not running
            first.observe(SecurityAlert("bad-mac", f"10.0.0.{i}:4000", "test"))
            assert first.flush(10)  # one batch each: segments rotate between them
    finally:
        first.stop(1.0)
    assert len(list((tmp_path / "audit").glob("audit-*.log"))) > 1
    rs.start()
    second = AuditTrail(settings, LOCAL)  # the site restarts: the cursor is where it was
    try:
        second.start()
        second.observe(Lifecycle("start", "lab"))
        rs.wait_for(lambda g: len(g) >= 41, 60)
        assert second.flush(10)
        got = rs.received()
    finally:
        second.stop()
        rs.stop()
    msgs = [parse(xml_of(r)) for r in got]
    peers = [m.participants[1]["UserID"] for m in msgs if m.event_id == "110113"]
    assert peers == [f"10.0.0.{i}:4000" for i in range(40)], "in order, each once"
    assert [m.event_id for m in msgs][-1] == "110100"


def test_a_burst_of_events_is_logged_in_few_fsyncs(tmp_path: Path) -> None:
    """As C-STOREs arrive at hundreds a second: one fsync'd append per event would cost ingest
    ~12 %; the recorder gathers what arrives within ``LINGER`` into one append."""
    trail = AuditTrail(TrailSettings(tmp_path / "audit", 1 << 20), LOCAL)
    trail.start()
    try:
        start = time.monotonic()
        for i in range(N_BURST):  # one every BURST_PACE s, on a schedule: a late one catches up
            time.sleep(max(0.0, start + i * BURST_PACE - time.monotonic()))
            trail.observe(SecurityAlert("bad-mac", f"10.0.0.{i}:4000", "test"))
        assert trail.flush(10)
    finally:
        trail.stop()
    assert trail.stats.messages == N_BURST
    # ~N_BURST * BURST_PACE / LINGER = 4 appends; one per event without the wait
    assert trail.stats.batches <= N_BURST // 5, trail.stats.batches
    logged = b"".join(p.read_bytes() for p in sorted((tmp_path / "audit").glob("audit-*.log")))
    assert logged.count(b"<AuditMessage") == N_BURST


def test_a_full_queue_drops_without_blocking(tmp_path: Path) -> None:
    trail = AuditTrail(TrailSettings(tmp_path / "audit", 1 << 20), LOCAL)  # not started
    started = time.monotonic()
    for _ in range(QUEUE_SIZE + 5):
        trail.observe(Lifecycle("start", "lab"))
    assert time.monotonic() - started < 5.0
    assert trail.stats.dropped == 5


def test_audit_settings_are_checked(tmp_path: Path) -> None:
    config = Config()
    assert config.audit.enabled and config.check() == []
    config.audit.repositories = [
        "tls://10.0.0.1:6514",
        "udp://[::1]:514",
        "http://x:1",
        "tls://h:0",
    ]
    problems = config.check()
    assert len(problems) == 2 and all(p.startswith("audit.repositories") for p in problems)
    with pytest.raises(ConfigError, match="log_max_bytes"):
        Config().set_key("audit.log_max_bytes", "100")
    assert Config().set_key("audit.repositories", "tls://a:6514,udp://b") == [
        "tls://a:6514",
        "udp://b",
    ]
    path = tmp_path / "site.toml"
    path.write_text('[audit]\nrepositories = ["tls://a:1"]\nretention = 3\n')
    with pytest.raises(ConfigError, match="unknown key"):
        Config.load(path)
    with pytest.raises(AuditError, match="tls://host:port"):
        AuditTrail(TrailSettings(tmp_path, 1 << 20, repositories=("ftp://x:1",)), LOCAL)


@pytest.mark.skipif(not Path("/usr/sbin/rsyslogd").exists(), reason="needs rsyslog: make debs")
def test_many_sends_on_one_connection_lose_nothing(tmp_path: Path) -> None:
    """Many small deliveries over one TLS 1.3 connection, then a stop: every record arrives
    (regression: an unread session ticket once made each reconnect reset the connection, and
    rsyslog dropped what it had not read)."""
    rs = Rsyslog(tmp_path / "rsyslog", free_port(), free_port(socket.SOCK_DGRAM))
    settings = TrailSettings(
        tmp_path / "audit", 1 << 20, repositories=(f"tls://127.0.0.1:{rs.tls_port}",),
        ca_file=rs.ca,
    )  # fmt: skip
    trail = AuditTrail(settings, LOCAL)
    rs.start()
    try:
        trail.start()
        for i in range(N_MANY):  # sent in batches of SEND_BATCH, back to back
            trail.observe(SecurityAlert("bad-mac", f"10.0.{i // 250}.{i % 250}:4000", "test"))
        assert trail.flush(30)
        trail.stop(10)
        got = rs.wait_for(lambda g: len(g) >= N_MANY, 30)
    finally:
        trail.stop()
        rs.stop()
    peers = [parse(xml_of(r)).participants[1]["UserID"] for r in got]
    assert peers == [f"10.0.{i // 250}.{i % 250}:4000" for i in range(N_MANY)]


@pytest.mark.skipif(not Path("/usr/sbin/rsyslogd").exists(), reason="needs rsyslog: make debs")
def test_client_certificate_is_the_site_certificate(tmp_path: Path) -> None:
    """A repository that requires client certificates from the federation CA takes the site's
    own (Ed25519) certificate, and refuses a trail that presents none."""
    fed = create_federation_dir(tmp_path / "fed", "hospital")
    site = enroll_site(fed, "lab", tmp_path / "lab", discovery=False)
    ident = site.identity_path
    rs = Rsyslog(tmp_path / "rsyslog", free_port(), free_port(socket.SOCK_DGRAM),
                 client_ca=ident / CA_CERT)  # fmt: skip
    repo = (f"tls://127.0.0.1:{rs.tls_port}",)
    with_cert = TrailSettings(tmp_path / "a1", 1 << 20, repositories=repo, ca_file=rs.ca,
                              client_cert=(ident / SITE_CERT, ident / SITE_KEY))  # fmt: skip
    without = TrailSettings(tmp_path / "a2", 1 << 20, repositories=repo, ca_file=rs.ca)
    rs.start()
    refused = AuditTrail(without, LOCAL)
    member = AuditTrail(with_cert, LOCAL)
    try:
        refused.start()
        refused.observe(Lifecycle("start", "refused"))
        member.start()
        member.observe(Lifecycle("start", "lab"))
        got = rs.wait_for(lambda g: len(g) >= 1, 30)
        assert refused.flush(10) and member.flush(10)
        snap = refused.snapshot()["repositories"]
        assert isinstance(snap, dict)
        (state,) = snap.values()
        assert state["behind"] and state["failures"] >= 1, state
    finally:
        member.stop()
        refused.stop(1.0)
        rs.stop()
    assert [parse(xml_of(r)).source_id for r in got] == ["lab"]


def test_a_missing_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    settings = TrailSettings(tmp_path / "audit", 1 << 20, repositories=("tls://127.0.0.1:1",),
                             ca_file=tmp_path / "nope.pem")  # fmt: skip
    with pytest.raises(AuditError, match=r"nope\.pem"):
        AuditTrail(settings, LOCAL).start()
