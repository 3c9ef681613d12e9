"""The audit trail end to end: a running site, real DICOM tools (dcmtk), a real syslog receiver
(rsyslog over RFC 5425 TLS, and RFC 5426 UDP), a refused non-member at the DHT and at TLS.

C-STORE, C-FIND, C-MOVE and the refusals each produce their audit message at the receiver and
in the local log, parsed back and checked for the A.5 structure; rsyslog is stopped between the
C-STORE and the rest and started again: what was emitted meanwhile arrives after it returns,
nothing lost, nothing twice.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dht.membership import create_federation, issue_site_certificate
from dht.wire import KIND_REQUEST, encode_datagram
from p2pacs.audit import AuditTrail, Local, TrailSettings
from p2pacs.audit.log import AuditLog, Cursor
from p2pacs.audit.syslog import MSGID, parse_frame
from p2pacs.events import DicomRequest, Event, Lifecycle
from p2pacs.federation.identity import create_federation_dir, enroll_site
from p2pacs.node import SiteNode
from p2pacs.site import Site

from audit_helpers import Message, Rsyslog, objects, parse, role, xml_of

pytestmark = pytest.mark.skipif(
    not Path("/usr/sbin/rsyslogd").exists() or not Path("/usr/bin/storescu").exists(),
    reason="needs Debian's rsyslog (+ rsyslog-openssl) and dcmtk: make debs",
)

AET = "P2PACS"
TOOL_TIMEOUT = 60.0  # seconds for one dcmtk tool run
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(*argv: str, cwd: Path | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), TOOL_TIMEOUT)
    assert proc.returncode == 0, f"{argv[0]} failed: {out.decode(errors='replace')}"


def local_log(folder: Path) -> list[bytes]:
    """Every message in the site's local audit log, oldest first."""
    log = AuditLog(folder, max_bytes=1 << 30)
    try:
        return [parse_frame(f).message for _, f in log.read_from(Cursor(1, 0), 1_000_000)]
    finally:
        log.close()


def received(rs: Rsyslog) -> list[bytes]:
    out = []
    for rec in rs.received():
        assert (rec["app"], rec["msgid"], rec["sd"], rec["pri"]) == ("p2pacs", MSGID, "-", "85")
        out.append(xml_of(rec))
    return out


def events(xmls: list[bytes], event_id: str, **match: str) -> list[Message]:
    found = [msg for msg in map(parse, xmls) if msg.event_id == event_id]
    return [m for m in found if all(getattr(m, k) == v for k, v in match.items())]


