"""The pure parts of the web server: credentials, the [web] config, metric families from a
status snapshot, the status page's HTML, reading an Authorization header."""

from __future__ import annotations

import base64
import re
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from p2pacs import credentials
from p2pacs.config import Config, WebConfig, is_loopback
from p2pacs.errors import ConfigError
from p2pacs.events import DicomRequest, EventBus, SecurityAlert
from p2pacs.web.auth import Refusal, parse_authorization
from p2pacs.web.metrics import SiteMetrics, StatusCollector, status_class
from p2pacs.web.page import eta_seconds, render_page
from p2pacs.web.recent import RecentFailures

STUDY = "1.2.826.0.1.3680043.8.498.1234567890"
PATIENT = "PAT-000042"
UID_LIKE = re.compile(r"^\d+(\.\d+){3,}$")
NAME = re.compile(r"^p2pacs_[a-z][a-z0-9_]*$")
LABELS = {"service", "status_class", "result", "kind", "state", "member", "peer", "reason"}
LABELS |= {"site", "ae_title", "version", "le"}


def sample_status() -> dict[str, Any]:
    """A status snapshot shaped like SiteNode.status() of a site recovering, one member down."""
    now = time.time()
    return {
        "schema": 1,
        "running": True,
        "site": "clinic-a",
        "ae_title": "CLINICA",
        "version": "0.1.0",
        "dicom": ["127.0.0.1", 11112],
        "uptime_s": 120.0,
        "patients": 3,
        "studies": 4,
        "instances": 40,
        "blobs": 48,
        "bytes": 20_000_000,
        "hashed_bytes": 30_000_000,
        "web": ["127.0.0.1", 11443],
        "storage": {"map_size": 1 << 40, "used_bytes": 1 << 25, "disk_free": 5e10,
                    "disk_total": 1e11},
        "federation": {
            "site_id": "ab" * 20,
            "replication": 2,
            "sites_up": 2,
            "sites_down": 1,
            "members": [
                {"name": "lab", "site_id": "cd" * 20, "up": True, "state": "up",
                 "last_seen_s": 0.4, "address": "127.0.0.1:2", "studies": 5, "clock_offset_s": 0.0},
                {"name": "<script>x</script>", "site_id": "ef" * 20, "up": False,
                 "state": "down", "last_seen_s": 30.0, "address": "127.0.0.1:3", "studies": 2,
                 "clock_offset_s": None},
            ],
            "under_replicated": 2,
            "repair_passes": 7,
            "last_repair": now - 5,
            "pulls_done": 3,
            "pulls_failed": 1,
            "repair_paused": "",
            "repair_queue": 1,
            "recent_repairs": [
                {"time": now - 5, "study": STUDY, "ok": True, "detail": "10 instances"},
                {"time": now - 9, "study": STUDY, "ok": False, "detail": "no holder"},
            ],
            "corrupt_served": 0,
            "corrupt_repaired": 0,
            "catalogue": "00" * 32,
            "site_record": True,
            "studies_published": 4,
            "clock": {"offset_s": 0.2, "members": 1, "off": False},
            "dht": {"dropped_bad_mac": 2, "dropped_stale": 0, "datagrams_in": 100,
                    "records_stored": 9},
            "instance_blobs_fetched": 30,
            "transfer": {"received": {"lab": 1000}, "sent": {"lab": 500}},
            "recovery_pending": 3,
            "recovery": {"studies_total": 6, "studies_done": 3, "bytes_total": 600,
                         "bytes_done": 200, "recent_day": "20260101", "recent_day_s": None,
                         "retrying": 1, "given_up": {STUDY: "gone"}, "awaiting_record": False,
                         "baseline": "record", "error": "", "full": "", "started": now - 60},
            "scrub": {"runs": 1, "checked": 48, "corrupt": 1, "repaired": 1, "unrepaired": 0,
                      "last_run": now - 100},
        },
    }  # fmt: skip


# --- credentials and config ----------------------------------------------------------------


