"""The site's web server: the status page, ``/status.json`` and Prometheus ``/metrics``, on
one HTTPS port behind the ``[web]`` users and tokens; other route sets mount on it too
(``WebServer.add_app``/``add_routes``; ``request[PRINCIPAL]`` names who was let in)."""

from p2pacs.web.auth import PRINCIPAL
from p2pacs.web.metrics import SiteMetrics, status_families
from p2pacs.web.routes import StatusRoutes
from p2pacs.web.server import WebServer

__all__ = ["PRINCIPAL", "SiteMetrics", "StatusRoutes", "WebServer", "status_families"]
