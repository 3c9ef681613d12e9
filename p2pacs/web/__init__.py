"""The site's web server: the status page, ``/status.json`` and Prometheus ``/metrics``, on
one HTTPS port behind the ``[web]`` users and tokens; other route sets mount on it too."""

from p2pacs.web.metrics import SiteMetrics, status_families
from p2pacs.web.routes import StatusRoutes
from p2pacs.web.server import WebServer

__all__ = ["SiteMetrics", "StatusRoutes", "WebServer", "status_families"]
