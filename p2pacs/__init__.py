"""p2pacs: a peer-to-peer, content-addressed archive for medical images."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