def foreign_client_context(tmp: Path) -> ssl.SSLContext:
    """A TLS client presenting a certificate from another federation's CA."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ca = create_federation("elsewhere")
    key = Ed25519PrivateKey.generate()
    cert = issue_site_certificate(ca, key.public_key(), "intruder")
    pem = tmp / "intruder.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + cert.public_bytes(serialization.Encoding.PEM)
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the intruder does not care who we are
    ctx.load_cert_chain(str(pem))
    return ctx


def intrude_tls(address: tuple[str, int], ctx: ssl.SSLContext) -> bytes:
    """Connect with a foreign certificate; what the site answered (TLS 1.3: the client learns
    of the refusal when it first reads)."""
    with socket.create_connection(address, 5) as raw, ctx.wrap_socket(raw) as tls:
        tls.settimeout(5)
        try:
            tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            return tls.recv(100)
        except (ssl.SSLError, ConnectionError):
            return b""


@pytest.mark.asyncio
async def test_operations_and_refusals_reach_rsyslog_across_a_restart(tmp_path: Path) -> None:
    rs = Rsyslog(tmp_path / "rsyslog", free_port(), free_port(socket.SOCK_DGRAM))
    dest_port = free_port()
    fed = create_federation_dir(tmp_path / "fed", "hospital")
    site = enroll_site(
        fed, "lab", tmp_path / "lab", bind="127.0.0.1", aet=AET, dicom_port=0, dht_port=0,
        transfer_port=0, discovery=False, destinations={"DEST": f"127.0.0.1:{dest_port}"},
    )  # fmt: skip
    cfg = site.config
    cfg.dicom.bind = "127.0.0.1"
    cfg.store.sync = False
    cfg.dicom.workers = 1  # the in-process gateway (node.gateway)
    cfg.audit.repositories = [f"tls://127.0.0.1:{rs.tls_port}"]
    cfg.audit.ca_file = str(rs.ca)
    cfg.save(site.config_path)
    site = Site.open(site.path)
    audit_dir = site.path / "audit"

    ct = Path(str(get_testdata_file("CT_small.dcm")))
    ds = dcmread(ct, stop_before_pixels=True)
    storescp = await asyncio.create_subprocess_exec(
        "storescp", "-aet", "DEST", "-od", str(tmp_path), str(dest_port), env=ENV,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    rs.start()
    try:
        async with SiteNode(site) as node:
            assert node.gateway is not None and node.federation is not None
            assert node.audit is not None and node.federation.dht is not None
            assert node.federation.server is not None
            host, port = node.gateway.address
            dicom = [host, str(port)]
            rs.wait_for(lambda got: len(events(received(rs), "110100")) >= 1)

            await run("storescu", "-aet", "MODALITY", "-aec", AET, *dicom, str(ct))
            stored = rs.wait_for(lambda got: len(events(received(rs), "110104")) >= 1)
            assert stored, "the C-STORE's audit message did not arrive"

            rs.stop()  # the repository goes away; the site keeps working and auditing
            await run(
                "findscu", "-aet", "VIEWER", "-aec", AET, "-S", "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"PatientID={ds.PatientID}", "-k", "StudyInstanceUID", *dicom,
            )  # fmt: skip
            await run(
                "movescu", "-aet", "VIEWER", "-aec", AET, "-aem", "DEST", "-S",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
                *dicom,
            )  # fmt: skip
            # a non-member's DHT datagram (another federation's secret): dropped, bad MAC
            bad = encode_datagram(os.urandom(32), KIND_REQUEST, os.urandom(8),
                                  int(time.time() * 1000), ["ping"])  # fmt: skip
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.sendto(bad, node.federation.dht.address)
            # a non-member at the transfer port: certificate from another CA, refused at TLS
            ctx = foreign_client_context(tmp_path)
            answer = await asyncio.to_thread(intrude_tls, node.federation.server.address, ctx)
            assert answer == b"", "a non-member was answered"

            def alerts() -> list[Message]:
                return events(local_log(audit_dir), "110113")

            deadline = time.monotonic() + 20
            while len(alerts()) < 2 and time.monotonic() < deadline:
                assert node.audit.flush(5)
                await asyncio.sleep(0.1)  # the DHT's drop reaches the bus on its own loop turn
            logged = local_log(audit_dir)
            assert len(events(logged, "110113")) == 2, [parse(x) for x in logged]
            assert events(logged, "110112"), "the C-FIND is in the local log"
            assert not events(received(rs), "110112"), "rsyslog was down: it cannot have it"
            status = await node.status()
            (repo,) = status["audit"]["repositories"].values()
            assert repo["behind"] and repo["failures"] >= 1 and repo["last_error"], repo

            rs.start()  # the repository returns: what it missed arrives, in order, once
            got = rs.wait_for(lambda g: len(g) >= len(logged), 60)
            assert received(rs) == logged, "the receiver holds exactly the local log"
            assert len(got) == len(logged)
        # the site stopped: Application Stop was logged and delivered at stop
        final = local_log(audit_dir)
        rs.wait_for(lambda g: len(g) >= len(final), 30)
        assert received(rs) == final
    finally:
        rs.stop()
        storescp.terminate()
        await storescp.wait()

    msgs = final
    # each one checked for the A.5 structure (parse does) and its own rules
    (start,) = events(msgs, "110100", types=["110120"])
    assert len(events(msgs, "110100", types=["110121"])) == 1
    assert role(start, "110150")["UserID"] == AET

    (store,) = events(msgs, "110104", action="C")
    assert role(store, "110153")["UserID"] == "MODALITY" and store.outcome == 0
    assert role(store, "110153")["NetworkAccessPointID"] == "127.0.0.1"
    assert objects(store, "110180/DCM")[0]["ParticipantObjectID"] == ds.StudyInstanceUID
    assert objects(store, "110180/DCM")[0]["sop_classes"] == [(ds.SOPClassUID, 1)]
    assert objects(store, "2/RFC-3881")[0]["ParticipantObjectID"] == ds.PatientID

    (query,) = events(msgs, "110112")
    assert role(query, "110153")["UserID"] == "VIEWER" and query.outcome == 0
    (sop,) = objects(query, "110181/DCM")
    assert sop["ParticipantObjectID"] == "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root FIND
    assert ds.PatientID.encode() in sop["query"]  # type: ignore[operator]

    (begun,) = events(msgs, "110102")
    (moved,) = events(msgs, "110104", action="R")
    for m in (begun, moved):
        assert role(m, "110152")["UserID"] == "DEST" and role(m, "110153")["UserID"] == AET
        assert objects(m, "110180/DCM")[0]["ParticipantObjectID"] == ds.StudyInstanceUID
        assert objects(m, "2/RFC-3881")[0]["ParticipantObjectID"] == ds.PatientID
    assert moved.outcome == 0
    assert objects(moved, "110180/DCM")[0]["sop_classes"] == [(ds.SOPClassUID, 1)]

    kinds = {bytes(o["details"]["Alert Description"]).split(b":")[0]  # type: ignore[index]
             for m in events(msgs, "110113") for o in m.objects}  # fmt: skip
    assert kinds == {b"bad-mac", b"tls-refused"}
    assert all(m.types == ["110126"] and m.outcome == 4 for m in events(msgs, "110113"))

    for seg in audit_dir.glob("audit-*.log"):
        assert stat.S_IMODE(seg.stat().st_mode) == 0o600


def test_udp_repository(tmp_path: Path) -> None:
    """RFC 5426: one message per datagram to rsyslog's UDP input."""
    rs = Rsyslog(tmp_path / "rsyslog", free_port(), free_port(socket.SOCK_DGRAM))
    settings = TrailSettings(
        tmp_path / "audit", 1 << 20, repositories=(f"udp://127.0.0.1:{rs.udp_port}",)
    )
    trail = AuditTrail(settings, Local("lab", AET, "127.0.0.1"))
    rs.start()
    try:
        trail.start()
        trail.observe(Lifecycle("start", "lab"))
        assert trail.flush(10)
        got = rs.wait_for(lambda g: len(g) >= 1, 30)
    finally:
        trail.stop()
        rs.stop()
    assert [r["input"] for r in got] == ["imudp"]
    (msg,) = events([xml_of(r) for r in got], "110100", types=["110120"])
    assert msg.source_id == "lab"


