"""Prometheus metrics of one site, in its own ``CollectorRegistry`` (several sites may share a
process, as in the tests).

Two sources. DICOM traffic is counted as it happens, from the site's event bus (``observe``):
every DIMSE request with its service, status class, latency and bytes, associations, security
alerts. Everything else is read at scrape time from the same status snapshot ``p2pacs status``
shows (``status_families``, a pure function, wrapped by ``StatusCollector``): nothing polls,
and the snapshot is taken off the event loop by its owner before the registry is rendered.

Names follow Prometheus conventions: the unit in the name (``_seconds``, ``_bytes``), ``_total``
on counters, label values from small fixed sets (DIMSE service, status class, member site
name, drop reason). A study, series or instance UID, or any patient attribute, is never a
label: the events carry them for the audit trail, and this module does not read them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from p2pacs.events import AssociationEvent, DicomRequest, Event, EventBus, SecurityAlert

__all__ = [
    "SERVICES",
    "SiteMetrics",
    "StatusCollector",
    "status_class",
    "status_families",
]

SERVICES = ("C-ECHO", "C-STORE", "C-FIND", "C-MOVE", "C-GET", "N-ACTION")
ALERT_KINDS = ("tls-refused", "bad-mac", "tampered-blob", "auth-failed")
# seconds: a C-ECHO takes milliseconds, a C-MOVE of a large study minutes
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
# bytes of one stored instance: a 2 KB SR to a 1 GB multi-frame
SIZE_BUCKETS = (16e3, 64e3, 256e3, 1e6, 4e6, 16e6, 64e6, 256e6, 1e9)
# DHT counters exported (status ``federation.dht``), each under one name; the dropped_* ones
# become one metric with a ``reason`` label
DHT_COUNTERS = {
    "datagrams_in": ("dht_datagrams_received", "DHT datagrams received"),
    "datagrams_out": ("dht_datagrams_sent", "DHT datagrams sent"),
    "records_stored": ("dht_records_stored", "DHT records stored for the federation"),
    "records_rejected": ("dht_records_rejected", "DHT records refused (bad signature, older)"),
    "store_full": ("dht_store_full", "DHT records refused because the DHT store was full"),
    "rpc_timeouts": ("dht_rpc_timeouts", "DHT requests that got no answer"),
    "republished": ("dht_records_republished", "DHT records republished before expiry"),
    "contacts_proven": ("dht_contacts_proven", "DHT contacts admitted after a signed hello"),
    "lookups_failed": ("dht_lookup_failures", "DHT value lookups that failed (no answer)"),
}
DROPPED = "dropped_"


def status_class(code: int) -> str:
    """``success``, ``warning``, ``failure`` or ``cancel`` for a final DIMSE status
    (PS3.7 Annex C: 0x0001, 0x0107, 0x0116 and 0xBxxx are warnings, 0xFE00 is cancel)."""
    if code == 0x0000:
        return "success"
    if code == 0xFE00:
        return "cancel"
    if code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
        return "warning"
    return "failure"


class _DicomCounters:
    """The event-driven metrics; ``__call__`` is the bus observer (any thread, never blocks)."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "p2pacs_dicom_requests",
            "DIMSE requests answered, by service and final status class",
            ["service", "status_class"],
            registry=registry,
        )
        self.latency = Histogram(
            "p2pacs_dicom_request_duration_seconds",
            "Seconds from a DIMSE request to its final answer",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.received = Counter(
            "p2pacs_dicom_received_bytes",
            "Dataset bytes received by C-STORE",
            registry=registry,
        )
        self.sizes = Histogram(
            "p2pacs_dicom_stored_instance_size_bytes",
            "Dataset bytes of each instance received by C-STORE",
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.subops = Counter(
            "p2pacs_dicom_suboperations",
            "C-MOVE/C-GET sub-operations (instances sent), by result",
            ["service", "result"],
            registry=registry,
        )
        self.open = Gauge(
            "p2pacs_dicom_associations_open", "DICOM associations open now", registry=registry
        )
        self.associations = Counter(
            "p2pacs_dicom_associations", "DICOM associations established", registry=registry
        )
        self.alerts = Counter(
            "p2pacs_security_alerts",
            "Security alerts: refused non-members, bad MACs, tampered blobs, failed web logins",
            ["kind"],
            registry=registry,
        )
        for service in SERVICES:  # every series exists from the start: rate() works at once
            self.latency.labels(service)
            for cls in ("success", "warning", "failure"):
                self.requests.labels(service, cls)
        for kind in ALERT_KINDS:
            self.alerts.labels(kind)
        self._open = 0
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if isinstance(event, DicomRequest):
            service = event.service if event.service in SERVICES else "other"
            self.requests.labels(service, status_class(event.status)).inc()
            self.latency.labels(service).observe(event.seconds)
            if service == "C-STORE" and event.bytes:
                self.received.inc(event.bytes)
                self.sizes.observe(event.bytes)
            if service in ("C-MOVE", "C-GET"):
                for result, n in (
                    ("completed", event.completed),
                    ("failed", event.failed),
                    ("warning", event.warning),
                ):
                    if n:
                        self.subops.labels(service, result).inc(n)
        elif isinstance(event, AssociationEvent):
            # an abort may end an association that never opened: never count below zero
            with self._lock:
                self._open = self._open + 1 if event.opened else max(0, self._open - 1)
                self.open.set(self._open)
            if event.opened:
                self.associations.inc()
        elif isinstance(event, SecurityAlert):
            self.alerts.labels(event.kind if event.kind in ALERT_KINDS else "other").inc()


# (metric name after "p2pacs_", "gauge" or "counter", dotted path in the status JSON, help).
# A text is 1 when not empty (a reason given), a list or table counts its entries.
SITE_METRICS = (
    ("archive_patients", "gauge", "patients", "Patients held here"),
    ("archive_studies", "gauge", "studies", "Studies held here"),
    ("archive_instances", "gauge", "instances", "Instances held here"),
    ("archive_blobs", "gauge", "blobs", "Blobs stored (instances, manifests, catalogues)"),
    ("archive_stored_bytes", "gauge", "bytes", "Bytes of the blobs stored"),
    ("hashed_bytes", "counter", "hashed_bytes", "Bytes this process hashed"),
    ("uptime_seconds", "gauge", "uptime_s", "Seconds since the site started"),
    ("storage_map_size_bytes", "gauge", "storage.map_size", "The LMDB map size (store.map_size)"),
    ("storage_used_bytes", "gauge", "storage.used_bytes", "Bytes of the LMDB map in use"),
    ("storage_disk_free_bytes", "gauge", "storage.disk_free", "Free bytes on the site's disk"),
    ("storage_disk_size_bytes", "gauge", "storage.disk_total", "Size of the site's disk"),
    (
        "ingest_queue_jobs",
        "gauge",
        "storage.write_queue",
        "Writes waiting for the LMDB writer (the ingest queue of the group commit)",
    ),
    ("lmdb_commits", "counter", "storage.commits", "LMDB write transactions committed"),
    (
        "lmdb_committed_jobs",
        "counter",
        "storage.jobs_committed",
        "Writes in them (divided by lmdb_commits_total: the mean group-commit size)",
    ),
    (
        "loop_lag_max_seconds",
        "gauge",
        "loop_lag.max_ms",
        "The longest the event loop was kept from running since start",
    ),
)
FEDERATION_METRICS = (
    ("sites_up", "gauge", "sites_up", "Live sites, this one included"),
    ("replication_factor", "gauge", "replication", "R: sites that should hold every study"),
    ("under_replicated_studies", "gauge", "under_replicated",
     "Studies with fewer than R live holders at the last anti-entropy pass"),
    ("repair_passes", "counter", "repair_passes", "Anti-entropy passes"),
    ("repair_queue_studies", "gauge", "repair_queue", "Studies queued for a repair pull"),
    ("repair_paused", "gauge", "repair_paused", "1 while repair pulls are paused (archive full)"),
    ("last_repair_timestamp_seconds", "gauge", "last_repair", "Unix time of the last repair pull"),
    ("corrupt_served_blobs", "counter", "corrupt_served",
     "Blobs found rotten while serving a peer"),
    ("corrupt_repaired_blobs", "counter", "corrupt_repaired",
     "Blobs found rotten while serving a peer, then repaired"),
    ("instance_blobs_fetched", "counter", "instance_blobs_fetched",
     "Instance blobs fetched from members"),
    ("studies_published", "counter", "studies_published",
     "Studies whose catalogue entry this run changed"),
    ("trimmed_studies", "counter", "trimmed", "Surplus study copies trimmed back to R"),
    ("catalogue_studies", "gauge", "catalogue_studies", "Studies this site's catalogue lists"),
    ("catalogue_copied_bytes", "counter", "metadata.catalogue_bytes_fetched",
     "Bytes of members' catalogue nodes copied"),
    ("metadata_garbage_blobs", "gauge", "metadata.garbage",
     "Superseded catalogue nodes and manifests waiting for metadata_grace"),
    ("site_record_published", "gauge", "site_record",
     "1 once this site's signed site record went out"),
    ("clock_offset_seconds", "gauge", "clock.offset_s",
     "The members' clocks minus this one (median)"),
    ("recovery_pending_studies", "gauge", "recovery_pending", "Studies queued for recovery"),
    ("recovery_studies_done", "gauge", "recovery.studies_done", "Studies this run recovered"),
    ("recovery_studies_planned", "gauge", "recovery.studies_total",
     "Studies this run's recovery brings back in all"),
    ("recovery_bytes_done", "gauge", "recovery.bytes_done", "Bytes this run recovered"),
    ("recovery_bytes_planned", "gauge", "recovery.bytes_total",
     "Bytes this run's recovery brings back in all"),
    ("recovery_retrying_studies", "gauge", "recovery.retrying",
     "Queued studies whose last fetch failed"),
    ("recovery_given_up_studies", "gauge", "recovery.given_up",
     "Queued studies failing for longer than recover_give_up"),
    ("recovery_awaiting_record", "gauge", "recovery.awaiting_record",
     "1 while a wiped site looks for its last site record"),
    ("recovery_paused", "gauge", "recovery.full", "1 while recovery is paused (archive full)"),
    ("scrub_runs", "counter", "scrub.runs", "Scrubs finished"),
    ("scrub_checked_blobs", "counter", "scrub.checked", "Blobs re-hashed by scrubs"),
    ("scrub_corrupt_blobs", "counter", "scrub.corrupt", "Blobs scrubs found corrupt"),
    ("scrub_repaired_blobs", "counter", "scrub.repaired",
     "Corrupt blobs scrubs repaired from a member"),
    ("scrub_unrepaired_blobs", "counter", "scrub.unrepaired",
     "Corrupt blobs scrubs could not repair"),
    ("scrub_last_run_timestamp_seconds", "gauge", "scrub.last_run",
     "Unix time the last scrub finished"),
)  # fmt: skip


def _value(tree: Mapping[str, Any], path: str) -> float | None:
    value: Any = tree
    for key in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    if value is None:
        return None
    if isinstance(value, bool | int | float):
        return float(value)
    if isinstance(value, str):
        return 1.0 if value else 0.0
    if isinstance(value, Mapping | list | tuple):
        return float(len(value))
    return None


def _families(
    tree: Mapping[str, Any], table: tuple[tuple[str, str, str, str], ...]
) -> Iterator[Metric]:
    for name, kind, path, doc in table:
        value = _value(tree, path)
        if value is None:
            continue
        if path.endswith("_ms"):  # status speaks milliseconds, Prometheus seconds
            value /= 1000
        cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        yield cls(f"p2pacs_{name}", doc, value=value)


def status_families(status: Mapping[str, Any]) -> Iterator[Metric]:
    """The metrics read from a status snapshot (``SiteNode.status()``): pure, no I/O."""
    yield InfoMetricFamily(
        "p2pacs_site",
        "This site: its name, AE title and p2pacs version",
        value={
            "site": str(status.get("site", "")),
            "ae_title": str(status.get("ae_title", "")),
            "version": str(status.get("version", "")),
        },
    )
    yield from _families(status, SITE_METRICS)
    fed = status.get("federation")
    if fed:
        yield from _federation_families(fed)


def _federation_families(fed: Mapping[str, Any]) -> Iterator[Metric]:
    members = fed.get("members") or []
    states = GaugeMetricFamily(
        "p2pacs_members", "Member sites by state (this site not counted)", labels=["state"]
    )
    for state in ("up", "suspect", "down"):
        states.add_metric([state], sum(1 for m in members if m.get("state") == state))
    yield states
    up = GaugeMetricFamily(
        "p2pacs_member_up",
        "1 while a member is live (up or suspect), 0 when down",
        labels=["member"],
    )
    seen = GaugeMetricFamily(
        "p2pacs_member_last_seen_seconds",
        "Seconds since a member last answered a heartbeat",
        labels=["member"],
    )
    held = GaugeMetricFamily(
        "p2pacs_member_studies", "Studies in a member's last catalogue", labels=["member"]
    )
    for m in members:
        up.add_metric([m["name"]], 1.0 if m.get("up") else 0.0)
        if m.get("last_seen_s") is not None:
            seen.add_metric([m["name"]], m["last_seen_s"])
        held.add_metric([m["name"]], m.get("studies", 0))
    yield from (up, seen, held)
    yield from _families(fed, FEDERATION_METRICS)
    pulls = CounterMetricFamily(
        "p2pacs_repairs", "Repair pulls of a study, by result", labels=["result"]
    )
    pulls.add_metric(["done"], fed.get("pulls_done", 0))
    pulls.add_metric(["failed"], fed.get("pulls_failed", 0))
    yield pulls
    transfer = fed.get("transfer") or {}
    for direction, doc in (("received", "fetched from"), ("sent", "served to")):
        family = CounterMetricFamily(
            f"p2pacs_transfer_{direction}_bytes",
            f"Blob bytes {doc} a member over the transfer API",
            labels=["peer"],
        )
        for peer, n in sorted((transfer.get(direction) or {}).items()):
            family.add_metric([peer], n)
        yield family
    yield from _dht_families(fed.get("dht") or {})


def _dht_families(dht: Mapping[str, int]) -> Iterator[Metric]:
    dropped = CounterMetricFamily(
        "p2pacs_dht_datagrams_dropped",
        "DHT datagrams dropped before parsing, by reason (bad_mac: not this federation)",
        labels=["reason"],
    )
    for key, n in sorted(dht.items()):
        if key.startswith(DROPPED):
            dropped.add_metric([key.removeprefix(DROPPED)], n)
    yield dropped
    for key, (name, doc) in DHT_COUNTERS.items():
        yield CounterMetricFamily(f"p2pacs_{name}", doc, value=dht.get(key, 0))
    yield SummaryMetricFamily(
        "p2pacs_dht_lookup_seconds",
        "DHT value lookups (site records) and the time they took",
        count_value=dht.get("lookups", 0),
        sum_value=dht.get("lookup_us", 0) / 1e6,
    )


class StatusCollector(Collector):
    """Yields ``status_families`` of the snapshot last given to ``update``."""

    def __init__(self) -> None:
        self._status: Mapping[str, Any] = {}

    def update(self, status: Mapping[str, Any]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        return status_families(self._status)

    def describe(self) -> list[Metric]:
        return []  # names vary with the snapshot: never checked for clashes at registration


class SiteMetrics:
    """One site's registry: the DICOM counters fed by its event bus, and the status collector."""

    def __init__(self, events: EventBus):
        self.registry = CollectorRegistry(auto_describe=False)
        self.dicom = _DicomCounters(self.registry)
        self.status = StatusCollector()
        self.registry.register(self.status)
        self._render = threading.Lock()  # one snapshot per rendering, when scrapes overlap
        self._unsubscribe = events.subscribe(self.dicom)

    def render(self, status: Mapping[str, Any]) -> bytes:
        """The exposition text with ``status`` as the snapshot (blocking: call it on a thread)."""
        with self._render:
            self.status.update(status)
            return generate_latest(self.registry)

    def close(self) -> None:
        self._unsubscribe()
