"""One site as a running service: archive, DICOM gateway and, when enrolled, the federation.

``SiteNode`` owns every long-lived part of a site and stops them (the gateway first, so no new
DICOM work starts, then the federation, then the archive), so ``p2pacs serve`` shuts down
cleanly on SIGTERM/SIGINT and a test can start a site in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509

from p2pacs import __version__
from p2pacs.archive import Archive
from p2pacs.audit import AuditTrail, Local, StudyInfo, TrailSettings
from p2pacs.const import ORPHAN_GRACE, ORPHAN_SWEEP_INTERVAL, STATUS_SCHEMA
from p2pacs.control.api import ControlPlane
from p2pacs.control.client import RUNFILE
from p2pacs.dicomweb import dicomweb_app
from p2pacs.errors import FederationError, P2PacsError
from p2pacs.events import Lifecycle
from p2pacs.federation.changes import ChangeTailer
from p2pacs.federation.continuity import settle_at_start
from p2pacs.federation.identity import CA_CERT, SITE_CERT, SITE_KEY
from p2pacs.federation.node import FederationNode
from p2pacs.federation.search import FederatedSearch
from p2pacs.gateway import CommitmentResult, Gateway
from p2pacs.gateway.pool import WorkerPool, methods_for, resolve_workers
from p2pacs.healing.commitment import check_commitment
from p2pacs.healing.recovery import Recovery
from p2pacs.healing.repair import Healer
from p2pacs.healing.scrub import ScrubTotals, repair_blob
from p2pacs.looplag import LoopLag
from p2pacs.site import Site
from p2pacs.store import hashed_bytes
from p2pacs.web import StatusRoutes, WebServer

__all__ = ["RUNFILE", "SiteNode"]

log = logging.getLogger(__name__)

AUDIT_DIR = "audit"  # the local audit log, in the site directory unless audit.log_dir says
DICOMWEB_PREFIX = "/dicomweb"  # where the web server serves DICOMweb
AUDIT_STOP_TIMEOUT = 5.0  # seconds a stopping site gives the audit repositories to catch up


class SiteNode:
    """Async context manager running one site."""

    def __init__(self, site: Site, *, new_site: bool = False):
        """``new_site``: the operator's word that this enrolled site never held anything, so
        its empty archive may publish an empty catalogue at once (``serve --new-site``)."""
        self.site = site
        self.new_site = new_site
        self.archive: Archive | None = None
        self.gateway: Gateway | None = None
        self.workers: WorkerPool | None = None  # instead of ``gateway`` when dicom.workers > 1
        self.federation: FederationNode | None = None  # when enrolled
        self.healer: Healer | None = None
        self.recovery: Recovery | None = None
        self.audit: AuditTrail | None = None
        self.started = time.time()
        self.loop_lag = LoopLag()
        self.scrubs = ScrubTotals()
        self.web: WebServer | None = None  # when [web] is enabled
        self.web_status: StatusRoutes | None = None
        # more route sets for the web server (e.g. DICOMweb): each is called with the server
        # before it starts and mounts its routes with ``add_routes`` or ``add_app``
        self.web_parts: list[Callable[[WebServer], None]] = []
        self._sweeper: asyncio.Task[None] | None = None  # orphan objects (store.backend "s3")
        self._stopping = asyncio.Event()

    @property
    def dicom_address(self) -> tuple[str, int]:
        if self.workers is not None:
            return self.workers.address
        assert self.gateway is not None, "node not started"
        return self.gateway.address

    async def start(self) -> None:
        self.loop_lag.start()
        self.archive = archive = self.site.archive()
        enrolled = self.site.config.federation.enabled
        if self.site.config.audit.enabled:  # before any DICOM work, so all of it is audited
            self._start_audit(archive)
        if enrolled:  # before the gateway takes a C-STORE: a wiped archive is awaiting from now
            self._settle_baseline(archive)
        if resolve_workers(self.site.config.dicom.workers) > 1:
            await asyncio.to_thread(self._start_workers, archive, enrolled)
        else:
            self.gateway = Gateway(
                archive,
                self.site.config.dicom,
                ensure_local=self._ensure_local if enrolled else None,
                commitment=self._commitment if enrolled else None,
            )
            self.gateway.start()
        host, port = self.dicom_address
        log.info("gateway listening on %s:%d as %s", host, port, self.site.config.dicom.ae_title)
        if enrolled:
            await self._start_federation()
        if self.site.config.web.enabled:
            await self._start_web(archive)
        if archive.blobs.objects is not None:
            self._sweeper = asyncio.create_task(self._sweep_orphans(), name="orphan-sweep")
        archive.events.emit(
            Lifecycle("start", self.site.config.federation.name or self.site.path.name)
        )
        self._write_runfile()

    def _start_workers(self, archive: Archive, enrolled: bool) -> None:
        """The gateway as worker processes on one shared port (docs/architecture.md)."""
        config = self.site.config
        self.workers = WorkerPool(
            site_path=self.site.path,
            store=config.store,
            config=config.dicom,
            bus=archive.events,
            methods=methods_for(
                archive, self._ensure_local, self._commitment, self._repair_read, federated=enrolled
            ),
            count=resolve_workers(config.dicom.workers),
            federated=enrolled,
        )
        self.workers.start()

    async def _start_web(self, archive: Archive) -> None:
        """The status page, /status.json and /metrics, and every route set in ``web_parts``."""
        config = self.site.config.web
        server = WebServer(config, archive.events, base=self.site.path)
        self.web_status = status = StatusRoutes(self.status, archive.events, refresh=config.refresh)
        server.add_routes(status.install)
        if config.dicomweb:
            self._mount_dicomweb(server, archive)
        for part in self.web_parts:
            part(server)
        await server.start()
        self.web = server
        log.info("status page and metrics at %s/", server.url)

    def _mount_dicomweb(self, server: WebServer, archive: Archive) -> None:
        """DICOMweb at /dicomweb: STOW-RS into ``archive.submit`` (the C-STORE path), the
        federation searched and read through when enrolled."""
        fed = self.federation
        server.add_app(
            DICOMWEB_PREFIX,
            dicomweb_app(
                archive,
                federation=FederatedSearch(fed) if fed is not None else None,
                ae_title=self.site.config.dicom.ae_title,
            ),
        )

    def _start_audit(self, archive: Archive) -> None:
        cfg, fed = self.site.config.audit, self.site.config.federation
        ident = self.site.identity_path
        settings = TrailSettings(
            log_dir=self.site.path / (cfg.log_dir or AUDIT_DIR),  # an absolute path stays so
            max_bytes=cfg.log_max_bytes,
            keep=cfg.log_keep,
            repositories=tuple(cfg.repositories),
            ca_file=self.site.path / cfg.ca_file if cfg.ca_file else None,
            client_cert=(ident / SITE_CERT, ident / SITE_KEY) if cfg.client_cert else None,
        )
        name = fed.name or self.site.path.name
        local = Local(
            site=name,
            ae_title=self.site.config.dicom.ae_title,
            host=fed.host if fed.enabled else socket.gethostname(),
            enterprise=self._federation_name() if fed.enabled else "",
        )
        self.audit = AuditTrail(settings, local, self._study_info)
        self.audit.start()
        archive.events.subscribe(self.audit.observe)

    def _federation_name(self) -> str:
        """The federation's name (its CA's common name), for AuditEnterpriseSiteID."""
        try:
            ca = x509.load_pem_x509_certificate((self.site.identity_path / CA_CERT).read_bytes())
            names = ca.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            return str(names[0].value) if names else ""
        except (OSError, ValueError):
            return ""

    def _study_info(self, study_uid: str) -> StudyInfo | None:
        """The audit thread's view of a study held here: its patient, instances per class."""
        archive = self.archive
        if archive is None:
            return None
        record = archive.index.study(study_uid)
        if record is None:
            return None
        classes = Counter(i.sop_class_uid for i in archive.index.study_instances(study_uid))
        return StudyInfo(str(record.attrs.get("PatientID", "")), tuple(sorted(classes.items())))

    async def _sweep_orphans(self) -> None:
        """Remove objects a crash left between their PUT and their index commit, at start and
        then every ``ORPHAN_SWEEP_INTERVAL`` (on a thread: it lists the whole bucket prefix)."""
        assert self.archive is not None
        blobs = self.archive.blobs
        while not self._stopping.is_set():
            try:
                removed = await asyncio.to_thread(
                    blobs.sweep_objects, ORPHAN_GRACE, self._stopping.is_set
                )
                if removed:
                    log.warning("removed %d orphan objects from the object store", removed)
            except P2PacsError as exc:
                log.error("orphan sweep of the object store failed: %s", exc)
            except Exception:  # a background loop logs and tries again; it never dies
                log.exception("orphan sweep of the object store failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), ORPHAN_SWEEP_INTERVAL)

    def _settle_baseline(self, archive: Archive) -> None:
        holds = next(iter(archive.index.studies()), None) is not None
        baseline = settle_at_start(archive.db, holds_studies=holds, new_site=self.new_site)
        if self.new_site and not baseline.known:
            raise FederationError(
                "--new-site refused: this archive already holds studies received since it was "
                "wiped; its previous catalogue must be found first (see 'p2pacs status')"
            )
        if not baseline.known:
            log.warning(
                "this archive holds nothing of its past: it will not publish a catalogue until "
                "it has found its last site record at another member"
            )

    @property
    def runfile(self) -> Path:
        return self.site.path / RUNFILE

    def _write_runfile(self) -> None:
        """Where the running node listens, so the CLI can reach it (ports may be picked at 0)."""
        info: dict[str, Any] = {"pid": os.getpid(), "dicom": list(self.dicom_address)}
        fed = self.federation
        if fed is not None and fed.server is not None and fed.dht is not None:
            info["transfer"] = list(fed.server.address)
            info["dht"] = list(fed.dht.address)
        if self.web is not None:
            info["web"] = list(self.web.address)
        tmp = self.runfile.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(self.runfile)

    async def _start_federation(self) -> None:
        assert self.archive is not None
        fed = FederationNode(self.site, self.archive, dicom_address=self.dicom_address)
        self.federation = fed
        self.healer = healer = Healer(fed)
        self.recovery = recovery = Recovery(fed)
        fed.on_fetched.append(recovery.on_demand)
        healer.defer = recovery.takes_over
        tailer = ChangeTailer(self.archive, fed.publisher.mark)  # what gateway workers ingested
        fed.publisher.on_published.append(tailer.published)
        fed.add_task(tailer.run)
        fed.add_task(healer.run)
        fed.add_task(recovery.run)
        fed.repair = lambda h: repair_blob(fed, h)  # a blob found rotten while serving a peer
        control = ControlPlane(fed, healer, recovery, self.status, self.scrubs)
        await fed.start(control.install)
        self.archive.repair_hook = self._repair_read

    def _repair_read(self, h: str) -> bool:
        """A blob failed its hash when read for a DICOM thread: repair it from a peer, waiting
        at most two minutes; False (so the read fails cleanly) if that could not be done."""
        fed = self.federation
        if fed is None:
            return False
        try:
            return bool(fed.call(repair_blob(fed, h), 120.0))
        except (P2PacsError, TimeoutError) as exc:
            log.error("blob %s could not be repaired while reading it: %s", h[:16], exc)
            return False

    def _ensure_local(self, study_uids: list[str]) -> None:
        if self.federation is not None:
            self.federation.ensure_local(study_uids)

    def _commitment(self, refs: list[tuple[str, str]], timeout: float) -> CommitmentResult:
        fed = self.federation
        if fed is None:
            raise FederationError("the federation node is not running")
        committed, failed = fed.call(check_commitment(fed, refs, timeout), timeout + 30.0)
        return CommitmentResult(committed=committed, failed=failed)

    async def status(self) -> dict[str, Any]:
        """This site and the federation at a glance (``p2pacs status``)."""
        assert self.archive is not None
        archive = self.archive
        (patients, studies, instances), (blobs, stored), storage = await asyncio.to_thread(
            lambda: (archive.index.counts(), archive.blobs.totals(), self._storage(archive))
        )
        out: dict[str, Any] = {
            "schema": STATUS_SCHEMA,
            "pid": os.getpid(),
            "version": __version__,
            "site": self.site.config.federation.name or self.site.path.name,
            "ae_title": self.site.config.dicom.ae_title,
            "dicom": list(self.dicom_address),
            "uptime_s": round(time.time() - self.started, 1),
            "patients": patients,
            "studies": studies,
            "instances": instances,
            "blobs": blobs,
            "bytes": stored,
            "hashed_bytes": hashed_bytes(),  # by this process since it started
            "loop_lag": self.loop_lag.snapshot(),  # how long the event loop was kept waiting
            "web": list(self.web.address) if self.web is not None else None,
            "storage": storage,
            "federation": None,
            "audit": self.audit.snapshot() if self.audit is not None else None,
            "store_backend": self.site.config.store.backend,
            # reachable, since, last error and request counts; None on a site with no object store
            "object_store": archive.blobs.objects.health() if archive.blobs.objects else None,
        }
        fed, healer, recovery = self.federation, self.healer, self.recovery
        if fed is not None and healer is not None and recovery is not None:
            out["federation"] = {
                **fed.snapshot(),
                **healer.snapshot(),
                "recovery_pending": recovery.pending,
                "recovery": recovery.snapshot(),
                "scrub": dataclasses.asdict(self.scrubs),
            }
        return out

    def _storage(self, archive: Archive) -> dict[str, int]:
        """The LMDB map and the disk under the site folder (cheap: two stat calls)."""
        db = archive.db.stat()
        disk = shutil.disk_usage(self.site.path)
        return {
            "map_size": db["map_size"],
            "used_bytes": db["used_bytes"],
            "disk_free": disk.free,
            "disk_total": disk.total,
            "write_queue": db["write_queue"],
            "commits": db["commits"],
            "jobs_committed": db["jobs_committed"],
        }

    async def stop(self) -> None:
        await self.loop_lag.stop()
        self.runfile.unlink(missing_ok=True)
        if self.web is not None:  # first: its pages read every other part
            await self.web.stop()
            self.web = None
        if self.web_status is not None:
            self.web_status.close()
            self.web_status = None
        self._stopping.set()
        if self._sweeper is not None:
            await self._sweeper  # a sweep under way stops at its next object, before the close
            self._sweeper = None
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.workers is not None:
            await asyncio.to_thread(self.workers.stop)
            self.workers = None
        if self.federation is not None:
            try:
                await self.federation.stop()
            except P2PacsError:
                log.exception("federation stop failed")
            self.federation = None
        if self.archive is not None:
            name = self.site.config.federation.name or self.site.path.name
            self.archive.events.emit(Lifecycle("stop", name))
            if self.audit is not None:
                self.audit.stop(AUDIT_STOP_TIMEOUT)
                self.audit = None
            self.archive.close()
            self.archive = None

    async def __aenter__(self) -> SiteNode:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