def test_password_hash_round_trip_and_salt() -> None:
    stored = credentials.hash_password("s3cret")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert credentials.verify_password(stored, "s3cret")
    assert not credentials.verify_password(stored, "s3creT")
    assert credentials.hash_password("s3cret") != stored  # a fresh salt each time
    assert credentials.password_problem(stored) is None
    with pytest.raises(ConfigError):
        credentials.hash_password("")


@pytest.mark.parametrize(
    "bad",
    ["", "plain", "scrypt$16384$8$1$c2FsdA", "scrypt$x$8$1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",
     "scrypt$1000$8$1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",  # N not a power of two
     "scrypt$2147483648$8$1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA"],  # a GiB-sized check
)  # fmt: skip
def test_malformed_password_hashes_are_named(bad: str) -> None:
    assert credentials.password_problem(bad)
    with pytest.raises(ConfigError):
        credentials.verify_password(bad, "x")


def test_tokens_are_stored_hashed() -> None:
    token, stored = credentials.new_token()
    assert token not in stored and credentials.token_problem(stored) is None
    assert credentials.verify_token(stored, token)
    assert not credentials.verify_token(stored, token + "x")
    assert credentials.token_problem("sha256$zz") is not None


def test_web_config_checks() -> None:
    web = WebConfig(enabled=True)
    assert any("web user or token" in p for p in web.check())
    web.users = {"a": credentials.hash_password("pw")}
    assert any("tls_cert" in p for p in web.check())  # HTTPS needs a certificate
    web.plain_http = True
    assert web.check() == []  # plain HTTP on loopback: allowed
    web.bind = "0.0.0.0"
    assert any("loopback" in p for p in web.check())
    web.plain_http, web.tls_cert, web.tls_key = False, "c.pem", "k.pem"
    assert web.check() == []
    web.users = {"a": "not-a-hash"}
    assert any("web.users.a" in p for p in web.check())
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("0.0.0.0")


def test_config_set_web_keys(tmp_path: Any) -> None:
    config = Config()
    config.set_key("web.port", "12443")
    assert config.web.port == 12443
    with pytest.raises(ConfigError, match="web user or token"):
        config.set_key("web.enabled", "true")
    assert config.web.enabled is False  # refused: nothing changed
    config.web.users = {"a": credentials.hash_password("pw")}
    config.set_key("web.plain_http", "true")
    config.set_key("web.enabled", "true")
    with pytest.raises(ConfigError, match="loopback"):
        config.set_key("web.bind", "0.0.0.0")
    path = tmp_path / "site.toml"
    config.save(path)
    again = Config.load(path)
    assert again.web == config.web
    assert "web.users" in Config.setting_keys()


# --- metrics -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [(0, "success"), (0xFE00, "cancel"), (0xB000, "warning"), (0x0107, "warning"),
     (0xA700, "failure"), (0xC211, "failure"), (0x0122, "failure"), (0xA801, "failure")],
)  # fmt: skip
def test_status_class(code: int, cls: str) -> None:
    assert status_class(code) == cls


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metric_names_follow_prometheus_conventions() -> None:
    bus = EventBus()
    metrics = SiteMetrics(bus)
    bus.emit(
        DicomRequest("C-STORE", 0, 0.01, "MOD", "10.0.0.9", study_uids=(STUDY,),
                     patient_ids=(PATIENT,), sop_uids=(STUDY + ".1",), bytes=1234, completed=1)
    )  # fmt: skip
    bus.emit(DicomRequest("C-MOVE", 0xA801, 0.2, "PACS", "10.0.0.8", study_uids=(STUDY,)))
    bus.emit(SecurityAlert("auth-failed", "10.0.0.7", "web GET /: no credentials"))
    text = metrics.render(sample_status()).decode()
    assert STUDY not in text and PATIENT not in text
    families = _families(text)
    for family in families.values():
        assert NAME.match(family.name), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        else:
            assert not family.name.endswith("_total"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= LABELS, (family.name, sample.labels)
            for value in sample.labels.values():
                assert not UID_LIKE.match(value), (family.name, value)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("p2pacs_dicom_requests_total",
                    (("service", "C-STORE"), ("status_class", "success")))] == 1  # fmt: skip
    assert samples[("p2pacs_dicom_requests_total",
                    (("service", "C-MOVE"), ("status_class", "failure")))] == 1  # fmt: skip
    assert samples[("p2pacs_dicom_received_bytes_total", ())] == 1234
    assert samples[("p2pacs_security_alerts_total", (("kind", "auth-failed"),))] == 1
    assert samples[("p2pacs_archive_instances", ())] == 40
    assert samples[("p2pacs_members", (("state", "down"),))] == 1
    assert samples[("p2pacs_member_up", (("member", "lab"),))] == 1
    assert samples[("p2pacs_recovery_given_up_studies", ())] == 1
    assert samples[("p2pacs_scrub_corrupt_blobs_total", ())] == 1
    assert samples[("p2pacs_transfer_received_bytes_total", (("peer", "lab"),))] == 1000
    assert samples[("p2pacs_dht_datagrams_dropped_total", (("reason", "bad_mac"),))] == 2
    assert samples[("p2pacs_repairs_total", (("result", "failed"),))] == 1
    metrics.close()


