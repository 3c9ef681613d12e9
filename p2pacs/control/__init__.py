"""The site's control plane: the operator's API on the running node (``api``), the narrow
views of the site's parts it uses (``ports``), the command line's client of it (``client``)
and the NDJSON progress streams between them (``stream``)."""

from __future__ import annotations

from p2pacs.control.client import RUNFILE, LocalNode, connect, node_address

__all__ = ["RUNFILE", "LocalNode", "connect", "node_address"]
