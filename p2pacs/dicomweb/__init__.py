"""DICOMweb (PS3.18): QIDO-RS, WADO-RS and STOW-RS over an ``Archive``, as an aiohttp
application for the site's web server to mount (``dicomweb_app``); see docs/dicomweb.md."""

from __future__ import annotations

from p2pacs.dicomweb.federated import Federation, FoundAt, SiteRows
from p2pacs.dicomweb.routes import dicomweb_app
from p2pacs.dicomweb.stow_rs import Ingest

__all__ = ["Federation", "FoundAt", "Ingest", "SiteRows", "dicomweb_app"]
