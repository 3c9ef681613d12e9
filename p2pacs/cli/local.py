"""The CLI's connection to its site's running node (``p2pacs.control.client``)."""

from __future__ import annotations

from p2pacs.control.client import LocalNode, connect, node_address

__all__ = ["LocalNode", "connect", "node_address"]
