"""One site as a running service: archive, DICOM gateway, and (when enrolled) the federation.

``SiteNode`` owns every long-lived part of a site and stops them in reverse order, so
``p2pacs serve`` shuts down cleanly on SIGTERM/SIGINT and a test can start a site in-process.
"""

from __future__ import annotations

import logging
from types import TracebackType

from p2pacs.archive import Archive
from p2pacs.gateway import Gateway
from p2pacs.site import Site

__all__ = ["SiteNode"]

log = logging.getLogger(__name__)


class SiteNode:
    """Async context manager running one site."""

    def __init__(self, site: Site):
        self.site = site
        self.archive: Archive | None = None
        self.gateway: Gateway | None = None

    @property
    def dicom_address(self) -> tuple[str, int]:
        assert self.gateway is not None, "node not started"
        return self.gateway.address

    async def start(self) -> None:
        self.archive = self.site.archive()
        self.gateway = Gateway(self.archive, self.site.config.dicom)
        self.gateway.start()
        host, port = self.gateway.address
        log.info("gateway listening on %s:%d as %s", host, port, self.site.config.dicom.ae_title)

    async def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.archive is not None:
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