class Blackhole:
    """A repository that accepts TCP connections and never says a word: a TLS handshake with
    it hangs until the client's timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


def test_a_blocked_repository_does_not_slow_c_store(tmp_path: Path) -> None:
    """While the sender hangs on a repository that never answers, C-STOREs are answered at
    their usual speed and every one of them is in the local log."""
    from p2pacs.archive import Archive
    from p2pacs.config import DicomConfig
    from p2pacs.dicom.scu import store_files
    from p2pacs.gateway import Gateway
    from p2pacs.samples import generate_instances

    hole = Blackhole()
    settings = TrailSettings(
        tmp_path / "audit", 1 << 20, repositories=(f"tls://127.0.0.1:{hole.port}",)
    )
    trail = AuditTrail(settings, Local("lab", AET, "127.0.0.1"))
    files = generate_instances(tmp_path / "gen", studies=1, series_per_study=1,
                               instances_per_series=30, seed=5)  # fmt: skip
    handler_times: list[float] = []

    def timing(event: Event) -> None:
        if isinstance(event, DicomRequest) and event.service == "C-STORE":
            handler_times.append(event.seconds)

    archive = Archive(tmp_path / "db", map_size=1 << 30, sync=False)
    gw = Gateway(archive, DicomConfig(ae_title=AET, port=0, bind="127.0.0.1", max_pdu=0))
    try:
        trail.start()
        archive.events.subscribe(trail.observe)
        archive.events.subscribe(timing)
        gw.start()
        trail.observe(Lifecycle("start", "lab"))  # the sender now hangs in its TLS handshake
        started = time.monotonic()
        report = store_files(*gw.address, AET, files)
        took = time.monotonic() - started
        assert len(report.stored) == len(files)
        assert trail.flush(30) is True  # logged; the repository is failing, not waited for
        snap = trail.snapshot()["repositories"]
        assert isinstance(snap, dict)
        (state,) = snap.values()
        assert state["behind"] and state["failures"] >= 1, state
    finally:
        gw.stop()
        trail.stop(1.0)
        archive.close()
        hole.close()
    assert len(handler_times) == len(files)
    assert max(handler_times) < 1.0, max(handler_times)  # the sender waits 5 s per try
    assert took < 15.0, took
    logged = local_log(tmp_path / "audit")
    assert len(events(logged, "110104", action="C")) == len(files)
