"""The DICOM index: header attributes by level, C-FIND matching, instance -> blob lookups."""

from __future__ import annotations

from p2pacs.dicom.header import Level
from p2pacs.index.db import DicomIndex, IndexUpdate, InstanceRecord, StudyRecord, Version
from p2pacs.index.matching import matches

__all__ = [
    "DicomIndex",
    "IndexUpdate",
    "InstanceRecord",
    "Level",
    "StudyRecord",
    "Version",
    "matches",
]