def test_standalone_status_has_no_federation_metrics() -> None:
    status = sample_status()
    status["federation"] = None
    registry = CollectorRegistry(auto_describe=False)
    collector = StatusCollector()
    registry.register(collector)
    collector.update(status)
    names = set(_families(generate_latest(registry).decode()))
    assert "p2pacs_archive_studies" in names
    assert not any(n.startswith(("p2pacs_member", "p2pacs_recovery")) for n in names)


# --- the page ------------------------------------------------------------------------------


def test_page_shows_members_recovery_and_escapes() -> None:
    bus = EventBus()
    failures = RecentFailures(bus)
    bus.emit(DicomRequest("C-STORE", 0xA700, 0.1, "CT<1>", "10.0.0.5", patient_ids=(PATIENT,)))
    bus.emit(DicomRequest("C-FIND", 0, 0.1, "CT1", "10.0.0.5"))  # success: not a failure
    status = sample_status()
    html = render_page(status, failures=failures.latest(), refresh=2)
    assert '<meta name="viewport"' in html
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert 'data-state="down"' in html and 'data-name="lab" data-state="up"' in html
    assert "<progress" in html and "3 of 6 studies" in html and "ETA" in html
    assert "C-STORE 0xA700" in html and "CT&lt;1&gt;" in html and "C-FIND" not in html
    assert PATIENT not in html
    assert "under-replicated studies: <b id=under>2</b>" in html
    assert "not recovered" in html  # the status warnings
    assert "const every = 2000;" in html


def test_eta_from_the_rate_so_far() -> None:
    rec = {"bytes_done": 100, "bytes_total": 400, "started": 1000.0}
    assert eta_seconds(rec, 1010.0) == pytest.approx(30.0)
    assert eta_seconds({**rec, "bytes_done": 0}, 1010.0) is None
    assert eta_seconds({**rec, "bytes_done": 400}, 1010.0) is None
    assert eta_seconds({}, 1010.0) is None


def test_parse_authorization() -> None:
    basic = base64.b64encode(b"alice:pa:ss").decode()
    assert parse_authorization(f"Basic {basic}") == ("basic", "alice", "pa:ss")
    assert parse_authorization("Bearer abc") == ("bearer", "", "abc")
    assert isinstance(parse_authorization("Basic !!!"), Refusal)
    assert isinstance(
        parse_authorization("Basic " + base64.b64encode(b"nocolon").decode()), Refusal
    )
    assert isinstance(parse_authorization("Digest x"), Refusal)
    assert isinstance(parse_authorization("Bearer"), Refusal)


def test_open_associations_never_below_zero() -> None:
    from p2pacs.events import AssociationEvent

    bus = EventBus()
    metrics = SiteMetrics(bus)
    bus.emit(AssociationEvent(False, "X", "10.0.0.1"))  # an abort before it was established
    bus.emit(AssociationEvent(True, "X", "10.0.0.1"))
    families = _families(metrics.render({}).decode())
    assert families["p2pacs_dicom_associations_open"].samples[0].value == 1
    bus.emit(AssociationEvent(False, "X", "10.0.0.1"))
    families = _families(metrics.render({}).decode())
    assert families["p2pacs_dicom_associations_open"].samples[0].value == 0
