"""The DICOM gateway: how an existing PACS and modalities use p2pacs, unchanged."""

from p2pacs.gateway.commitment import CommitmentResult
from p2pacs.gateway.server import Gateway

__all__ = ["CommitmentResult", "Gateway"]
