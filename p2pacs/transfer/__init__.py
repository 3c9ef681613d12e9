"""Peer transfer over mutual TLS: blobs by hash (with ranges), verified on arrival."""

from p2pacs.transfer.client import FetchReport, Peer, PeerClient
from p2pacs.transfer.server import TransferServer

__all__ = ["FetchReport", "Peer", "PeerClient", "TransferServer"]
