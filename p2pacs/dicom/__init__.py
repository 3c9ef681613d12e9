"""Pure DICOM helpers: Part-10 framing, structural validation and header-only attribute
extraction (no I/O)."""

from __future__ import annotations

from p2pacs.dicom.header import LEVEL_KEYS, Level, extract_attributes
from p2pacs.dicom.part10 import Part10, build_prefix, split_part10
from p2pacs.dicom.validate import validate_dataset

__all__ = [
    "LEVEL_KEYS",
    "Level",
    "Part10",
    "build_prefix",
    "extract_attributes",
    "split_part10",
    "validate_dataset",
]
