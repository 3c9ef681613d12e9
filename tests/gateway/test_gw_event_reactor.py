"""The event-driven reactors (``p2pacs.dicom.reactor``) on real associations.

Every test here runs with the reactors' safety-net timeouts raised to far beyond the test's
own timeouts (``long_waits``): a wake-up the reactors missed shows as a test that times out,
not as a delay that passes unnoticed.
"""

from __future__ import annotations

import datetime
import gc
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from p2pacs.archive import Archive
from p2pacs.dicom import reactor
from p2pacs.dicom.scu import association_handlers

from gw_helpers import TIMEOUT, associate, running_gateway

WINDOW = 1.0  # seconds an idle association is watched
IDLE_WAKEUPS = 20  # voluntary context switches allowed per thread in WINDOW (polling: >= 1,000)
ENDED = 10.0  # seconds for an association's threads to end once it is released or aborted


@pytest.fixture(autouse=True)
def long_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reactor, "DUL_WAIT", 120.0)
    monkeypatch.setattr(reactor, "ASSOC_WAIT", 120.0)


def _switches(thread: threading.Thread) -> int:
    """Voluntary context switches of ``thread`` so far: each time it blocked (a sleep, a wait)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("voluntary_ctxt_switches:"))
    return int(line.split()[1])


def _acceptor_of(assoc: Association) -> Association:
    """The gateway's side of ``assoc`` (other tests' associations may still be ending)."""
    local = assoc.dul.socket.socket.getsockname()  # type: ignore[union-attr]
    found = []
    for t in threading.enumerate():
        if isinstance(t, Association) and t.is_acceptor and t.dul.socket is not None:
            sock = t.dul.socket.socket
            try:
                if sock is not None and sock.getpeername() == local:
                    found.append(t)
            except OSError:  # closed meanwhile
                continue
    (acceptor,) = found
    return acceptor


def _wait_until(condition: object, timeout: float) -> bool:
    """Poll ``condition`` (a callable) until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return bool(condition())  # type: ignore[operator]


def test_an_idle_association_sleeps_on_both_sides(gw_archive: Archive) -> None:
    with running_gateway(gw_archive) as gw:
        assoc = associate(gw, Verification)
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0x0000
            acceptor = _acceptor_of(assoc)
            assert reactor.installed(assoc) and reactor.installed(acceptor)
            threads = [assoc, assoc.dul, acceptor, acceptor.dul]
            before = [_switches(t) for t in threads]
            time.sleep(WINDOW)  # the interval measured, not a wait for a condition
            woke = [_switches(t) - b for t, b in zip(threads, before, strict=True)]
            assert max(woke) <= IDLE_WAKEUPS, f"idle threads woke {woke} times in {WINDOW} s"
            # and a request after the long sleep is noticed at once by both sides
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
        assert _wait_until(lambda: not acceptor.is_alive() and not acceptor.dul.is_alive(), ENDED)
        assert not assoc.dul.is_alive()


def test_the_network_idle_timer_still_aborts(gw_archive: Archive) -> None:
    # the acceptor's idle timer (network_timeout) ends an association nobody uses
    with running_gateway(gw_archive, network_timeout=1.0) as gw:
        assoc = associate(gw, Verification)
        assert assoc.is_established
        acceptor = _acceptor_of(assoc)
        assert _wait_until(lambda: assoc.is_aborted, TIMEOUT), "the idle timer never fired"
        assert _wait_until(lambda: not acceptor.is_alive() and not acceptor.dul.is_alive(), ENDED)
        assert _wait_until(lambda: not assoc.is_alive() and not assoc.dul.is_alive(), ENDED)


def test_an_abort_from_the_requestor_ends_the_acceptor(gw_archive: Archive) -> None:
    with running_gateway(gw_archive) as gw:
        assoc = associate(gw, Verification)
        assert assoc.is_established
        acceptor = _acceptor_of(assoc)
        assoc.abort()
        assert assoc.is_aborted and not assoc.dul.is_alive()
        assert _wait_until(lambda: not acceptor.is_alive() and not acceptor.dul.is_alive(), ENDED)
        assert acceptor.is_aborted
        # the gateway still serves
        again = associate(gw, Verification)
        try:
            assert again.send_c_echo().Status == 0x0000
        finally:
            again.release()


def test_requests_from_another_thread_are_not_taken_by_the_reactor(gw_archive: Archive) -> None:
    # many send_* calls on one association (pynetdicom #875: the requestor's reactor must never
    # take a response its send_* caller waits for; a lost response would wait out TIMEOUT)
    with running_gateway(gw_archive) as gw:
        assoc = associate(gw, Verification)
        assert assoc.is_established
        try:
            statuses = [int(assoc.send_c_echo().Status) for _ in range(300)]
        finally:
            assoc.release()
    assert statuses == [0] * 300


# ---- TLS: decrypted bytes an SSL socket holds are read without waiting for the socket ------


def _certificate(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


MATCHES = 400  # C-FIND responses: small PDUs that TLS delivers several to a record


@pytest.fixture
def tls_find_scp(tmp_path: Path) -> Iterator[tuple[int, ssl.SSLContext]]:
    cert, key = _certificate(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        for i in range(MATCHES):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = f"1.2.3.{i}"
            yield 0xFF00, ds

    ae = AE(ae_title="TLSSCP")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        ssl_context=server_ctx,
        evt_handlers=[*association_handlers(), (evt.EVT_C_FIND, on_find)],
    )
    assert server is not None
    try:
        yield int(server.server_address[1]), client_ctx
    finally:
        server.shutdown()


def test_tls_responses_buffered_by_ssl_are_read(tls_find_scp: tuple[int, ssl.SSLContext]) -> None:
    port, client_ctx = tls_find_scp
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="TLSSCP",
        tls_args=(client_ctx, "127.0.0.1"),
        evt_handlers=association_handlers(),
    )
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        for _ in range(2):
            got, final = [], -1
            for st, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                assert st is not None and "Status" in st, "a response never came"
                if st.Status == 0xFF00:
                    got.append(str(ds.StudyInstanceUID))
                else:
                    final = int(st.Status)
            assert final == 0x0000
            assert got == [f"1.2.3.{i}" for i in range(MATCHES)]
    finally:
        assoc.release()


def test_failed_associations_leave_no_descriptor_behind() -> None:
    # each DUL gets an eventfd; one whose association fails (nothing listens) must close it too
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    ae = AE(ae_title="NOBODY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(Verification)
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assoc = ae.associate("127.0.0.1", port, evt_handlers=association_handlers())
        assert not assoc.is_established
        assert _wait_until(lambda a=assoc: not a.dul.is_alive(), ENDED)  # type: ignore[misc]
    del assoc
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before
